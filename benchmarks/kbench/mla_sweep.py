"""Section `mla_sweep`: which MLA decode variant the GPU prefers. kernels/mla_decode.py's variants
(early loads) and split counts, each point pinned (no autotuning), timed from CUDA graphs (split +
merge together) as % of the copy bandwidth measured in the same run, and checked against
mla_decode_ref on the graph's own output.
"""

from __future__ import annotations

import time

import torch

from kbench.common import Report, Row, Shapes, _graph_of, add, bench, bench_copy, guarded, mean_rel


# mla_sweep: MLA decode's variants (kernels/mla_decode.py DECODE_VARIANTS, configs, split counts), each
# point pinned (variant, splits, config: no autotuning), timed from a CUDA graph (split + merge together)
# and checked on the graph's output. Per (batch, context): whether the last key arrives beside the cache
# (the decode program's form) or in it (comparable with sessions 4-5's B=32 sweeps), and the points, the
# first being what the default does there (the autotuner's pick of sessions 4-5: BN=32 w4 s3 at B>=8,
# BN=64 s2 PREFETCH=2 at B=1). A point is (variant, splits or None for the runtime rule, (BLOCK_N,
# num_warps, num_stages, PREFETCH)), most wanted first: points that would start after MLA_SWEEP_BUDGET_S
# are skipped (and printed). The "tma" variants and the fused merge were removed in session 14 (mla_decode's
# docstring). The CPU smoke test runs the first entries' points at its tiny shapes.
MLA_SWEEP = [
    ((32, 4096), False, [("pointer", 8, (32, 4, 3, 0)), ("lazy", 8, (32, 4, 3, 0))]),
    ((1, 1024), True, [("pointer", None, (64, 4, 2, 2)), ("early", None, (64, 4, 2, 2)), ("lazy", None, (64, 4, 2, 2)),
                       ("pointer", 32, (32, 4, 3, 0)), ("early", 32, (32, 4, 3, 0))]),
    ((8, 4096), True, [("pointer", None, (32, 4, 3, 0)), ("early", None, (32, 4, 3, 0)),
                       ("lazy", None, (32, 4, 3, 0))]),
]
MLA_SWEEP_BUDGET_S = 55.0


def _sweep_config(configs, spec: tuple[int, int, int, int]):
    """The config of `configs` with (BLOCK_N, num_warps, num_stages, PREFETCH) = spec and no register cap."""
    for cfg in configs:
        if (cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages, cfg.kwargs["PREFETCH"]) == spec and not cfg.maxnreg:
            return cfg
    raise LookupError(f"mla_sweep: no decode config BLOCK_N, warps, stages, PREFETCH = {spec}")


def bench_mla_sweep(report: Report, sh: Shapes, quick: bool) -> None:
    """Which MLA decode variant the GPU prefers: % of the copy bandwidth measured in this run, the split +
    merge total from a CUDA graph, the error vs mla_decode_ref; one line per point, the fastest correct
    one per shape last."""
    from dsv3_export.kernels import mla_decode as kd
    from dsv3_export.kernels.mla_attention import mla_decode_ref

    if report.copy_tbps is None:
        bench_copy(report, sh, quick)
    h, c, r_, scale = sh.n_heads, sh.kv_lora, sh.rope, sh.softmax_scale
    t0 = time.time()
    shapes = [shape for shape, _, _ in MLA_SWEEP] if sh.device == "cuda" else sh.mla_decode
    for (bsz, ctx), (_, new_token, points) in zip(shapes, MLA_SWEEP):
        case = f"decode B={bsz} ctx={ctx} H={h} C={c} R={r_}"
        cache = torch.randn(bsz, ctx, c + r_, device=sh.device, dtype=torch.bfloat16)  # [latent | rope] rows
        kv, pe = cache[..., :c], cache[..., c:]
        q = torch.randn(bsz, h, c, device=sh.device, dtype=torch.bfloat16)
        qp = torch.randn(bsz, h, r_, device=sh.device, dtype=torch.bfloat16)
        seqlens = torch.full((bsz,), ctx - new_token, dtype=torch.int32, device=sh.device)
        kw = dict(kv_new=cache[:, -1, :c], pe_new=cache[:, -1, c:]) if new_token else {}
        full = torch.full((bsz,), ctx, dtype=torch.int32, device=sh.device)
        ref = mla_decode_ref(q.float(), qp.float(), kv.float(), pe.float(), full, scale)
        bytes_ = bsz * ctx * (c + r_) * 2 + bsz * h * (2 * c + r_) * 2
        best = None
        for variant, splits, spec in points:
            if time.time() - t0 > MLA_SWEEP_BUDGET_S:
                print(f"    {case} {variant} {splits} {spec}: skipped (the {MLA_SWEEP_BUDGET_S:.0f} s budget)")
                continue
            cfg = _sweep_config(kd.DECODE_CONFIGS, spec)
            split_kw = {"runtime_splits": True} if splits is None else {"num_splits": splits}
            n_splits = kd.runtime_num_splits(bsz, h, ctx - new_token, q.device) if splits is None else splits
            bn, prefetch = cfg.kwargs["BLOCK_N"], cfg.kwargs["PREFETCH"]
            label = (f"{variant} {'runtime ' if splits is None else ''}{n_splits} splits BN={bn} "
                     f"w{cfg.num_warps} s{cfg.num_stages}" + (f" P{prefetch}" if prefetch else ""))

            def call(split_kw=split_kw, cfg=cfg, variant=variant):
                return kd.mla_decode(q, qp, kv, pe, seqlens, scale, config=cfg, variant=variant, **split_kw, **kw)

            def point(call=call, label=label):
                outs = [call()]  # compiles outside any graph
                fn = call
                if sh.device == "cuda":
                    outs = []
                    fn = _graph_of(call, outs).replay
                ms = bench(fn, sh, quick)
                if sh.device == "cuda":
                    torch.cuda.synchronize()
                err = mean_rel(outs[0].float(), ref)  # after every replay
                return add(report, Row("mla_sweep", case, f"triton {label}", ms, error=err, tol=1e-2, ok=err < 1e-2,
                                       note="CUDA graph, split + merge" if sh.device == "cuda" else ""),
                           bytes_=bytes_)

            row = guarded(report, f"mla_sweep {case} {label}", point)
            if row is None:
                continue
            pct = 100 * row.tbps / report.copy_tbps if row.tbps and report.copy_tbps else float("nan")
            print(f"    {case} {label}: {row.ms * 1e3:.1f} us = {pct:.0f}% of copy, err {row.error:.2e}"
                  f"{'' if row.ok else ' WRONG'}", flush=True)
            if row.ok and (best is None or row.ms < best.ms):
                best = row
        if best is not None:
            print(f"  {case}: fastest {best.impl} {best.ms * 1e3:.1f} us (the first point is the default's form)",
                  flush=True)
