"""Sections `absorb`, `absorb_q` and `tail`: MLA decode's projections around the attention kernel.
  absorb    kernels/mla_absorb.py head_gemm (q_nope @ W_UK, lat @ W_UV per head, one launch on the
            strided views) against the einsums it replaces
  absorb_q  kernels/mla_absorb.py head_gemm_quant (W_UV with wo's act_quant in its epilogue, one launch)
            against head_gemm + act_quant, bit for bit (DSV3_TORCH_MLA_TAIL=gemmq)
  tail    kernels/mla_tail.py (merge of the split partials + W_UV + wo's act_quant in one launch)
          against the current path (reduce + head_gemm + act_quant), both after the same split kernel
On the GPU also (absorb) or only (tail) from CUDA graphs, checked on the graph's own output.
"""

from __future__ import annotations

import torch

from kbench.common import Report, Row, Shapes, _graph_of, add, bench, finish_group, guarded, mean_rel, show


# MLA's absorbed projections at the 16b head dims (qk_nope_head_dim, v_head_dim); the CPU smoke
# test's dims are off the kernel's blocks.
ABSORB_HEAD_DIMS = {"cuda": (128, 128), "cpu": (40, 24)}
ABSORB_TOL = 1e-2  # mean rel err vs the bf16 einsum: both round an fp32 sum to bf16


def bench_absorb(report: Report, sh: Shapes, quick: bool) -> None:
    """The decode program's absorbed MLA projections, q_nope @ W_UK and lat @ W_UV per head:
    kernels/mla_absorb.py head_gemm (one launch on the strided q_nope slice and the wkv_b views)
    against the einsums it replaces (Inductor / eager torch: permute copy + bmm + copy). On the GPU
    both also from CUDA graphs (the decode step's form), checked on the graph's own output."""
    from dsv3_export.kernels.mla_absorb import head_gemm

    h, c = sh.n_heads, sh.kv_lora
    dn, dv = ABSORB_HEAD_DIMS[sh.device]
    w = (torch.randn(h * (dn + dv), c, device=sh.device) * c**-0.5).bfloat16().view(h, dn + dv, c)  # [h, dn + dv, c]
    w_uk, w_uv = w[:, :dn], w[:, dn:]  # [h, dn, c], [h, dv, c]
    for m in ((1, 8, 64) if sh.device == "cuda" else sh.decode_m):
        q = torch.randn(m, 1, h, dn + sh.rope, device=sh.device).bfloat16()  # the q projection [b, 1, h, dn + r]
        q_nope = q[..., :dn]  # [b, 1, h, dn], strided
        lat = torch.randn(m, h, c, device=sh.device).bfloat16()  # mla_decode's output [b, h, c]
        projections = (
            ("W_UK", dn, c, lambda: head_gemm(q_nope[:, 0], w_uk),  # [b, h, c]
             lambda: torch.einsum("bshd,hdc->bshc", q_nope, w_uk).contiguous()),  # [b, 1, h, c]
            ("W_UV", c, dv, lambda: head_gemm(lat, w_uv.transpose(1, 2)),  # [b, h, dv]
             lambda: torch.einsum("bshc,hdc->bshd", lat[:, None], w_uv)),  # [b, 1, h, dv]
        )
        for name, k, n, ours, theirs in projections:
            case = f"{name} M={m} H={h} K={k} N={n}"
            bytes_, flops = 2 * (h * k * n + m * h * (k + n)), 2 * m * h * k * n
            ref = theirs().float().view(m, h, n)

            def checked(impl: str, fn, graph: bool):
                out = []
                timed = _graph_of(lambda: out.append(fn()) or out[-1]).replay if graph else fn
                ms = bench(timed, sh, quick)
                err = mean_rel((out[-1] if graph else fn()).float().view(m, h, n), ref)
                return add(report, Row("absorb", case, impl, ms, error=err, tol=ABSORB_TOL, ok=err < ABSORB_TOL),
                           bytes_=bytes_, flops=flops)

            rows = [guarded(report, f"absorb {case} triton", lambda: checked("triton head_gemm", ours, False)),
                    guarded(report, f"absorb {case} torch", lambda: checked("torch einsum", theirs, False))]
            if sh.device == "cuda":
                rows += [guarded(report, f"absorb {case} triton graph",
                                 lambda: checked("triton head_gemm (CUDA graph)", ours, True)),
                         guarded(report, f"absorb {case} torch graph",
                                 lambda: checked("torch einsum (CUDA graph)", theirs, True))]
            rows = [r for r in rows if r]
            finish_group(rows)
            show(case, rows)


# MLA decode's tail: the 16b's v_head_dim (one 1x128 act_quant block per head) and context; CPU smoke dims.
TAIL_DIMS = {"cuda": (128, 1024, (1, 8, 64)), "cpu": (40, 70, (1, 3))}  # (qk_nope_head_dim, context, batches)
TAIL_TOL = 1e-2  # mean rel err of dequantized q x s vs the current path: rare one-step fp8 flips only


def bench_tail(report: Report, sh: Shapes, quick: bool) -> None:
    """MLA decode's tail (kernels/mla_tail.py: merge of the split partials + W_UV + wo's act_quant, one
    launch, each config pinned) against the fp8 decode program's current path (reduce + head_gemm +
    act_quant), both after the same split kernel under the runtime split rule (its config pinned to
    DECODE_CONFIGS[0] in all three: no split-kernel autotuning here), from CUDA graphs on the GPU;
    `split only` is the split kernel alone, so tail cost = total - split. head_gemm and act_quant
    autotune as in the engine (already tuned if `absorb` ran first). Error: dequantized q x s against
    the current path's."""
    from dsv3_export.kernels import mla_decode as kd
    from dsv3_export.kernels import mla_tail as kt
    from dsv3_export.kernels._common import launch
    from dsv3_export.kernels.fp8_quant import act_quant
    from dsv3_export.kernels.mla_absorb import head_gemm

    h, c, r, dv = sh.n_heads, sh.kv_lora, sh.rope, 128
    dn, ctx, batches = TAIL_DIMS[sh.device]
    w_uv = (torch.randn(h * (dn + dv), c, device=sh.device) * c**-0.5).bfloat16().view(h, dn + dv, c)[:, dn:]
    for b in batches:
        cache = torch.randn(b, ctx, c + r, device=sh.device).bfloat16()  # [b, T, c + r]
        kv, pe = cache[..., :c], cache[..., c:]
        q = (torch.randn(b, h, c, device=sh.device) * 0.1).bfloat16()
        qp = (torch.randn(b, h, r, device=sh.device) * 0.1).bfloat16()
        kv_new, pe_new = torch.randn(b, c, device=sh.device).bfloat16(), torch.randn(b, r, device=sh.device).bfloat16()
        seq = torch.full((b,), ctx - 1, dtype=torch.int32, device=sh.device)
        keys = dict(kv_new=kv_new, pe_new=pe_new, runtime_splits=True)
        split_cfg = kd.DECODE_CONFIGS[0]
        splits = kd.runtime_num_splits(b, h, ctx - 1, torch.device(sh.device))
        case = f"B={b} H={h} C={c} DV={dv} ctx={ctx} splits={splits}"

        def current():
            lat = kd.mla_decode(q, qp, kv, pe, seq, sh.softmax_scale, merge="separate", config=split_cfg,
                                **keys)  # [b, h, c]
            return act_quant(head_gemm(lat, w_uv.transpose(1, 2)).view(b, h * dv))  # wo's input, quantized

        def split_only():
            o_part = torch.empty((b, h, kd.MAX_SPLITS, c), dtype=torch.float32, device=sh.device)
            lse = torch.empty((b, h, kd.MAX_SPLITS), dtype=torch.float32, device=sh.device)
            target = kt.runtime_split_target(torch.device(sh.device))
            launch(*kt.decode_partials_spec(q, qp, kv, pe, kv_new, pe_new, seq, o_part, lse, sh.softmax_scale,
                                            target), split_cfg)
            return o_part

        def timed(impl: str, fn, ref=None):
            out = []
            ms = bench(_graph_of(lambda: out.append(fn()) or out[-1]).replay if sh.device == "cuda" else
                       (lambda: out.append(fn())), sh, quick)
            err = None
            if ref is not None:
                got = out[-1][0].float().view(b, h, dv) * out[-1][1].view(b, h, 1)  # dequantized [b, h, dv]
                err = mean_rel(got, ref)
            return add(report, Row("tail", case, impl, ms, error=err, tol=TAIL_TOL if ref is not None else None,
                                   ok=None if err is None else err < TAIL_TOL),
                       bytes_=2 * (b * ctx * (c + r) + h * dv * c))

        q_cur, s_cur = current()
        ref = q_cur.float().view(b, h, dv) * s_cur.view(b, h, 1)
        base = guarded(report, f"tail {case} current", lambda: timed("triton split + reduce + head_gemm + act_quant",
                                                                      current))
        rows = [base, guarded(report, f"tail {case} split", lambda: timed("triton split only", split_only))]
        for cfg in kt.MLA_TAIL_CONFIGS if sh.device == "cuda" else kt.MLA_TAIL_CONFIGS[:1]:
            label = "BLOCK_B={BLOCK_B} BLOCK_K={BLOCK_K}".format(**cfg.kwargs) + f" w{cfg.num_warps} s{cfg.num_stages}"
            row = guarded(report, f"tail {case} {label}", lambda: timed(
                f"triton split + mla_tail {label}",
                lambda: kt.mla_decode_tail(q, qp, kv, pe, seq, sh.softmax_scale, w_uv, config=cfg,
                                           split_config=split_cfg, **keys), ref))
            if row and base and base.ms and row.ms:
                row.speedup_vs_best_alt = base.ms / row.ms  # against the current path
            rows.append(row)
        show(case, [x for x in rows if x])


ABSORB_Q_BATCHES = {"cuda": (1, 8, 64), "cpu": (1, 5)}


def bench_absorb_q(report: Report, sh: Shapes, quick: bool) -> None:
    """W_UV with wo's act_quant (DSV3_TORCH_MLA_TAIL=gemmq): head_gemm_quant (one launch: each head's 128
    outputs are one 1x128 block) against head_gemm + act_quant, both launched as the engine launches them
    (autotune key M = DECODE_MAX_M at every batch), from CUDA graphs on the GPU; then each
    HEAD_GEMM_QUANT_CONFIGS entry pinned. Error: the fraction of fp8 codes and scales whose bits differ
    from the two launches' (must be 0: the engine's numbers may not move); `bits vs N head_gemm
    configs`: how many of HEAD_GEMM_CONFIGS, pinned in head_gemm, give other bits than the fused kernel
    (0: the GPU's sums do not depend on the tile, which the fusion's bit-identity relies on)."""
    import triton

    from dsv3_export.kernels import mla_absorb as ka
    from dsv3_export.kernels._common import FP8_DTYPE, launch
    from dsv3_export.kernels.fp8_quant import act_quant

    h, c, dv, dn = sh.n_heads, sh.kv_lora, 128, 128
    dev = torch.device(sh.device)
    w_uv = (torch.randn(h * (dn + dv), c, device=dev) * c**-0.5).bfloat16().view(h, dn + dv, c)[:, dn:]  # [h, dv, c]
    w = w_uv.transpose(1, 2)  # [h, c, dv], K contiguous: the engine's view
    for m in ABSORB_Q_BATCHES[sh.device]:
        lat = torch.randn(m, h, c, device=dev).bfloat16()  # mla_decode's output [b, h, c]
        case = f"W_UV+quant M={m} H={h} K={c} N={dv}"
        bytes_ = 2 * (h * c * dv + m * h * c) + m * h * (dv + 4)

        def separate(config=None):
            o = torch.empty((m, h, dv), dtype=torch.bfloat16, device=dev)  # [b, h, dv]
            launch(*ka.head_gemm_spec(lat, w, o, ka.DECODE_MAX_M), config)
            return act_quant(o.view(m, h * dv))  # [b, h * dv] -> q, s [b, h]

        def fused(config=None):
            q = torch.empty((m, h * dv), dtype=FP8_DTYPE, device=dev)
            s = torch.empty((m, h), dtype=torch.float32, device=dev)
            launch(*ka.head_gemm_quant_spec(lat, w, q, s, ka.DECODE_MAX_M, lat.is_cuda), config)
            return q, s

        def differing(got, want) -> float:
            """The fraction of codes and scales whose bits differ."""
            bad = (got[0].view(torch.uint8) != want[0].view(torch.uint8)).sum() + (got[1] != want[1]).sum()
            return bad.item() / (got[0].numel() + got[1].numel())

        # the interpreter's dot (numpy) may sum in another order for another tile: there the same tile
        first = ka.HEAD_GEMM_QUANT_CONFIGS[0]
        want = separate(None if sh.device == "cuda" else triton.Config({**first.kwargs, "BLOCK_N": dv}))

        def timed(impl: str, fn, check: bool):
            out = []
            graph = sh.device == "cuda"
            ms = bench(_graph_of(lambda: out.append(fn()) or out[-1]).replay if graph else
                       (lambda: out.append(fn())), sh, quick)
            err = differing(out[-1], want) if check else None
            return add(report, Row("absorb_q", case, impl, ms, error=err, tol=0.0 if check else None,
                                   ok=None if err is None else err == 0), bytes_=bytes_)

        base = guarded(report, f"absorb_q {case} separate",
                       lambda: timed("triton head_gemm + act_quant", separate, False))
        rows = [base]
        configs = [None] + (ka.HEAD_GEMM_QUANT_CONFIGS if sh.device == "cuda" else ka.HEAD_GEMM_QUANT_CONFIGS[:1])
        for cfg in configs:
            label = "autotuned" if cfg is None else (  # BLOCK_M x BLOCK_K, warps, stages (the table keeps 34 chars)
                "{BLOCK_M}x{BLOCK_K}".format(**cfg.kwargs) + f" w{cfg.num_warps}s{cfg.num_stages}")
            row = guarded(report, f"absorb_q {case} {label}",
                          lambda: timed(f"triton gemm_quant {label}", lambda: fused(cfg), True))
            if row and base and base.ms and row.ms:
                row.speedup_vs_best_alt = base.ms / row.ms  # against the two launches
            rows.append(row)
        if sh.device == "cuda":  # the fused kernel's bits against head_gemm under each of its configs
            got = fused()
            off = [f"{cfg.kwargs}" for cfg in ka.HEAD_GEMM_CONFIGS if differing(got, separate(cfg)) > 0]
            impl = f"bits vs {len(ka.HEAD_GEMM_CONFIGS)} head_gemm configs"
            rows.append(add(report, Row("absorb_q", case, impl, error=float(len(off)), tol=0.0, ok=not off,
                                        note="; ".join(off)[:300])))
        show(case, [r for r in rows if r])
