"""Section moe_split: the MoE's one-token split-K (kernels/moe_split.py) against the unsplit direct mode.

The whole fp8 MoE of one decode token at the 16b shapes (act_quant of x, up GEMM, SwiGLU reduce or
act_quant of h, down GEMM, the combine), each grouped-GEMM config pinned, every (up, down) split,
from CUDA graphs of ROUTINGS calls with different random routings: the 8 experts of a call move
69 MB, so the graph's 8 calls read ~550 MB of the 571 MB of experts and the 50 MB L2 holds little
of it, as in the decode step (one MoE layer's experts are read once per step). The baseline of
each config is the direct mode unsplit (what the decode program runs with DSV3_TORCH_MOE_SPLIT_K=1);
the floor is the active experts' weight bytes over HBM_BW. At T=8 the split flow's other form (one
plane: the fp32 down output, no split) is timed against the unsplit flow too, for what it costs
above one token.
"""

from __future__ import annotations

import torch

from kbench.common import Report, Row, Shapes, add, bench, guarded, mean_rel, show, _graph_of
from kbench.moe import _decode_experts, _decode_tokens

ROUTINGS = 8
SPLITS = ((1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2), (8, 2), (4, 4), (8, 4))
EXTRA_CONFIGS = ((16, 4, 6), (32, 4, 6))  # (BLOCK_N, num_warps, num_stages): more programs per expert
# Against the unsplit flow's bf16 output: the split flow sums the down GEMM's products in fp32 where the
# unsplit one rounds each slot's to bf16 first, so outputs differ by up to a bf16 ulp (2^-8 relative).
TOL = 1e-2


def bench_moe_split(report: Report, sh: Shapes, quick: bool) -> None:
    import triton

    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.kernels import moe as M
    from dsv3_export.kernels import moe_split as S
    from dsv3_export.kernels._common import launch

    torch.manual_seed(0)
    gpu = sh.device == "cuda"
    e, k, w13, w13s, w2, w2s = _decode_experts(sh)
    configs = list(M.GROUPED_GEMM_CONFIGS) + [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
                                              for bn, w, st in EXTRA_CONFIGS]
    splits, tokens = SPLITS, (1, 8)
    if not gpu:  # the CPU smoke test: the section's path, one config (numerics: tests/kernels/test_moe_split.py)
        configs, splits, tokens = configs[:1], ((2, 2),), (1,)
    d, i = sh.dim, sh.moe_inter
    for t in tokens:
        calls = [_decode_tokens(sh, t, e, k) for _ in range(ROUTINGS if gpu else 2)]
        active = sum(c[3] for c in calls) / len(calls)
        nbytes = active * 3 * i * d  # fp8 weights: [w1; w3] 2 x I x D and w2 D x I per active expert

        def unsplit(cfg, x, ids, tw):
            routing = M.moe_routing(ids, e, M.choose_block_m(t, k, e), direct=True)
            (s_ids, e_ids, npp), direct_ids = routing
            xq, xs = Q.act_quant(x)
            h = M.grouped_gemm(xq, w13, s_ids, e_ids, npp, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True,
                               out_dtype=x.dtype, direct_ids=direct_ids, config=cfg)
            hq, hs = Q.act_quant(h)
            y = M.grouped_gemm(hq, w2, s_ids, e_ids, npp, 1, a_scale=hs, w_scale=w2s, topk_weights=tw,
                               out_dtype=x.dtype, direct_ids=direct_ids, config=cfg)
            return y.view(t, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)

        def split(cfg, split_k, x, ids, tw):
            routing = M.moe_routing(ids, e, M.choose_block_m(t, k, e), direct=True)

            def run(spec):
                if spec is not None:
                    launch(*spec, cfg if spec.kernel is M._grouped_gemm_kernel else None)

            return S.split_experts(run, x, w13, w2, tw, routing, k, split_k, w13_scale=w13s, w2_scale=w2s)

        def timed(fn):
            if not gpu:
                return bench(lambda: [fn(*c[:3]) for c in calls], sh, quick) / len(calls)
            graph = _graph_of(lambda: [fn(*c[:3]) for c in calls])
            return bench(graph.replay, sh, quick) / len(calls)

        case = f"fp8 MoE T={t} E={e} k={k} D={d} I={i}, {len(calls)} routings per graph"
        want = [unsplit(configs[0], *c[:3]).float() for c in calls]
        for cfg in configs if t == 1 else configs[:2]:
            tile = f"BN={cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
            rows = []

            def one(label, fn):
                err = max(mean_rel(fn(*c[:3]).float(), w) for c, w in zip(calls, want))
                return add(report, Row("moe_split", case, label, timed(fn), error=err, tol=TOL, ok=err < TOL,
                                       note=f"{active:.0f} experts active per call"), bytes_=nbytes)

            base = guarded(report, f"moe_split {case} {tile} unsplit",
                           lambda: one(f"direct unsplit {tile}", lambda *a: unsplit(cfg, *a)))
            rows.append(base)
            for su, sd in splits if t == 1 else ((4, 2),):
                row = guarded(report, f"moe_split {case} {tile} split {su},{sd}",
                              lambda su=su, sd=sd: one(f"split {su},{sd} {tile}",
                                                       lambda *a: split(cfg, (su, sd), *a)))
                if row is not None and base is not None and row.ms:
                    row.note += f"; x{base.ms / row.ms:.2f} vs unsplit {tile}"
                rows.append(row)
            show(f"{case} {tile}", [r for r in rows if r])
