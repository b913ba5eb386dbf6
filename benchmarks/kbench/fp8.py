"""Sections `fp8` and `fp8_prefill`: the blockwise fp8 GEMM (kernels/fp8_gemm.py, and at prefill M
the Hopper TMA + persistent candidates of kernels/fp8_gemm_persistent.py, each config pinned)
against torch._scaled_mm with 1x128 x 128x128 block scales (per-tensor scales if the blockwise form
is refused, and the row says so) and F.linear on the dequantized bf16 weight; also fp8_linear
(act_quant + GEMM) and the weight-only form, and at decode M the GEMMs from CUDA graphs.

The _scaled_mm baseline's operands are zero-padded outside the timing (K to a multiple of 512, M to
16 rows: _blockwise_operands says why); zero rows and columns add nothing to the product.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from kbench.common import (BF16_PEAK, FP8_PEAK, Report, Row, Shapes, _graph_of, add, bench, finish_group, guarded,
                            mean_rel, show)


def _scaled_mm_blockwise(a, scale_a, b, scale_b):
    """torch._scaled_mm with 1x128 (a) x 128x128 (b) block scales, operands from _blockwise_operands."""
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


def _pad_k(t: torch.Tensor, multiple: int = 128) -> torch.Tensor:
    """fp8 [R, K] -> [R, ceil(K/multiple)*multiple] with zero columns (fp8 0x00 is +0.0)."""
    pad = -t.shape[1] % multiple
    if not pad:
        return t
    return F.pad(t.view(torch.uint8), (0, pad)).view(t.dtype)


# cuBLAS reads a 128x128 block-scale tensor with a leading dimension of L4 = round_up(ceil(K/128), 4)
# (cuBLAS docs, "1D and 128x128 2D block scaling for FP8"; torch's test_scaled_matmul_cuda.py pads
# the scales with _pad_128x128_scales; newer torch checks for that stride). torch 2.11 accepted the
# unpadded stride ceil(K/128), so K=10944 (86 blocks, presumably read as if rows were 88 apart)
# gave garbage (mean rel err 2.27) even with K padded to 11008. Padding K to a multiple of
# 4 * 128 = 512 makes every reading agree: L = L4.
BLOCKWISE_K_MULTIPLE = 512
# cuBLAS refused blockwise scaling at M=1 (CUBLAS_STATUS_NOT_SUPPORTED): the M-major 1x128 scales
# need an aligned leading dimension, so M is zero-padded to a multiple of 16 rows.
BLOCKWISE_M_MULTIPLE = 16


def _blockwise_operands(a, a_s, w, w_s):
    """(a, scale_a, w, scale_b) in the layout torch._scaled_mm's blockwise path wants, padded so
    the product of the first M rows is unchanged (zero rows/columns, unit scales on the pad):
      a       fp8 [M', K'] (M' = round_up(M, 16), K' = round_up(K, 512))
      scale_a fp32 [M', K'/128], outer-dim-major (strides (1, M')): the 1x128 activation scales
      w       fp8 [N, K']
      scale_b fp32 [K'/128, ceil(N/128)] = the [ceil(N/128), K'/128] weight scales transposed
    """
    m, n = a.shape[0], w.shape[0]
    a_p, w_p = _pad_k(a, BLOCKWISE_K_MULTIPLE), _pad_k(w, BLOCKWISE_K_MULTIPLE)
    m_pad, l_pad = -m % BLOCKWISE_M_MULTIPLE, a_p.shape[1] // 128 - a_s.shape[1]
    if m_pad:
        a_p = F.pad(a_p.view(torch.uint8), (0, 0, 0, m_pad)).view(a.dtype)
    a_s_p = F.pad(a_s, (0, l_pad, 0, m_pad), value=1.0)  # [M', K'/128]
    w_s_p = F.pad(w_s, (0, l_pad), value=1.0).contiguous()  # [ceil(N/128), K'/128]
    assert w_s_p.shape[0] == -(-n // 128)
    return a_p, a_s_p.t().contiguous().t(), w_p, w_s_p.t()


def _scaled_mm_tensorwise(a, b):
    one = torch.ones((), device=a.device)
    return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def _fp8_choice(m: int, n: int, k: int, device: str, a_fp8: bool = True) -> str:
    """The tile set, split-K and the config fp8_gemm's autotuner used for its last launch, or the decode kernel's tile
    where fp8_gemm handed the call to kernels/fp8_gemm_decode.py (W8A8 decode, K not split)."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels import fp8_gemm_decode as D

    shape_class = "decode" if m <= G.DECODE_MAX_M else "prefill"
    k_blocks = -(-k // 128)
    split, _ = G.rounded_split(G._choose_split_k(m, n, k_blocks, torch.device(device)) if shape_class == "decode"
                               else 1, k_blocks)
    if shape_class == "decode" and G.takes_decode_kernel(a_fp8, split):
        tile = D.tile_for(m)
        ctas = -(-n // D.CONFIG.kwargs["BLOCK_N"]) * -(-m // tile["BLOCK_M"])
        return (f"fp8_gemm_decode {'swapped' if tile['SWAP_AB'] else 'direct'} BLOCK_M={tile['BLOCK_M']} "
                f"{G.config_label(D.CONFIG)}, {ctas} CTAs")
    cfg = G.tuned_config(shape_class) or (G.DECODE_CONFIGS if shape_class == "decode" else G.PREFILL_CONFIGS)[0]
    tiles = -(-m // cfg.kwargs["BLOCK_M"]) * -(-n // cfg.kwargs["BLOCK_N"])
    return f"{shape_class} config {G.config_label(cfg)}, split_k {split}, {tiles * split} CTAs"


def _fp8_tuning(shape_class: str, top: int = 4) -> str:
    """The autotuner's timings for the key it tuned last (the first call of a new shape), fastest
    first: what the runner-up configs cost, for the next round of config choices."""
    from dsv3_export.kernels import fp8_gemm as G

    tuned = G._fp8_gemm_decode_tuned if shape_class == "decode" else G._fp8_gemm_prefill_tuned
    timings = getattr(tuned, "configs_timings", None) or {}
    ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], (list, tuple)) else kv[1])
    return "; ".join(f"{G.config_label(c)}: {(t[0] if isinstance(t, (list, tuple)) else t):.4f} ms"
                     for c, t in ranked[:top])


def _fp8_variant_rows(report: Report, case: str, operands, ref, sh: Shapes, quick: bool, bytes_: float,
                      flops: float) -> list:
    """Prefill candidates beside the default kernel, in the same process: fp8_gemm(variant=
    "tma_persistent") with each of its configs pinned (checked, then timed), then autotuned over
    them (the path fp8_gemm would take if it became the default). Each row prints as soon as it
    is timed, so a config that fails or hangs on the GPU leaves the earlier ones on stdout."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels import fp8_gemm_persistent as P

    a, a_s, w, w_s = operands
    m, n = a.shape[0], w.shape[0]
    reason = P.tma_unsupported(a, w, torch.bfloat16, n)
    if reason:
        print(f"  {case}: tma_persistent skipped: {reason}", flush=True)
        return []
    rows = []
    gluon_reason = _gluon_unsupported(a, w, torch.bfloat16)

    def gluon_row():
        run = lambda: G.fp8_gemm(a, a_s, w, w_s, variant="gluon")  # noqa: E731
        err = mean_rel(run().float(), ref)
        return add(report, Row("fp8_gemm", case, "gluon fp8_gemm (warp-specialized)", bench(run, sh, quick),
                               error=err, tol=5e-3, ok=err < 5e-3, note="fp8_gemm(variant='gluon')"),
                   bytes_=bytes_, flops=flops, peak=FP8_PEAK)

    if gluon_reason:
        print(f"  {case}: gluon skipped: {gluon_reason}", flush=True)
    else:
        rows.append(guarded(report, f"{case} gluon", gluon_row))
    for cfg in [*P.TMA_PERSISTENT_CONFIGS, None]:
        def timed(cfg=cfg):
            run = lambda: G.fp8_gemm(a, a_s, w, w_s, variant="tma_persistent", config=cfg)  # noqa: E731
            err = mean_rel(run().float(), ref)
            used = cfg or P.tuned_config() or P.TMA_PERSISTENT_CONFIGS[0]
            tiles = -(-m // used.kwargs["BLOCK_M"]) * -(-n // used.kwargs["BLOCK_N"])
            grid = min(tiles, G.num_sms(torch.device(sh.device)) * used.kwargs["CTAS_PER_SM"])
            kw = used.kwargs  # the summary table shows ~35 characters of impl: keep the tile in them
            impl = (f"triton fp8 tma {kw['BLOCK_M']}x{kw['BLOCK_N']} w{used.num_warps} s{used.num_stages}"
                    if cfg else "triton fp8 tma autotuned")
            note = f"config {G.config_label(used)}, {tiles} tiles on {grid} persistent CTAs"
            row = add(report, Row("fp8_gemm", case, impl, bench(run, sh, quick), error=err, tol=5e-3, ok=err < 5e-3,
                                  note=note), bytes_=bytes_, flops=flops, peak=FP8_PEAK)
            print(f"  {case}: {impl} {row.ms:.4f} ms, {row.tflops or 0:.0f} TFLOP/s, err {err:.2e}; {note}",
                  flush=True)
            return row

        rows.append(guarded(report, f"{case} tma_persistent {G.config_label(cfg) if cfg else 'autotuned'}", timed))
    return rows


def bench_fp8_gemm(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, fp8_linear
    from dsv3_export.reference import fp8 as R

    shapes = [("w1/w3 mlp", sh.inter, sh.dim), ("w2 mlp", sh.dim, sh.inter),
              ("wkv_a", sh.kv_lora + sh.rope, sh.dim), ("wo", sh.dim, sh.dim)]
    if quick:
        shapes = shapes[:2]
    for label, n, k in shapes:
        w, w_s = R.weight_quant(torch.randn(n, k, device=sh.device) / k**0.5)
        w_dense = R.weight_dequant(w, w_s, torch.bfloat16)
        for m in (*sh.decode_m, sh.prefill_m):
            case = f"{label} M={m} N={n} K={k}"
            x = torch.randn(m, k, device=sh.device, dtype=torch.bfloat16)
            a, a_s = R.act_quant(x)
            bytes_ = m * k + a_s.numel() * 4 + n * k + w_s.numel() * 4 + m * n * 2
            flops = 2 * m * n * k
            ref = fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
            err = mean_rel(fp8_gemm(a, a_s, w, w_s).float(), ref)
            choice = _fp8_choice(m, n, k, sh.device)  # the autotuner's pick for this shape (first call above)
            rows = [add(report, Row("fp8_gemm", case, "triton fp8_gemm",
                                    bench(lambda: fp8_gemm(a, a_s, w, w_s), sh, quick), error=err, tol=5e-3,
                                    ok=err < 5e-3, note=choice), bytes_=bytes_, flops=flops, peak=FP8_PEAK)]
            print(f"  {case}: triton fp8_gemm {choice}", flush=True)
            decode = m <= G.DECODE_MAX_M
            if sh.device == "cuda":
                print(f"    autotuner timings: {_fp8_tuning('decode' if decode else 'prefill')}", flush=True)
            if m == sh.prefill_m:  # the prefill candidates (sh.prefill_m is 24 in the CPU smoke test)
                rows += _fp8_variant_rows(report, case, (a, a_s, w, w_s), ref, sh, quick, bytes_, flops)

            def blockwise():
                # Padded (K to a multiple of 512, M to 16 rows) outside the timing: _blockwise_operands.
                a_p, s_a, w_p, s_b = _blockwise_operands(a, a_s, w, w_s)
                e = mean_rel(_scaled_mm_blockwise(a_p, s_a, w_p, s_b)[:m].float(), ref)
                pads = [f"K zero-padded to {a_p.shape[1]}" if a_p.shape[1] != k else "",
                        f"M zero-padded to {a_p.shape[0]}" if a_p.shape[0] != m else ""]
                return add(report, Row("fp8_gemm", case, "torch._scaled_mm blockwise",
                                       bench(lambda: _scaled_mm_blockwise(a_p, s_a, w_p, s_b), sh, quick),
                                       error=e, tol=5e-3, ok=e < 5e-3, note="; ".join(p for p in pads if p)),
                           bytes_=bytes_, flops=flops, peak=FP8_PEAK)

            def tensorwise(reason: str):
                return add(report, Row("fp8_gemm", case, "torch._scaled_mm tensorwise",
                                       bench(lambda: _scaled_mm_tensorwise(a, w), sh, quick),
                                       note=f"blockwise refused ({reason}): per-tensor fallback, less work than ours"),
                           bytes_=bytes_, flops=flops, peak=FP8_PEAK)

            try:
                rows.append(blockwise())
            except Exception as e:  # noqa: BLE001 - the refusal itself is the finding; fall back
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(guarded(report, f"{case} _scaled_mm tensorwise", lambda: tensorwise(reason)))
            rows.append(add(report, Row("fp8_gemm", case, "torch F.linear bf16 (dense weight)",
                                        bench(lambda: F.linear(x, w_dense), sh, quick)),
                            bytes_=m * k * 2 + n * k * 2 + m * n * 2, flops=flops, peak=BF16_PEAK))
            rows.append(add(report, Row("fp8_gemm", case, "triton fp8_linear (act_quant + gemm)",
                                        bench(lambda: fp8_linear(x, w, w_s), sh, quick)),
                            bytes_=bytes_ + m * k * 2, flops=flops, peak=FP8_PEAK))
            wo_err = mean_rel(fp8_gemm(x, None, w, w_s).float(), fp8_gemm_ref(x, None, w, w_s, torch.float32))
            wo_choice = _fp8_choice(m, n, k, sh.device, a_fp8=False)
            rows.append(add(report, Row("fp8_gemm", case, "triton fp8_gemm weight-only (W8A16)",
                                        bench(lambda: fp8_gemm(x, None, w, w_s), sh, quick), error=wo_err,
                                        tol=5e-3, ok=wo_err < 5e-3, note=wo_choice),
                            bytes_=m * k * 2 + n * k + w_s.numel() * 4 + m * n * 2, flops=flops, peak=BF16_PEAK))
            if decode and sh.device == "cuda":
                # A decode step runs from a CUDA graph / AOTInductor: the kernels alone, without the
                # host's checks and launches that do_bench around the Python call also times.
                graphed = [("triton fp8_gemm (CUDA graph)", lambda: fp8_gemm(a, a_s, w, w_s), FP8_PEAK, choice),
                           ("triton fp8_linear (CUDA graph)", lambda: fp8_linear(x, w, w_s), FP8_PEAK, "")]
                if any(r is not None and r.impl == "torch._scaled_mm blockwise" and r.ok for r in rows):
                    a_p, s_a, w_p, s_b = _blockwise_operands(a, a_s, w, w_s)
                    graphed.append(("torch._scaled_mm blockwise (CUDA graph)",
                                    lambda: _scaled_mm_blockwise(a_p, s_a, w_p, s_b), FP8_PEAK, ""))
                for impl, fn, peak, note in graphed:
                    def timed(impl=impl, fn=fn, peak=peak, note=note):
                        graph = _graph_of(fn)
                        return add(report, Row("fp8_gemm", case, impl, bench(graph.replay, sh, quick), note=note),
                                   bytes_=bytes_, flops=flops, peak=peak)

                    rows.append(guarded(report, f"{case} {impl}", timed))
            rows = [r for r in rows if r is not None]
            finish_group(rows)
            show(case, rows)


def _gluon_unsupported(a, w, out_dtype) -> str | None:
    """Why the Gluon candidate cannot run here (it has no CPU interpreter), or None."""
    if a.device.type != "cuda":
        return "Gluon kernels have no CPU interpreter"
    from dsv3_export.kernels.fp8_gemm_gluon import gluon_unsupported

    return gluon_unsupported(a, w, out_dtype)


# kernels/fp8_gemm_gluon.py: None is its default, warp-specialized form (a TMA producer warp, two consumer
# warpgroups); tuples (BLOCK_M, K blocks per loop iteration, stages, GROUP_M) its single-partition form, persistent:
# 128 rows on two warpgroups (one CTA per SM, 2/3 of the L2 -> SM bytes per flop of 64x128 tiles) or 64 on one (two
# CTAs per SM). Session 28 also timed 5 and 6 stages, 4 blocks per iteration and GROUP_M 4 / 16 (none better) and
# one tile per CTA (0.75x at w1/w3); benchmarks/fp8_gluon_probe.py sweeps the warp-specialized form (--ws-rounds:
# against blockwise _scaled_mm in alternation), whose default became 5 stages and 4 blocks per iteration in
# session 29.
GLUON_CANDIDATES = (None, (128, 2, 4, 8), (64, 2, 4, 8))


def _gluon_gemm(a, a_s, w, w_s, out_dtype, cfg, a_s_tma=None):
    """cfg None: the warp-specialized form, on a_s_tma (fp8_gemm_gluon_ws.scales_for_tma(a_s), made once outside the
    timing as _blockwise_operands makes cuBLAS's; act_quant(..., outer_scales=True) writes them so) when given.
    Else the single-partition form, on row-major a_s (its global loads of outer-dim-major scales miss L1)."""
    from dsv3_export.kernels.fp8_gemm_gluon import fp8_gemm_gluon

    if cfg is None:
        return fp8_gemm_gluon(a, a_s if a_s_tma is None else a_s_tma, w, w_s, out_dtype)
    block_m, unroll, stages, group_m = cfg
    return fp8_gemm_gluon(a, a_s, w, w_s, out_dtype, unroll=unroll, block_m=block_m, stages=stages, group_m=group_m,
                          warp_specialized=False)


def _gluon_label(cfg) -> str:
    if cfg is None:
        return "gluon ws 128x128 (default)"
    block_m, unroll, stages, group_m = cfg
    return f"gluon {block_m}x128 s{stages} u{unroll} g{group_m}"


def against_blockwise_in_graphs(a, a_s, w, w_s, ours, rounds: int, flush: str):
    """ours() (an fp8 GEMM of a and w) and blockwise _scaled_mm of the same operands, each captured in a CUDA graph,
    timed in alternation for `rounds` rounds (_timing.interleaved_ms): (blockwise ms per round, ours ms per round,
    the per-round ratios blockwise / ours sorted, the tensor ours' replays wrote)."""
    base_ms, timed = several_against_blockwise_in_graphs(a, a_s, w, w_s, {"ours": ours}, rounds, flush)
    ours_ms, ratios, written = timed["ours"]
    return base_ms, ours_ms, ratios, written


def several_against_blockwise_in_graphs(a, a_s, w, w_s, candidates: dict, rounds: int, flush: str):
    """Blockwise _scaled_mm and each candidate (name -> an fp8 GEMM of a and w), each captured in a CUDA graph, all
    timed round-robin for `rounds` rounds: (blockwise ms per round, {name: (ms per round, the per-round ratios
    blockwise / it sorted, the tensor its replays wrote)})."""
    from _timing import interleaved_ms  # benchmarks/_timing.py

    if "blockwise" in candidates:
        raise ValueError("several_against_blockwise_in_graphs: 'blockwise' names the baseline; rename the candidate")
    a_p, s_a, w_p, s_b = _blockwise_operands(a, a_s, w, w_s)
    written: dict[str, list] = {name: [] for name in candidates}
    graphs = {"blockwise": _graph_of(lambda: _scaled_mm_blockwise(a_p, s_a, w_p, s_b)).replay}
    graphs.update({name: _graph_of(fn, written[name]).replay for name, fn in candidates.items()})
    times = interleaved_ms(graphs, flush, rounds=rounds)
    base = times["blockwise"]
    return base, {name: (times[name], sorted(b / mine for b, mine in zip(base, times[name])), written[name][0])
                  for name in candidates}


def _graphed_rows(report: Report, case: str, operands, a_s_tma, ref, out_dtype, quick: bool, bytes_: float,
                  flops: float) -> list[Row]:
    """Blockwise _scaled_mm, the Gluon kernel's default form and fp8_gemm's default kernel (the Triton GEMM a package
    runs where it does not take cuBLAS) from CUDA graphs, each of ours timed in alternation with blockwise _scaled_mm
    alone (_timing.interleaved_ms, a pair per candidate): with three in the rotation, the GEMM after the slow Triton
    one starts cooler, which moved w2's Gluon ratio by 4-6% (0.951-0.961x in threes, 0.98-1.02x in pairs: sessions
    32 and 34). The eager rows also time the host's launch path, which for the Gluon kernel (three TMA descriptors
    and Gluon's launcher in Python: up to ~200 us per call on the H200's host in session 29, 100-130 us once the
    launcher kept its layouts) can exceed the L2 flush plus the kernel, leaving the GPU idle inside the timed window
    (at the attention's small GEMMs, ~20-35 us of GPU work, always); and rows timed minutes apart see the clocks drift
    (5% between rounds). a_s_tma: the warp-specialized form's scales (_gluon_gemm)."""
    from dsv3_export.kernels import fp8_gemm as G
    from kbench import common

    a, a_s, w, w_s = operands
    m = a.shape[0]
    rounds = 3 if quick else 7
    candidates = {f"{_gluon_label(None)} (CUDA graph)": lambda: _gluon_gemm(a, a_s, w, w_s, out_dtype, None, a_s_tma),
                  "triton fp8_gemm (CUDA graph)": lambda: G.fp8_gemm(a, a_s, w, w_s, out_dtype)}
    pairs = {name: several_against_blockwise_in_graphs(a, a_s, w, w_s, {name: fn}, rounds, common.L2_FLUSH)
             for name, fn in candidates.items()}
    first_base_ms = next(iter(pairs.values()))[0]
    rows = [add(report, Row("fp8_prefill", case, "torch._scaled_mm blockwise (CUDA graph)",
                            statistics.median(first_base_ms),
                            note=f"{rounds} rounds alternating with the Gluon graph row"),
                bytes_=bytes_, flops=flops, peak=FP8_PEAK)]
    for name, (_, timed) in pairs.items():
        ms, ratios, written = timed[name]
        note = (f"{rounds} rounds alternating with blockwise _scaled_mm's graph; per round: median "
                f"{statistics.median(ratios):.3f}x, range {ratios[0]:.3f}-{ratios[-1]:.3f}x")
        err = mean_rel(written[:m].float(), ref)  # what the replays wrote
        rows.append(add(report, Row("fp8_prefill", case, name, statistics.median(ms), error=err, tol=1e-3,
                                    ok=err < 1e-3, note=note), bytes_=bytes_, flops=flops, peak=FP8_PEAK))
        print(f"  {case}: CUDA graphs, {name.removesuffix(' (CUDA graph)')}: {note}", flush=True)
    return rows


def bench_fp8_prefill(report: Report, sh: Shapes, quick: bool) -> None:
    """fp8 GEMM at the 16b prefill shapes (w1/w3, w2 at M=4096; with --full also wq+wkv_a, wo and wkv_a): every
    PREFILL_CANDIDATES config of the TMA + persistent kernel pinned (one compile each, no autotuning) and the default
    kernel's session-5 winner, vs blockwise torch._scaled_mm. Each row is checked on its own timed bf16
    output against the fp32 reference rounded to bf16: a right kernel differs only where its fp32
    sum rounds the other way (mean rel. error ~1e-6), so < 1e-3 flags a wrong one (the removed
    warp-specialized loop was at 0.11). The CPU smoke test checks fp32 outputs instead (the
    interpreter truncates fp32 -> bf16)."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels import fp8_gemm_persistent as P
    from dsv3_export.reference import fp8 as R

    m = sh.prefill_m
    out_dtype = torch.bfloat16 if sh.device == "cuda" else torch.float32
    shapes = [("w1/w3 mlp", sh.inter, sh.dim), ("w2 mlp", sh.dim, sh.inter)]
    if not quick:  # the attention's Linears as the packages run them (wq + wkv_a fused), and wkv_a alone
        from kbench.gemv import _linear_shapes

        shapes += [(f"{name} attn", n, k) for name, n, k in _linear_shapes(sh)[:2]]
        shapes.append(("wkv_a attn", sh.kv_lora + sh.rope, sh.dim))
    for label, n, k in shapes:
        case = f"prefill {label} M={m} N={n} K={k}"
        w, w_s = R.weight_quant(torch.randn(n, k, device=sh.device) / k**0.5)
        a, a_s = R.act_quant(torch.randn(m, k, device=sh.device, dtype=torch.bfloat16))
        ref32 = G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
        ref = ref32.to(out_dtype).float()  # what a right kernel stores
        bytes_, flops = m * k + a_s.numel() * 4 + n * k + w_s.numel() * 4 + m * n * 2, 2 * m * n * k
        rows = []

        def ours(impl: str, run, note: str) -> Row:
            err = mean_rel(run().float(), ref)
            row = add(report, Row("fp8_prefill", case, impl, bench(run, sh, quick), error=err, tol=1e-3,
                                  ok=err < 1e-3, note=note), bytes_=bytes_, flops=flops, peak=FP8_PEAK)
            print(f"  {case}: {impl} {row.ms:.4f} ms, {row.tflops or 0:.0f} TFLOP/s, err {err:.2e}; {note}", flush=True)
            return row

        def baseline() -> Row:
            try:
                a_p, s_a, w_p, s_b = _blockwise_operands(a, a_s, w, w_s)
                e = mean_rel(_scaled_mm_blockwise(a_p, s_a, w_p, s_b)[:m].float(), ref32)
                impl, fn = "torch._scaled_mm blockwise", lambda: _scaled_mm_blockwise(a_p, s_a, w_p, s_b)
            except Exception as exc:  # noqa: BLE001 - refused (the CPU): the per-tensor form, and say so
                e, impl, fn = None, "torch._scaled_mm tensorwise", lambda: _scaled_mm_tensorwise(a, w)
                print(f"  {case}: blockwise _scaled_mm refused ({type(exc).__name__}), per-tensor instead", flush=True)
            return add(report, Row("fp8_prefill", case, impl, bench(fn, sh, quick), error=e, tol=5e-3,
                                   ok=None if e is None else e < 5e-3, note="vs the fp32 reference"),
                       bytes_=bytes_, flops=flops, peak=FP8_PEAK)

        rows.append(guarded(report, f"{case} _scaled_mm", baseline))
        # the default kernel's pick at w1/w3 in session 5 (64x128 w4 s3 maxnreg 168), pinned
        dflt = next((c for c in G.PREFILL_CONFIGS if c.maxnreg), G.PREFILL_CONFIGS[0])
        dkw = dflt.kwargs
        rows.append(guarded(report, f"{case} default", lambda: ours(
            f"triton fp8_gemm {dkw['BLOCK_M']}x{dkw['BLOCK_N']} s{dflt.num_stages}"
            + (f" r{dflt.maxnreg}" if dflt.maxnreg else ""),
            lambda: G.fp8_gemm(a, a_s, w, w_s, out_dtype, config=dflt), f"default kernel, config {G.config_label(dflt)}")))
        reason = P.tma_unsupported(a, w, out_dtype, n)
        for name, cfg in P.PREFILL_CANDIDATES.items() if not reason else ():
            kw = cfg.kwargs
            tiles = -(-m // kw["BLOCK_M"]) * -(-n // kw["BLOCK_N"])
            grid = min(tiles, G.num_sms(torch.device(sh.device)) * kw["CTAS_PER_SM"])
            rows.append(guarded(report, f"{case} tma {name}", lambda name=name, cfg=cfg, tiles=tiles, grid=grid: ours(
                f"triton tma {name}", lambda: G.fp8_gemm(a, a_s, w, w_s, out_dtype, variant="tma_persistent", config=cfg),
                f"config {G.config_label(cfg)}, {tiles} tiles on {grid} persistent CTAs")))
        if reason:
            print(f"  {case}: tma candidates skipped: {reason}", flush=True)
        gluon_reason = _gluon_unsupported(a, w, out_dtype)
        if not gluon_reason:
            from dsv3_export.kernels.fp8_gemm_gluon_ws import scales_for_tma

            a_s_tma = scales_for_tma(a_s)
        for cfg in GLUON_CANDIDATES if not gluon_reason else ():
            name = _gluon_label(cfg)
            rows.append(guarded(report, f"{case} {name}", lambda name=name, cfg=cfg: ours(
                name, lambda: _gluon_gemm(a, a_s, w, w_s, out_dtype, cfg, a_s_tma),
                "kernels/fp8_gemm_gluon.py" + (", single partition" if cfg else ", warp-specialized"))))
        if gluon_reason:
            print(f"  {case}: gluon candidates skipped: {gluon_reason}", flush=True)
        if sh.device == "cuda" and not gluon_reason and any(r is not None and r.impl == "torch._scaled_mm blockwise"
                                                            and r.ok for r in rows):
            rows += guarded(report, f"{case} CUDA graphs", lambda: _graphed_rows(
                report, case, (a, a_s, w, w_s), a_s_tma, ref, out_dtype, quick, bytes_, flops)) or []
        rows = [r for r in rows if r is not None]
        finish_group(rows)
        show(case, rows)
