"""Benchmark the Triton kernels on one GPU at the 16b shapes, against the best torch alternative.

One invocation = one GPU call (H200, torch 2.11, triton 3.6). For every kernel it first checks
correctness on the GPU at the real shapes (against the pure-torch references), then times it with
triton.testing.do_bench (median) and reports: time, achieved TB/s or TFLOP/s, the roofline floor
(max(bytes / HBM_BW, flops / peak)) and the ratio to the best alternative timed in the same run:
  fp8 GEMM      torch._scaled_mm with 1x128 x 128x128 block scales (per-tensor scales if the
                blockwise form is refused, and the row says so). For a K that is not a multiple
                of 512 (10944) its operands are zero-padded to the next multiple (outside the
                timing): cuBLAS wants the 128x128 scales' rows round_up(K/128, 4) apart, which
                torch 2.11 did not enforce (mean rel err 2.27 before). M=1 is padded to 16 rows
                (cuBLAS refused it). Zero rows and columns add nothing to the product.
                At the prefill M the Hopper candidate fp8_gemm(variant="tma_persistent") is
                checked and timed too, each config pinned, then autotuned (rows "triton fp8 tma").
                At decode M, fp8_linear's fused path (the GEMM quantizes x itself, one launch) is
                checked and timed beside act_quant + gemm, eagerly and from a CUDA graph.
  fp8 prefill   (--only fp8_prefill; planned < 60 s: 8 compiles, 16 timed rows) the same baseline at M=4096 vs every
                PREFILL_CANDIDATES config of kernels/fp8_gemm_persistent.py pinned (one compile
                each, no autotuning), each checked on its timed bf16 output (mean rel. < 1e-3).
  grouped GEMM  torch._grouped_mm (bf16), MoE end to end with it
  MLA decode    the eager absorbed einsum math and F.scaled_dot_product_attention; mla_decode is
                also timed as a CUDA-graph replay (its kernels without Python launch cost), in both
                merge forms (separate reduce kernel / fused in the split kernel), and at B=32 over
                forced split counts (each autotuned and checked; the fastest is tabled); the
                traced program's form (cache + kv_new) with the split count chosen in the
                kernels (runtime_splits) and with the fixed 8 splits it used before
  MLA sweep     (mla_sweep, < 60 s) mla_decode's variants (TMA loads, early loads), split counts and
                merge forms, each pinned, from CUDA graphs: % of copy bandwidth and error (MLA_SWEEP)
  RMSNorm, act_quant: eager torch
Device copy bandwidth is measured in the same run. Every section is guarded: an error prints and
the script continues. The default run (fewer shapes, short timing) fits in about 4 minutes of
GPU time including autotuning on a cold Triton cache; `--full` runs every shape with longer timing.

    python benchmarks/kernels.py [--full] [--only copy,quant,fp8,moe,mla,norm] [--budget-s 180]
Writes kernels.json and kernels.md to $OUT (after every section) when it is set. The first call of
each kernel autotunes it (compiles and times every config per shape key); --only splits a --full
run into smaller calls. The summary table is printed last (a remote runner may keep only the tail).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F



@dataclass(frozen=True)
class Shapes:
    """The 16b preset (DeepSeek-V2-Lite, configs/config_16B.json); `tiny` is the CPU smoke test."""

    dim: int = 2048
    inter: int = 10944
    moe_inter: int = 1408
    n_experts: int = 64
    topk: int = 6
    n_heads: int = 16
    kv_lora: int = 512
    rope: int = 64
    decode_m: tuple[int, ...] = (1, 16, 64)
    prefill_m: int = 4096
    mla_decode: tuple[tuple[int, int], ...] = ((32, 4096), (1, 1024), (8, 1024), (64, 1024))
    softmax_scale: float = (128 + 64) ** -0.5
    device: str = "cuda"


TINY = Shapes(dim=160, inter=200, moe_inter=48, n_experts=4, topk=2, n_heads=4, kv_lora=64, rope=16,
              decode_m=(1, 5), prefill_m=24, mla_decode=((3, 70), (1, 33)), device="cpu")
# Ceilings (TOOLCHAIN.md, measured on this H200): floors use these.
HBM_BW = 4.2e12
FP8_PEAK = 1458e12
BF16_PEAK = 800e12


def _bootstrap_imports() -> None:
    """Make dsv3_export.{kernels,reference} importable from a plain checkout (no pip install)."""
    try:
        import dsv3_export.kernels  # noqa: F401
        import dsv3_export.reference  # noqa: F401
        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import dsv3_export

    dsv3_export.__path__.append(str(root))  # dsv3_export.kernels -> <root>/kernels, like package-dir


@dataclass
class Row:
    section: str
    case: str
    impl: str
    ms: float | None = None
    tflops: float | None = None
    tbps: float | None = None
    floor_ms: float | None = None
    frac_of_roofline: float | None = None  # floor / time
    speedup_vs_best_alt: float | None = None  # best alternative time / our time (ours rows only)
    error: float | None = None
    tol: float | None = None
    ok: bool | None = None
    note: str = ""


@dataclass
class Report:
    device: str = ""
    versions: dict = field(default_factory=dict)
    copy_tbps: float | None = None
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# helpers


def bench(fn, sh: Shapes, quick: bool) -> float:
    """Median milliseconds: triton.testing.do_bench on the GPU, one timed call on the CPU smoke test."""
    if sh.device == "cpu":  # the smoke test checks the plumbing; one call, no warm-up
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                         return_mode="median"))


def mean_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().mean() / ref.abs().mean().clamp_min(1e-30)).item()


def add(report: Report, row: Row, *, bytes_: float = 0.0, flops: float = 0.0, peak: float = BF16_PEAK) -> Row:
    if row.ms:
        sec = row.ms * 1e-3
        row.tbps = bytes_ / sec / 1e12 if bytes_ else None
        row.tflops = flops / sec / 1e12 if flops else None
        floor = max(bytes_ / HBM_BW, flops / peak if flops else 0.0)
        row.floor_ms = floor * 1e3 if floor else None
        row.frac_of_roofline = floor / sec if floor else None
    report.rows.append(row)
    return row


def finish_group(rows: list[Row]) -> None:
    """speedup_vs_best_alt on our rows of one case = best torch time / our time."""
    alts = [r.ms for r in rows if r.impl.startswith("torch") and r.ms]
    if not alts:
        return
    for r in rows:
        if not r.impl.startswith("torch") and r.ms:
            r.speedup_vs_best_alt = min(alts) / r.ms


def guarded(report: Report, label: str, fn):
    """Run one alternative; on error record it and return None (the section goes on)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - an alternative that does not run is a result, not a crash
        msg = f"{label}: {type(e).__name__}: {str(e)[:300]}"
        report.failures.append(msg)
        print("  failed:", msg, flush=True)
        return None


def show(case: str, rows: list[Row]) -> None:
    print(f"  {case}: " + ", ".join(f"{r.impl} {r.ms:.4f} ms" for r in rows if r and r.ms), flush=True)


# --------------------------------------------------------------------------------------------
# sections


def bench_copy(report: Report, sh: Shapes, quick: bool) -> None:
    n = (1 << 29) if sh.device == "cuda" else (1 << 20)  # 512 MiB each way on the GPU
    src = torch.empty(n, dtype=torch.uint8, device=sh.device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), sh, quick)
    report.copy_tbps = 2 * n / (ms * 1e-3) / 1e12
    add(report, Row("copy", f"{n >> 20} MiB", "torch copy_", ms), bytes_=2 * n)
    print(f"  device copy: {report.copy_tbps:.2f} TB/s (read + write)")


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


def _fp8_choice(m: int, n: int, k: int, device: str) -> str:
    """The tile set, split-K and the config fp8_gemm's autotuner used for its last launch."""
    from dsv3_export.kernels import fp8_gemm as G

    shape_class = "decode" if m <= G.DECODE_MAX_M else "prefill"
    k_blocks = -(-k // 128)
    split = G._choose_split_k(m, n, k_blocks, torch.device(device)) if shape_class == "decode" else 1
    split = -(-k_blocks // -(-k_blocks // split))  # as the launcher rounds it: no empty splits
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
                                        bench(lambda: fp8_linear(x, w, w_s, fuse_act_quant=False), sh, quick)),
                            bytes_=bytes_ + m * k * 2, flops=flops, peak=FP8_PEAK))
            fused_bytes = m * k * 2 + n * k + w_s.numel() * 4 + m * n * 2  # x read in bf16, no a / a_s round trip
            if decode:  # the opt-in fused form: one launch, the GEMM quantizes x's 1x128 blocks itself
                fq_out, fq_choice = fp8_linear(x, w, w_s, fuse_act_quant=True), _fp8_choice(m, n, k, sh.device)
                fq_err = mean_rel(fq_out.float(), ref)
                fq_diff = int((fq_out != fp8_linear(x, w, w_s, fuse_act_quant=False)).sum())
                rows.append(add(report, Row("fp8_gemm", case, "triton fp8_linear (fused act_quant)",
                                            bench(lambda: fp8_linear(x, w, w_s, fuse_act_quant=True), sh, quick),
                                            error=fq_err, tol=5e-3, ok=fq_err < 5e-3,
                                            note=f"{fq_choice}; {fq_diff} outputs differ from act_quant + gemm"),
                                bytes_=fused_bytes, flops=flops, peak=FP8_PEAK))
            wo_err = mean_rel(fp8_gemm(x, None, w, w_s).float(), fp8_gemm_ref(x, None, w, w_s, torch.float32))
            wo_choice = _fp8_choice(m, n, k, sh.device)
            rows.append(add(report, Row("fp8_gemm", case, "triton fp8_gemm weight-only (W8A16)",
                                        bench(lambda: fp8_gemm(x, None, w, w_s), sh, quick), error=wo_err,
                                        tol=5e-3, ok=wo_err < 5e-3, note=wo_choice),
                            bytes_=m * k * 2 + n * k + w_s.numel() * 4 + m * n * 2, flops=flops, peak=BF16_PEAK))
            if decode and sh.device == "cuda":
                # A decode step runs from a CUDA graph / AOTInductor: the kernels alone, without the
                # host's checks and launches that do_bench around the Python call also times.
                graphed = [("triton fp8_gemm (CUDA graph)", lambda: fp8_gemm(a, a_s, w, w_s), FP8_PEAK, choice),
                           ("triton fp8_linear (CUDA graph)", lambda: fp8_linear(x, w, w_s, fuse_act_quant=False),
                            FP8_PEAK, "")]
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

                def fused_graphed():  # checked on the graph's own output, after a replay
                    outs = []
                    graph = _graph_of(lambda: fp8_linear(x, w, w_s, fuse_act_quant=True), outs)
                    graph.replay()
                    e = mean_rel(outs[0].float(), ref)
                    return add(report, Row("fp8_gemm", case, "triton fp8_linear fused act_quant (CUDA graph)",
                                           bench(graph.replay, sh, quick), error=e, tol=5e-3, ok=e < 5e-3,
                                           note="one launch (+ split-K sum)"),
                               bytes_=fused_bytes, flops=flops, peak=FP8_PEAK)

                rows.append(guarded(report, f"{case} fp8_linear fused act_quant (CUDA graph)", fused_graphed))
            rows = [r for r in rows if r is not None]
            finish_group(rows)
            show(case, rows)


def bench_fp8_prefill(report: Report, sh: Shapes, quick: bool) -> None:
    """fp8 GEMM at the 16b prefill shapes (w1/w3, w2 at M=4096): every PREFILL_CANDIDATES config of
    the TMA + persistent kernel pinned (one compile each, no autotuning) and the default kernel's
    session-5 winner, vs blockwise torch._scaled_mm. Each row is checked on its own timed bf16
    output against the fp32 reference rounded to bf16: a right kernel differs only where its fp32
    sum rounds the other way (mean rel. error ~1e-6), so < 1e-3 flags a wrong one (the removed
    warp-specialized loop was at 0.11). The CPU smoke test checks fp32 outputs instead (the
    interpreter truncates fp32 -> bf16)."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels import fp8_gemm_persistent as P
    from dsv3_export.reference import fp8 as R

    m = sh.prefill_m
    out_dtype = torch.bfloat16 if sh.device == "cuda" else torch.float32
    for label, n, k in (("w1/w3 mlp", sh.inter, sh.dim), ("w2 mlp", sh.dim, sh.inter)):
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
        rows = [r for r in rows if r is not None]
        finish_group(rows)
        show(case, rows)


def bench_act_quant(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels.fp8_quant import act_quant, weight_dequant
    from dsv3_export.reference import fp8 as R

    for m in (*sh.decode_m, sh.prefill_m):
        for k in (sh.dim, sh.inter):
            case = f"act_quant M={m} K={k}"
            x = torch.randn(m, k, device=sh.device, dtype=torch.bfloat16)
            q, s = act_quant(x)
            q_ref, s_ref = R.act_quant(x)  # on x's device: the kernel matches torch's scale form there
            bad_s = int((s != s_ref).sum())
            bad_q = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
            exact = bad_s == 0 and bad_q == 0
            bytes_ = m * k * 3 + s.numel() * 4
            note = ("bit-exact vs reference" if exact else
                    f"NOT bit-exact: {bad_s}/{s.numel()} scales, {bad_q}/{q.numel()} fp8 bytes differ")
            rows = [add(report, Row("act_quant", case, "triton act_quant", bench(lambda: act_quant(x), sh, quick),
                                    error=max(bad_s / s.numel(), bad_q / q.numel()), tol=0.0, ok=exact,
                                    note=note), bytes_=bytes_),
                    add(report, Row("act_quant", case, "torch eager reference",
                                    bench(lambda: R.act_quant(x), sh, quick)), bytes_=bytes_)]
            finish_group(rows)
            show(case, rows)
    case = f"weight_dequant N={sh.inter} K={sh.dim}"
    w, w_s = R.weight_quant(torch.randn(sh.inter, sh.dim, device=sh.device))
    err = mean_rel(weight_dequant(w, w_s, torch.bfloat16).float(), R.weight_dequant(w, w_s, torch.float32))
    bytes_ = sh.inter * sh.dim * 3
    rows = [add(report, Row("weight_dequant", case, "triton weight_dequant",
                            bench(lambda: weight_dequant(w, w_s, torch.bfloat16), sh, quick), error=err, tol=4e-3,
                            ok=err < 4e-3), bytes_=bytes_),
            add(report, Row("weight_dequant", case, "torch eager reference",
                            bench(lambda: R.weight_dequant(w, w_s, torch.bfloat16), sh, quick)), bytes_=bytes_)]
    finish_group(rows)
    show(case, rows)


def _moe_grouped_mm(x, w13_t, w2_t, tw, ids, n_experts):
    """Best torch alternative: sort by expert, two torch._grouped_mm, SwiGLU, weighted index_add."""
    return _presorted_grouped_mm(x, w13_t, w2_t, tw, ids, n_experts)()


def _presorted_grouped_mm(x, w13_t, w2_t, tw, ids, n_experts):
    """The torch MoE split in two: the routing sort now (bincount syncs the host, which a CUDA graph
    cannot hold), and the returned run() = two torch._grouped_mm, SwiGLU, weighted index_add."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=n_experts), 0).to(torch.int32)
    rows, weights = order // k, tw.reshape(-1)[order, None]

    def run():
        h = torch._grouped_mm(x[rows], w13_t, offs=offs)  # [T*k, 2I]
        inter = h.shape[1] // 2
        y = torch._grouped_mm(F.silu(h[:, :inter]) * h[:, inter:], w2_t, offs=offs) * weights  # [T*k, D]
        return torch.zeros_like(x).index_add_(0, rows, y)

    return run


def _presorted_up_swiglu(x, w13_t, ids, n_experts):
    """torch's MoE up projection split in two: the routing sort now, the returned run() = one
    torch._grouped_mm over the expert-sorted rows + SwiGLU (w13_t [E, D, 2I])."""
    flat = ids.reshape(-1)
    offs = torch.cumsum(torch.bincount(flat, minlength=n_experts), 0).to(torch.int32)
    xs = x[torch.argsort(flat, stable=True) // ids.shape[1]]  # [T*k, D], sorted by expert
    inter = w13_t.shape[2] // 2

    def run():
        h = torch._grouped_mm(xs, w13_t, offs=offs)  # [T*k, 2I]
        return F.silu(h[:, :inter]) * h[:, inter:]

    return run


def _quantized_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights [E, N, K] -> fp8 [E, N, K] and their 128x128 block scales, as a checkpoint stores them."""
    from dsv3_export.reference import fp8 as R

    pairs = [R.weight_quant(w[j].float()) for j in range(w.shape[0])]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def bench_moe(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels import moe as M

    torch.manual_seed(0)
    d, i, e = sh.dim, sh.moe_inter, sh.n_experts
    w13 = (torch.randn(e, 2 * i, d, device=sh.device) / d**0.5).bfloat16()
    w2 = (torch.randn(e, d, i, device=sh.device) / i**0.5).bfloat16()
    w13q, w13s = _quantized_experts(w13)
    w2q, w2s = _quantized_experts(w2)
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, K, N] views for _grouped_mm
    expert_elems = 3 * i * d
    for t in (*sh.decode_m, sh.prefill_m):
        case = f"T={t} E={e} top{sh.topk} D={d} I={i}"
        x = torch.randn(t, d, device=sh.device, dtype=torch.bfloat16)
        tw, ids = torch.randn(t, e, device=sh.device).softmax(-1).topk(sh.topk, dim=-1)
        tw = tw.to(torch.bfloat16)
        active = int(torch.unique(ids).numel())
        flops = 2 * t * sh.topk * 3 * i * d
        act_bytes = 2 * (2 * t * d + 2 * t * sh.topk * (i + d))
        note = f"{active} experts active"
        ref = M.fused_moe_ref(x, w13, w2, tw, ids)
        err = mean_rel(M.fused_moe(x, w13, w2, tw, ids).float(), ref.float())
        rows = [add(report, Row("moe", case, "triton fused_moe bf16",
                                bench(lambda: M.fused_moe(x, w13, w2, tw, ids), sh, quick),
                                error=err, tol=2e-2, ok=err < 2e-2, note=note),
                    bytes_=active * expert_elems * 2 + act_bytes, flops=flops, peak=BF16_PEAK)]
        fp8_kw = dict(w13_scale=w13s, w2_scale=w2s)
        ref8 = M.fused_moe_ref(x, w13q, w2q, tw, ids, **fp8_kw)
        err8 = mean_rel(M.fused_moe(x, w13q, w2q, tw, ids, **fp8_kw).float(), ref8.float())
        rows.append(add(report, Row("moe", case, "triton fused_moe fp8",
                                    bench(lambda: M.fused_moe(x, w13q, w2q, tw, ids, **fp8_kw), sh, quick),
                                    error=err8, tol=2e-2, ok=err8 < 2e-2, note=note + "; ref: same fp8 weights"),
                        bytes_=active * expert_elems + act_bytes, flops=flops, peak=FP8_PEAK))

        wo_kw = dict(w13_scale=w13s, w2_scale=w2s, act_quant=False)
        ref_wo = M.fused_moe_ref(x, w13q, w2q, tw, ids, **wo_kw)
        err_wo = mean_rel(M.fused_moe(x, w13q, w2q, tw, ids, **wo_kw).float(), ref_wo.float())
        rows.append(add(report, Row("moe", case, "triton fused_moe fp8 weight-only (W8A16)",
                                    bench(lambda: M.fused_moe(x, w13q, w2q, tw, ids, **wo_kw), sh, quick),
                                    error=err_wo, tol=2e-2, ok=err_wo < 2e-2, note=note),
                        bytes_=active * expert_elems + act_bytes, flops=flops, peak=BF16_PEAK))

        def baseline():
            e_ = mean_rel(_moe_grouped_mm(x, w13_t, w2_t, tw, ids, e).float(), ref.float())
            return add(report, Row("moe", case, "torch._grouped_mm moe bf16",
                                   bench(lambda: _moe_grouped_mm(x, w13_t, w2_t, tw, ids, e), sh, quick),
                                   error=e_, tol=2e-2, ok=e_ < 2e-2),
                       bytes_=active * expert_elems * 2 + act_bytes, flops=flops, peak=BF16_PEAK)

        rows.append(guarded(report, f"moe {case} _grouped_mm", baseline))
        if sh.device == "cuda" and t <= 64:  # decode sizes: eager timings there are mostly Python launch cost
            bf16_bytes = active * expert_elems * 2 + act_bytes
            for impl, fn, nbytes, peak in (
                    ("triton fused_moe bf16 (CUDA graph)", lambda: M.fused_moe(x, w13, w2, tw, ids), bf16_bytes,
                     BF16_PEAK),
                    ("triton fused_moe fp8 (CUDA graph)",
                     lambda: M.fused_moe(x, w13q, w2q, tw, ids, fuse_act_quant=False, **fp8_kw),
                     active * expert_elems + act_bytes, FP8_PEAK),
                    ("torch._grouped_mm moe bf16 (CUDA graph, rows pre-sorted)", _presorted_grouped_mm(x, w13_t, w2_t, tw, ids, e),
                     bf16_bytes, BF16_PEAK)):
                rows.append(guarded(report, f"moe {case} {impl}", lambda impl=impl, fn=fn, nbytes=nbytes, peak=peak: add(
                    report, Row("moe", case, impl, bench(_graph_of(fn).replay, sh, quick), note=note),
                    bytes_=nbytes, flops=flops, peak=peak)))

            def fused_quant_graph():  # the opt-in fused fp8 MoE: x and h quantized inside the GEMMs
                fused = lambda: M.fused_moe(x, w13q, w2q, tw, ids, fuse_act_quant=True, **fp8_kw)  # noqa: E731
                same = torch.equal(fused(), M.fused_moe(x, w13q, w2q, tw, ids, fuse_act_quant=False, **fp8_kw))
                return add(report, Row("moe", case, "triton fused_moe fp8, act_quant in the GEMMs (CUDA graph)",
                                       bench(_graph_of(fused).replay, sh, quick), ok=same,
                                       note=note + ("; = the act_quant form bit for bit" if same else
                                                    "; DIFFERS from the act_quant form")),
                           bytes_=active * expert_elems + act_bytes, flops=flops, peak=FP8_PEAK)

            rows.append(guarded(report, f"moe {case} fp8 act_quant in the GEMMs", fused_quant_graph))
        rows = [r for r in rows if r is not None]
        finish_group(rows)
        show(case, rows)

        # The up projection alone: grouped GEMM + fused SwiGLU vs _grouped_mm + eager SwiGLU.
        up_case = f"up+swiglu {case}"
        bm = M.choose_block_m(t, sh.topk, e)
        s_ids, e_ids, npp = M.moe_align(ids, e, bm)
        up_flops = 2 * t * sh.topk * 2 * i * d
        up_bytes = active * 2 * i * d * 2 + 2 * t * (d + sh.topk * i)
        g_err = mean_rel(M.grouped_gemm(x, w13, s_ids, e_ids, npp, sh.topk, fuse_swiglu=True).float(),
                         M.grouped_gemm_ref(x, w13, ids, sh.topk, fuse_swiglu=True))
        up_rows = [add(report, Row("grouped_gemm", up_case, "triton moe_align (block_m=%d)" % bm,
                                   bench(lambda: M.moe_align(ids, e, bm), sh, quick))),
                   add(report, Row("grouped_gemm", up_case, "triton grouped_gemm bf16",
                                   bench(lambda: M.grouped_gemm(x, w13, s_ids, e_ids, npp, sh.topk, fuse_swiglu=True),
                                         sh, quick), error=g_err, tol=2e-2, ok=g_err < 2e-2),
                       bytes_=up_bytes, flops=up_flops, peak=BF16_PEAK)]

        def gm_up():
            run = _presorted_up_swiglu(x, w13_t, ids, e)
            return add(report, Row("grouped_gemm", up_case, "torch._grouped_mm + swiglu", bench(run, sh, quick),
                                   note="rows pre-sorted outside the timing"),
                       bytes_=up_bytes, flops=up_flops, peak=BF16_PEAK)

        up_rows.append(guarded(report, f"grouped_gemm {case} _grouped_mm", gm_up))
        if sh.device == "cuda" and t <= 64:  # decode sizes: eager rows are mostly Python launch cost
            # moe_align as the packages trace it (DSV3_TORCH_MOE_ALIGN): ATen ops vs the kernel (default)
            align_case = f"moe_align block_m={bm} {case}"
            same = all(torch.equal(x_, y_) for x_, y_ in zip(M.moe_align(ids, e, bm), M.moe_align_ref(ids, e, bm)))
            align_rows = [guarded(report, f"moe_align {case} {impl}", lambda impl=impl, fn=fn: add(
                report, Row("moe_align", align_case, impl, bench(_graph_of(fn).replay, sh, quick), ok=same,
                            note="outputs identical" if same else "OUTPUTS DIFFER")))
                for impl, fn in (("torch moe_align_ref, the traced ATen form (CUDA graph)",
                                  lambda: M.moe_align_ref(ids, e, bm)),
                                 ("triton moe_align kernel (CUDA graph)", lambda: M.moe_align(ids, e, bm)))]
            align_rows = [r for r in align_rows if r is not None]
            finish_group(align_rows)
            show(align_case, align_rows)
            for impl, fn in (("triton grouped_gemm bf16 (CUDA graph)",
                              lambda: M.grouped_gemm(x, w13, s_ids, e_ids, npp, sh.topk, fuse_swiglu=True)),
                             ("torch._grouped_mm + swiglu (CUDA graph, rows pre-sorted)",
                              _presorted_up_swiglu(x, w13_t, ids, e))):
                up_rows.append(guarded(report, f"grouped_gemm {case} {impl}", lambda impl=impl, fn=fn: add(
                    report, Row("grouped_gemm", up_case, impl, bench(_graph_of(fn).replay, sh, quick)),
                    bytes_=up_bytes, flops=up_flops, peak=BF16_PEAK)))
        up_rows = [r for r in up_rows if r is not None]
        finish_group(up_rows)
        show(up_case, up_rows)


def _absorbed_eager(q, qp, kv, pe, scale):
    scores = (torch.einsum("bhc,btc->bht", q, kv) + torch.einsum("bhr,btr->bht", qp, pe)) * scale
    return torch.einsum("bht,btc->bhc", scores.softmax(-1, dtype=torch.float32).type_as(q), kv)


def _graph_of(fn, outputs: list | None = None):
    """fn captured in a CUDA graph (after a warm-up on a side stream): replay costs no Python launches.
    `outputs` (a list) receives the captured call's result, which every replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    if outputs is not None:
        outputs.append(out)
    return graph


def _decode_choice(bsz: int, h: int, c: int, r: int, ctx: int, device: str, merge: str | None = None,
                   splits: int | None = None) -> str:
    """The split count mla_decode picks (or `splits`) and the config the autotuner chose for it."""
    from dsv3_export.kernels import mla_decode as kd

    splits = splits or kd.choose_num_splits(bsz, h, ctx, torch.device(device))
    merge = merge or kd.DECODE_MERGE
    cfg = kd.decode_config(h, c, r, splits, torch.bfloat16, merge=merge) if device == "cuda" else kd.DECODE_CONFIGS[0]
    return f"merge={merge} NUM_SPLITS={splits} ({bsz * splits} programs), config {cfg}"


# Forced split counts of the sweep, per merge form: 8 = one wave at 2 programs per SM (B=32, 132 SMs),
# 12 at 3, 16 at 4 (the maxnreg configs). 16 compiles apart (Triton specializes ints divisible by 16):
# ~2 compiles per config and form, then ~2 s of autotuning per new key.
SWEEP_SPLITS = (8, 12, 16)
# Merge forms of the sweep. Session 4 (H200): the fused merge's CUDA-graph row took 0.0766 ms against
# the separate form's 0.0614 at the auto split count, and its sweep did not finish in the ~4 minutes the
# lease had left (results/session4/kernels.log); the sweep times the separate form only. `--sweep-fused`
# puts it back.
SWEEP_MERGES = ["separate"]


def _split_sweep(report: Report, q, qp, kv, pe, seqlens, scale, bytes_: int, sh: Shapes, quick: bool,
                 ref: torch.Tensor, case: str, flops: float) -> None:
    """mla_decode from a CUDA graph at forced NUM_SPLITS (each autotuned), separate and fused merge:
    printed, to show how far choose_num_splits' pick is from the best split count on this GPU; the
    fastest correct (merge, splits, config) is also tabled. Each point's graph output is checked
    against `ref` after its timing (the fused form's counters must survive hundreds of replays)."""
    from dsv3_export.kernels.mla_decode import mla_decode

    bsz, h, c = q.shape
    best = None
    for merge in SWEEP_MERGES:
        parts = []
        for splits in SWEEP_SPLITS:
            mla_decode(q, qp, kv, pe, seqlens, scale, num_splits=splits, merge=merge)  # autotune outside the graph
            outs: list = []
            graph = _graph_of(lambda: mla_decode(q, qp, kv, pe, seqlens, scale, num_splits=splits, merge=merge),
                              outs)
            ms = bench(graph.replay, sh, quick)
            torch.cuda.synchronize()
            err = mean_rel(outs[0].float(), ref)
            pct = f" = {100 * bytes_ / (ms * 1e-3) / 1e12 / report.copy_tbps:.0f}% of copy" if report.copy_tbps else ""
            bad = "" if err < 1e-2 else f" WRONG (mean rel err {err:.3g})"
            if err >= 1e-2:
                report.failures.append(f"mla split sweep merge={merge} splits={splits}: mean rel err {err:.3g}")
            parts.append(f"{splits}: {ms:.4f} ms{pct}{bad}")
            if err < 1e-2 and (best is None or ms < best[0]):
                best = (ms, _decode_choice(bsz, h, c, pe.shape[-1], kv.shape[1], sh.device, merge, splits))
        print(f"    split sweep merge={merge} (CUDA graph): " + "; ".join(parts), flush=True)
    if best is not None:
        print(f"    split sweep best: {best[0]:.4f} ms with {best[1]}", flush=True)
        add(report, Row("mla", case, "triton mla sweep best (CUDA graph)", best[0], note=best[1], ok=True),
            bytes_=bytes_, flops=flops)


def bench_mla(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels.mla_attention import mla_decode_ref, mla_prefill_ref
    from dsv3_export.kernels.mla_decode import mla_decode
    from dsv3_export.kernels.mla_prefill import mla_prefill

    h, c, r_ = sh.n_heads, sh.kv_lora, sh.rope
    scale = sh.softmax_scale
    for bsz, ctx in sh.mla_decode:
        case = f"decode B={bsz} ctx={ctx} H={h} C={c} R={r_}"
        q = torch.randn(bsz, h, c, device=sh.device, dtype=torch.bfloat16)
        qp = torch.randn(bsz, h, r_, device=sh.device, dtype=torch.bfloat16)
        cache = torch.randn(bsz, ctx, c + r_, device=sh.device, dtype=torch.bfloat16)  # FlashMLA-style layout
        kv, pe = cache[..., :c], cache[..., c:]  # strided views, as dsv3::mla_attention passes them
        seqlens = torch.full((bsz,), ctx, dtype=torch.int32, device=sh.device)
        bytes_ = bsz * ctx * (c + r_) * 2 + bsz * h * (2 * c + r_) * 2
        flops = 2 * bsz * h * ctx * (2 * c + r_)
        ref = mla_decode_ref(q.float(), qp.float(), kv.float(), pe.float(), seqlens, scale)
        err = mean_rel(mla_decode(q, qp, kv, pe, seqlens, scale).float(), ref)
        rows = [add(report, Row("mla", case, "triton mla_decode",
                                bench(lambda: mla_decode(q, qp, kv, pe, seqlens, scale), sh, quick),
                                error=err, tol=1e-2, ok=err < 1e-2), bytes_=bytes_, flops=flops),
                add(report, Row("mla", case, "torch eager absorbed einsum",
                                bench(lambda: _absorbed_eager(q, qp, kv, pe, scale), sh, quick)),
                    bytes_=bytes_, flops=flops)]
        # The op's form: the step's new token arrives beside the cache (kv_new), not in it.
        len_m1 = seqlens - 1
        new_kv, new_pe = cache[:, -1, :c], cache[:, -1, c:]
        err_new = mean_rel(mla_decode(q, qp, kv, pe, len_m1, scale, kv_new=new_kv, pe_new=new_pe).float(), ref)
        rows.append(add(report, Row("mla", case, "triton mla_decode (cache + kv_new)",
                                    bench(lambda: mla_decode(q, qp, kv, pe, len_m1, scale, kv_new=new_kv,
                                                             pe_new=new_pe), sh, quick),
                                    error=err_new, tol=1e-2, ok=err_new < 1e-2), bytes_=bytes_, flops=flops))

        def sdpa():
            qs = torch.cat([q, qp], -1).unsqueeze(2)  # [B, H, 1, C+R]
            ks = cache.unsqueeze(1)  # [B, 1, T, C+R]: the combined cache is SDPA's K as is
            vs = kv.unsqueeze(1)  # [B, 1, T, C] (strided view)

            def run():
                return F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)

            e_ = mean_rel(run().squeeze(2).float(), ref)
            return add(report, Row("mla", case, "torch F.scaled_dot_product_attention", bench(run, sh, quick),
                                   error=e_, tol=1e-2, ok=e_ < 1e-2, note="enable_gqa: 1 KV head, 16 query heads"),
                       bytes_=bytes_, flops=flops)

        rows.append(guarded(report, f"mla {case} sdpa", sdpa))
        choice = _decode_choice(bsz, h, c, r_, ctx, sh.device)
        rows[0].note = choice

        def graphed():
            # The kernels alone: a decode step runs them from a CUDA graph / AOTInductor, not from
            # Python; do_bench around mla_decode() also times the host's argument checks and launches.
            graph = _graph_of(lambda: mla_decode(q, qp, kv, pe, seqlens, scale))
            return add(report, Row("mla", case, "triton mla_decode (CUDA graph)", bench(graph.replay, sh, quick),
                                   note=choice), bytes_=bytes_, flops=flops)

        if sh.device == "cuda":
            rows.append(guarded(report, f"mla {case} graph", graphed))

        def traced_form():
            # The decode program's call (engines/torch_triton.py): cache + new token, the split count
            # picked inside the kernels (runtime_splits), beside the fixed 8 splits it used before.
            # From a CUDA graph on the GPU, checked on the graph's own output after the replays.
            from dsv3_export.kernels.mla_decode import runtime_num_splits

            out = []
            for label, kw, note in (
                    ("runtime splits", {"runtime_splits": True},
                     f"{runtime_num_splits(bsz, h, ctx - 1, q.device)} splits per row"),
                    ("fixed 8 splits", {"num_splits": 8}, "the traced program's split count before")):
                def call(kw=kw):
                    return mla_decode(q, qp, kv, pe, len_m1, scale, kv_new=new_kv, pe_new=new_pe, **kw)

                outs = [call()]  # also autotunes, outside any graph
                fn = call
                if sh.device == "cuda":
                    outs = []
                    fn = _graph_of(call, outs).replay
                    note += ", CUDA graph"
                ms = bench(fn, sh, quick)
                e_ = mean_rel(outs[0].float(), ref)
                out.append(add(report, Row("mla", case, f"triton mla traced form, {label} (+ kv_new)", ms, error=e_,
                                           tol=1e-2, ok=e_ < 1e-2, note=note), bytes_=bytes_, flops=flops))
            return out

        rows.extend(guarded(report, f"mla {case} traced form", traced_form) or [])

        def fused():
            # One launch: the last split program of each (row, head block) merges (self-cleaning counter).
            # Checked eagerly (cache + kv_new, the op's form) and from the graph after all its replays.
            e_new = mean_rel(mla_decode(q, qp, kv, pe, len_m1, scale, kv_new=new_kv, pe_new=new_pe,
                                        merge="fused").float(), ref)
            out = [add(report, Row("mla", case, "triton mla fused merge (+ kv_new)",
                                   bench(lambda: mla_decode(q, qp, kv, pe, len_m1, scale, kv_new=new_kv, pe_new=new_pe,
                                                            merge="fused"), sh, quick),
                                   error=e_new, tol=1e-2, ok=e_new < 1e-2), bytes_=bytes_, flops=flops)]
            if sh.device != "cuda":
                e_ = mean_rel(mla_decode(q, qp, kv, pe, seqlens, scale, merge="fused", num_splits=3).float(), ref)
                out[0].note = f"fused at 3 splits without kv_new: mean rel err {e_:.2g}"
                out[0].ok = out[0].ok and e_ < 1e-2
                return out
            mla_decode(q, qp, kv, pe, seqlens, scale, merge="fused")  # autotune outside the graph
            outs: list = []
            graph = _graph_of(lambda: mla_decode(q, qp, kv, pe, seqlens, scale, merge="fused"), outs)
            ms = bench(graph.replay, sh, quick)
            torch.cuda.synchronize()
            e_ = mean_rel(outs[0].float(), ref)  # after every replay: the counters reset themselves
            out.append(add(report, Row("mla", case, "triton mla fused merge (CUDA graph)", ms, error=e_,
                                       tol=1e-2, ok=e_ < 1e-2,
                                       note=_decode_choice(bsz, h, c, r_, ctx, sh.device, "fused")),
                           bytes_=bytes_, flops=flops))
            return out

        rows.extend(guarded(report, f"mla {case} fused merge", fused) or [])
        rows = [r for r in rows if r is not None]
        finish_group(rows)
        show(case, rows)
        print(f"  {case}: {choice}", flush=True)
        if sh.device == "cuda" and bsz * ctx >= 32 * 4096:  # the bandwidth-bound shape: does the split heuristic pay?
            guarded(report, f"mla {case} split sweep", lambda: _split_sweep(report, q, qp, kv, pe, seqlens, scale,
                                                                              bytes_, sh, quick, ref, case, flops))
        for r in rows:
            if r.impl.startswith("triton") and r.tbps and report.copy_tbps:
                print(f"    {r.impl}: {r.tbps:.2f} TB/s = {100 * r.tbps / report.copy_tbps:.0f}% of copy "
                      f"({report.copy_tbps:.2f} TB/s)", flush=True)

    s_q = sh.prefill_m // 4 if quick else sh.prefill_m
    case = f"prefill B=1 S={s_q} H={h}"
    q = torch.randn(1, s_q, h, c, device=sh.device, dtype=torch.bfloat16)
    qp = torch.randn(1, s_q, h, r_, device=sh.device, dtype=torch.bfloat16)
    cache = torch.randn(1, s_q, c + r_, device=sh.device, dtype=torch.bfloat16)
    kv, pe = cache[..., :c], cache[..., c:]
    flops = 2 * h * (s_q * (s_q + 1) / 2) * (2 * c + r_)
    bytes_ = s_q * (c + r_) * 2 + 2 * s_q * h * (2 * c + r_) * 2
    n_check = min(s_q, 256)
    ref = mla_prefill_ref(q[:, :n_check].float(), qp[:, :n_check].float(), kv.float(), pe.float(), 0, scale)
    err = mean_rel(mla_prefill(q, qp, kv, pe, 0, scale)[:, :n_check].float(), ref)
    rows = [add(report, Row("mla", case, "triton mla_prefill", bench(lambda: mla_prefill(q, qp, kv, pe, 0, scale), sh, quick),
                            error=err, tol=1e-2, ok=err < 1e-2, note=f"checked on the first {n_check} queries"),
                bytes_=bytes_, flops=flops)]

    def sdpa_prefill():
        qs = torch.cat([q, qp], -1).transpose(1, 2)  # [1, H, S, C+R]
        ks = cache.unsqueeze(1)  # [1, 1, S, C+R]
        vs = kv.unsqueeze(1)  # [1, 1, S, C]
        return add(report, Row("mla", case, "torch F.scaled_dot_product_attention",
                               bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                                            enable_gqa=True), sh, quick)),
                   bytes_=bytes_, flops=flops)

    rows.append(guarded(report, "mla prefill sdpa", sdpa_prefill))
    rows = [r for r in rows if r is not None]
    finish_group(rows)
    show(case, rows)


# mla_sweep: MLA decode's variants (kernels/mla_decode.py DECODE_VARIANTS, configs, split counts, merge
# forms), each point pinned (variant, splits, merge, config: no autotuning), timed from a CUDA graph
# (split + merge together) and checked on the graph's output. Per (batch, context): whether the last key
# arrives beside the cache (the decode program's form) or in it (comparable with sessions 4-5's B=32
# sweeps), and the points, the first being what the default does there (the autotuner's pick of sessions
# 4-5: BN=32 w4 s3 at B>=8, BN=64 s2 PREFETCH=2 at B=1). A point is (variant, splits or None for the
# runtime rule, merge, (BLOCK_N, num_warps, num_stages, PREFETCH)), most wanted first: points that would
# start after MLA_SWEEP_BUDGET_S are skipped (and printed). The fused points use 16 fixed splits (the
# runtime rule's count at B=1, context 1024): with 32 split slots the fused merge takes ~9 s to compile. The CPU smoke test runs the first entries'
# points at its tiny shapes.
MLA_SWEEP = [
    ((32, 4096), False, [("pointer", 8, "separate", (32, 4, 3, 0)), ("tma", 8, "separate", (32, 4, 3, 0)),
                         ("tma", 8, "separate", (32, 8, 3, 0)), ("tma", 12, "separate", (16, 4, 4, 0)),
                         ("tma", 4, "separate", (64, 4, 2, 0))]),
    ((1, 1024), True, [("pointer", None, "separate", (64, 4, 2, 2)), ("early", None, "separate", (64, 4, 2, 2)),
                       ("tma", None, "separate", (64, 4, 2, 0)), ("tma_early", None, "separate", (64, 4, 2, 0)),
                       ("pointer", 16, "fused", (32, 4, 3, 0)), ("early", 16, "fused", (32, 4, 3, 0)),
                       ("pointer", 32, "separate", (32, 4, 3, 0)), ("early", 32, "separate", (32, 4, 3, 0))]),
    ((8, 4096), True, [("pointer", None, "separate", (32, 4, 3, 0)), ("early", None, "separate", (32, 4, 3, 0)),
                       ("tma", None, "separate", (32, 4, 3, 0)), ("tma", 16, "separate", (64, 4, 2, 0))]),
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
        for variant, splits, merge, spec in points:
            if time.time() - t0 > MLA_SWEEP_BUDGET_S:
                print(f"    {case} {variant} {splits} {merge} {spec}: skipped (the {MLA_SWEEP_BUDGET_S:.0f} s budget)")
                continue
            cfg = _sweep_config(kd.TMA_DECODE_CONFIGS if kd.VARIANT_FLAGS[variant].get("TMA") else kd.DECODE_CONFIGS,
                                spec)
            split_kw = {"runtime_splits": True} if splits is None else {"num_splits": splits}
            n_splits = kd.runtime_num_splits(bsz, h, ctx - new_token, q.device) if splits is None else splits
            bn, prefetch = cfg.kwargs["BLOCK_N"], cfg.kwargs["PREFETCH"]
            label = (f"{variant} {merge} {'runtime ' if splits is None else ''}{n_splits} splits BN={bn} "
                     f"w{cfg.num_warps} s{cfg.num_stages}" + (f" P{prefetch}" if prefetch else ""))

            def call(split_kw=split_kw, merge=merge, cfg=cfg, variant=variant):
                return kd.mla_decode(q, qp, kv, pe, seqlens, scale, merge=merge, config=cfg, variant=variant,
                                     **split_kw, **kw)

            def point(call=call, label=label):
                outs = [call()]  # compiles outside any graph
                fn = call
                if sh.device == "cuda":
                    outs = []
                    fn = _graph_of(call, outs).replay
                ms = bench(fn, sh, quick)
                if sh.device == "cuda":
                    torch.cuda.synchronize()
                err = mean_rel(outs[0].float(), ref)  # after every replay (fused counters, TMA scratch)
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


def bench_rmsnorm(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels.fp8_quant import act_quant
    from dsv3_export.kernels.rmsnorm import rmsnorm, rmsnorm_quant, rmsnorm_quant_ref, rmsnorm_ref
    from dsv3_export.reference.fp8 import act_dequant

    w = torch.randn(sh.dim, device=sh.device, dtype=torch.bfloat16)
    for m in (*sh.decode_m, sh.prefill_m):
        case = f"add+rmsnorm M={m} D={sh.dim}"
        x = torch.randn(m, sh.dim, device=sh.device, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        err = mean_rel(rmsnorm(x, w, 1e-6, residual=r)[0].float(), rmsnorm_ref(x, w, 1e-6, residual=r)[0].float())
        bytes_ = 4 * m * sh.dim * 2 + sh.dim * 2
        rows = [add(report, Row("rmsnorm", case, "triton rmsnorm(residual)",
                                bench(lambda: rmsnorm(x, w, 1e-6, residual=r), sh, quick),
                                error=err, tol=4e-3, ok=err < 4e-3), bytes_=bytes_),
                add(report, Row("rmsnorm", case, "torch eager add + rms_norm",
                                bench(lambda: rmsnorm_ref(x, w, 1e-6, residual=r), sh, quick)), bytes_=bytes_)]
        finish_group(rows)
        show(case, rows)
        case = f"add+rmsnorm+act_quant M={m} D={sh.dim}"
        # q, s must be act_quant of the kernel's own y, bit for bit (y itself: the rmsnorm row above)
        y, _, q, s = rmsnorm_quant(x, w, 1e-6, residual=r)
        err = mean_rel(act_dequant(q, s), act_dequant(*act_quant(y)))
        bytes_ = 3 * m * sh.dim * 2 + m * sh.dim * (1 + 2) + sh.dim * 2 + m * (sh.dim // 128) * 4
        rows = [add(report, Row("rmsnorm", case, "triton rmsnorm_quant(residual), one launch",
                                bench(lambda: rmsnorm_quant(x, w, 1e-6, residual=r), sh, quick),
                                error=err, tol=0.0, ok=err == 0), bytes_=bytes_),
                add(report, Row("rmsnorm", case, "triton rmsnorm(residual) + act_quant, two launches",
                                bench(lambda: act_quant(rmsnorm(x, w, 1e-6, residual=r)[0]), sh, quick)),
                    bytes_=bytes_),
                add(report, Row("rmsnorm", case, "torch eager add + rms_norm + act_quant",
                                bench(lambda: rmsnorm_quant_ref(x, w, 1e-6, residual=r), sh, quick)), bytes_=bytes_)]
        finish_group(rows)
        show(case, rows)


def _torch_router(logits: torch.Tensor, k: int, n_routed: int, n_shared: int = 2):
    """The reference Gate's ops (softmax router, scale 1) and fuse_shared_experts' columns, as torch runs them."""
    p = logits.softmax(dim=-1, dtype=torch.float32)
    ids = torch.topk(p, k, dim=-1)[1]
    weights = p.gather(1, ids).to(logits.dtype)
    shared = torch.arange(n_routed, n_routed + n_shared, device=logits.device).expand(logits.shape[0], n_shared)
    return torch.cat([weights, weights.new_ones(logits.shape[0], n_shared)], 1), torch.cat([ids, shared], 1)


def bench_topk(report: Report, sh: Shapes, quick: bool) -> None:
    """The router's top-k over softmax scores of the routed + shared experts (fuse_shared_experts),
    and the whole softmax router (engines/torch_router.py) against torch's chain of ops."""
    from dsv3_export.kernels.topk import router_topk, router_topk_ref, topk

    n = sh.n_experts + 2
    for m in (*sh.decode_m, sh.prefill_m):
        case = f"router topk M={m} E={n} k={sh.topk}"
        scores = torch.randn(m, n, device=sh.device).softmax(-1)  # [M, E]
        got, want = topk(scores, sh.topk), torch.topk(scores, sh.topk)
        wrong = float((got[1] != want[1]).float().mean()) + float((got[0] != want[0]).float().mean())
        bytes_ = m * n * 4 + m * sh.topk * (4 + 8)
        rows = [add(report, Row("topk", case, "triton topk (sorted)", bench(lambda: topk(scores, sh.topk), sh, quick),
                                error=wrong, tol=0.0, ok=wrong == 0), bytes_=bytes_),
                add(report, Row("topk", case, "torch topk (sorted)",
                                bench(lambda: torch.topk(scores, sh.topk), sh, quick)), bytes_=bytes_),
                add(report, Row("topk", case, "torch topk (sorted=False)",
                                bench(lambda: torch.topk(scores, sh.topk, sorted=False), sh, quick)), bytes_=bytes_)]
        finish_group(rows)
        show(case, rows)
        case = f"softmax router M={m} E={sh.n_experts}+2 k={sh.topk}"
        logits = torch.randn(m, sh.n_experts, device=sh.device, dtype=torch.bfloat16)
        route = dict(n_extra=2, first_extra=sh.n_experts, out_dtype=torch.bfloat16)
        got, want = router_topk(logits, sh.topk, **route), router_topk_ref(logits, sh.topk, **route)
        wrong = float((got[1] != want[1]).float().mean())
        bytes_ = m * sh.n_experts * 2 + m * (sh.topk + 2) * (2 + 8)
        rows = [add(report, Row("topk", case, "triton router_topk, one launch",
                                bench(lambda: router_topk(logits, sh.topk, **route), sh, quick),
                                error=wrong, tol=0.0, ok=wrong == 0), bytes_=bytes_),
                add(report, Row("topk", case, "torch softmax + topk + gather + cat",
                                bench(lambda: _torch_router(logits, sh.topk, sh.n_experts), sh, quick)), bytes_=bytes_)]
        finish_group(rows)
        show(case, rows)
    for m in sorted({sh.decode_m[0], sh.decode_m[-1], sh.prefill_m}):  # 16b: M = 1, 64, 4096
        _bench_router_gate(report, sh, quick, m)


def _untied_mismatch(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, want: torch.Tensor, k: int) -> float:
    """Fraction of rows whose top-k ids differ from the reference's where its top-(k+1) logits hold
    no two within one rounding of x's dtype (kernels/topk.py router_topk_gate: its logits are
    cuBLAS's up to the summation order, then one rounding; tests/kernels/test_topk.py's tie rule)."""
    logits = torch.nn.functional.linear(x, w).float()  # [M, E]
    top = logits.topk(k + 1, dim=1).values  # [M, k + 1]
    step = torch.finfo(x.dtype).eps * top.abs() + 1e-6 * top.abs().amax(1, keepdim=True)
    near_tie = ((top[:, :-1] - top[:, 1:]) <= step[:, :-1] + step[:, 1:]).any(1)
    return float(((ids[:, :k] != want[:, :k]).any(1) & ~near_tie).float().mean())


def _bench_router_gate(report: Report, sh: Shapes, quick: bool, m: int) -> None:
    """The gate GEMM + router in one launch (engines/torch_router.py DSV3_TORCH_ROUTER_GATE) against
    torch's linear + the router's ops, and against torch's linear + the router kernel."""
    from dsv3_export.kernels.topk import router_topk, router_topk_gate, router_topk_gate_ref

    case = f"gate + router M={m} D={sh.dim} E={sh.n_experts}+2 k={sh.topk}"
    x = torch.randn(m, sh.dim, device=sh.device, dtype=torch.bfloat16)
    w = (torch.randn(sh.n_experts, sh.dim, device=sh.device) / sh.dim**0.5).to(torch.bfloat16)
    route = dict(n_extra=2, first_extra=sh.n_experts, out_dtype=torch.bfloat16)
    got, want = router_topk_gate(x, w, sh.topk, **route), router_topk_gate_ref(x, w, sh.topk, **route)
    wrong = _untied_mismatch(x, w, got[1], want[1], sh.topk)
    bytes_ = (m + sh.n_experts) * sh.dim * 2 + m * (sh.topk + 2) * (2 + 8)
    flops = 2 * m * sh.dim * sh.n_experts
    rows = [add(report, Row("topk", case, "triton router_topk_gate, one launch",
                            bench(lambda: router_topk_gate(x, w, sh.topk, **route), sh, quick),
                            error=wrong, tol=0.0, ok=wrong == 0), bytes_=bytes_, flops=flops),
            add(report, Row("topk", case, "torch linear + softmax + topk + gather + cat",
                            bench(lambda: _torch_router(torch.nn.functional.linear(x, w), sh.topk, sh.n_experts), sh,
                                  quick)), bytes_=bytes_, flops=flops),
            add(report, Row("topk", case, "torch linear + triton router_topk",
                            bench(lambda: router_topk(torch.nn.functional.linear(x, w), sh.topk, **route), sh, quick)),
                bytes_=bytes_, flops=flops)]
    finish_group(rows)
    show(case, rows)


GATE_GRAPH_M = (1, 8, 64)  # decode batches of the gate section on the GPU


def bench_gate(report: Report, sh: Shapes, quick: bool) -> None:
    """The MoE gate GEMM + router at decode batches as the decode step runs them, from CUDA graphs:
    router_topk_gate_split (engines/torch_router.py DSV3_TORCH_ROUTER_GATE=split: the experts split over
    programs, the last of a row block to arrive routes), the default (cuBLAS's F.linear + router_topk)
    and the one-program router_topk_gate (=1). Ids checked on each graph's own output after its timing
    (the split form's arrival counters must survive the replays, and be zero after them). The split
    autotuner's key has no batch: M=8 and 64 reuse M=1's choice (as eager decode calls do), so at the
    largest M each split config is also timed pinned (printed; the fastest tabled)."""
    from dsv3_export.kernels import _common
    from dsv3_export.kernels import topk as kt

    route = dict(n_extra=2, first_extra=sh.n_experts, out_dtype=torch.bfloat16)
    ms_list = GATE_GRAPH_M if sh.device == "cuda" else sh.decode_m
    one_program_cfg = None  # router_topk_gate: autotuned at the first M, that choice pinned after (its key has M)
    for m in ms_list:
        case = f"gate + router M={m} D={sh.dim} E={sh.n_experts}+2 k={sh.topk}"
        x = torch.randn(m, sh.dim, device=sh.device, dtype=torch.bfloat16)
        w = (torch.randn(sh.n_experts, sh.dim, device=sh.device) / sh.dim**0.5).to(torch.bfloat16)
        want = kt.router_topk_gate_ref(x, w, sh.topk, **route)[1]
        bytes_ = (m + sh.n_experts) * sh.dim * 2 + m * (sh.topk + 2) * (2 + 8)
        flops = 2 * m * sh.dim * sh.n_experts

        def timed(impl: str, fn, note: str = ""):
            fn()  # autotune outside the graph
            if sh.device == "cuda":
                outs: list = []
                ms = bench(_graph_of(fn, outs).replay, sh, quick)
                torch.cuda.synchronize()
                got = outs[0]
            else:
                ms, got = bench(fn, sh, quick), fn()
            wrong = _untied_mismatch(x, w, got[1], want, sh.topk)
            clean = all(bool((b == 0).all()) for b in _common._arrival_buffers.values())
            return add(report, Row("gate", case, impl + (" (CUDA graph)" if sh.device == "cuda" else ""), ms,
                                   error=wrong, tol=0.0, ok=wrong == 0 and clean,
                                   note=note + ("" if clean else " arrival counters NOT reset")),
                       bytes_=bytes_, flops=flops)

        split = lambda cfg=None: kt.router_topk_gate_split(x, w, sh.topk, config=cfg, **route)  # noqa: E731
        rows = [guarded(report, f"gate {case} split", lambda: timed("triton router_topk_gate_split", split)),
                guarded(report, f"gate {case} one program", lambda: timed(
                    "triton router_topk_gate", lambda: kt.router_topk_gate(x, w, sh.topk, config=one_program_cfg,
                                                                         **route))),
                guarded(report, f"gate {case} linear", lambda: timed(
                    "torch linear + triton router_topk", lambda: kt.router_topk(F.linear(x, w), sh.topk, **route)))]
        if sh.device == "cuda":
            chosen = getattr(kt._router_gate_split_tuned, "best_config", None)
            if rows[0] is not None:
                rows[0].note = f"autotuned at M={ms_list[0]}: {chosen}"
            one_program_cfg = one_program_cfg or getattr(kt._router_gate_tuned, "best_config", None)
        if m == ms_list[-1]:  # each split config pinned at the largest M
            pinned = [guarded(report, f"gate {case} split {cfg}", lambda cfg=cfg: timed(
                "triton router_topk_gate_split pinned", lambda: split(cfg), note=str(cfg)))
                for cfg in kt.GATE_SPLIT_CONFIGS]
            pinned = [r for r in pinned if r is not None]
            print("    split configs pinned: " + "; ".join(f"{r.note}: {r.ms:.4f} ms" for r in pinned), flush=True)
            good = [r for r in pinned if r.ok]
            best = min(good, key=lambda r: r.ms) if good else None
            for r in good:  # the fastest correct one tabled; a wrong one stays as a failed row
                if r is not best:
                    report.rows.remove(r)
            if best is not None:
                best.impl = "triton router_topk_gate_split best pinned config" + best.impl.split("pinned")[1]
                rows.append(best)
        rows = [r for r in rows if r]
        finish_group(rows)
        show(case, rows)


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


# Candidate grouped-GEMM configs for decode, timed beside GROUPED_GEMM_CONFIGS by the moe_cfg
# section: deeper pipelines and narrower N tiles keep more weight bytes in flight per SM when each
# expert has one row (batch-1 decode: the 16b MoE's GEMMs run at ~60% of copy bandwidth, session 7).
MOE_CFG_CANDIDATES = (  # (BLOCK_N, num_warps, num_stages)
    (16, 4, 6), (32, 4, 6), (32, 4, 8), (64, 4, 6), (64, 8, 5), (128, 4, 5),
)


def bench_moe_configs(report: Report, sh: Shapes, quick: bool) -> None:
    """Each grouped-GEMM config on the 16b fp8 MoE's two GEMMs at decode sizes, in CUDA graphs: which
    tile the decode program should tune to (AOTInductor autotunes once, at its example batch)."""
    import triton

    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.kernels import moe as M

    torch.manual_seed(0)
    d, i = sh.dim, sh.moe_inter
    e, k = sh.n_experts + 2, sh.topk + 2  # fuse_shared_experts: 2 shared experts every token takes
    w13, w13s = _quantized_experts(torch.randn(e, 2 * i, d, device=sh.device) / d**0.5)
    w2, w2s = _quantized_experts(torch.randn(e, d, i, device=sh.device) / i**0.5)
    configs = list(M.GROUPED_GEMM_CONFIGS) + [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
                                              for bn, w, st in MOE_CFG_CANDIDATES]
    for t in sh.decode_m:
        x = torch.randn(t, d, device=sh.device, dtype=torch.bfloat16)
        routed = torch.randn(t, sh.n_experts, device=sh.device).topk(sh.topk, dim=-1)[1]
        shared = torch.arange(sh.n_experts, e, device=sh.device).expand(t, -1)
        ids = torch.cat([routed, shared], 1)  # [T, k]
        tw = torch.rand(t, k, device=sh.device)
        active = int(torch.unique(ids).numel())
        sorted_ids, expert_ids, npp = M.moe_align(ids, e, M.choose_block_m(t, k, e))
        xq, xs = Q.act_quant(x)
        h = M.grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True)
        hq, hs = Q.act_quant(h)
        gemms = {  # name -> (call with a config, weight bytes the active experts move)
            "up+SwiGLU": (lambda cfg: M.grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, k, a_scale=xs,
                                                     w_scale=w13s, fuse_swiglu=True, config=cfg),
                          active * 2 * i * d),
            "down": (lambda cfg: M.grouped_gemm(hq, w2, sorted_ids, expert_ids, npp, 1, a_scale=hs, w_scale=w2s,
                                                topk_weights=tw, config=cfg), active * d * i),
        }
        for name, (call, nbytes) in gemms.items():
            case = f"{name} T={t} E={e} k={k} D={d} I={i}"
            want = call(configs[0]).float()
            rows = []
            for cfg in configs:
                label = f"triton BN={cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"

                def one(cfg=cfg, label=label):
                    err = mean_rel(call(cfg).float(), want)
                    ms = bench(_graph_of(lambda: call(cfg)).replay if sh.device == "cuda" else (lambda: call(cfg)),
                               sh, quick)
                    tuned = " (GROUPED_GEMM_CONFIGS)" if cfg in M.GROUPED_GEMM_CONFIGS else ""
                    return add(report, Row("moe_cfg", case, label, ms, error=err, tol=1e-3, ok=err < 1e-3,
                                           note=f"{active} experts active{tuned}"), bytes_=nbytes)

                rows.append(guarded(report, f"moe_cfg {case} {label}", one))
            show(case, [r for r in rows if r])


# Batch sizes of the moe_scan section on the GPU (the CPU smoke test uses Shapes.decode_m).
MOE_SCAN_T = (1, 8, 64)


def bench_moe_scan(report: Report, sh: Shapes, quick: bool) -> None:
    """The 16b fp8 decode MoE (E = 64 + 2 shared, k = 6 + 2) from CUDA graphs: moe_align + up GEMM +
    act_quant(h) + down GEMM as the decode program runs it now (block_m 16) against the two
    grouped_gemm_scan GEMMs (no alignment; DSV3_TORCH_MOE_ALIGN=scan) with the same act_quant: the
    scan's error against the aligned chain (0 with equal configs; each form autotunes its own) and
    the weight-byte floor of the active experts. Autotunes at the first T (4 scan configs per GEMM)."""
    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.kernels import moe as M

    torch.manual_seed(0)
    d, i = sh.dim, sh.moe_inter
    e, k = sh.n_experts + 2, sh.topk + 2  # fuse_shared_experts: 2 shared experts every token takes
    w13, w13s = _quantized_experts(torch.randn(e, 2 * i, d, device=sh.device) / d**0.5)
    w2, w2s = _quantized_experts(torch.randn(e, d, i, device=sh.device) / i**0.5)
    for t in MOE_SCAN_T if sh.device == "cuda" else sh.decode_m:
        x = torch.randn(t, d, device=sh.device, dtype=torch.bfloat16)
        routed = torch.randn(t, sh.n_experts, device=sh.device).topk(sh.topk, dim=-1)[1]
        shared = torch.arange(sh.n_experts, e, device=sh.device).expand(t, -1)
        ids = torch.cat([routed, shared], 1)  # [T, k]
        tw = torch.rand(t, k, device=sh.device)
        xq, xs = Q.act_quant(x)
        active = int(torch.unique(ids).numel())
        nbytes = active * 3 * i * d  # fp8 w13 [2I, D] + w2 [D, I] of each active expert

        def aligned():
            sorted_ids, expert_ids, npp = M.moe_align(ids, e, 16)
            h = M.grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True)
            hq, hs = Q.act_quant(h)
            return M.grouped_gemm(hq, w2, sorted_ids, expert_ids, npp, 1, a_scale=hs, w_scale=w2s, topk_weights=tw)

        def scan():
            h = M.grouped_gemm_scan(xq, w13, ids, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True)
            hq, hs = Q.act_quant(h)
            return M.grouped_gemm_scan(hq, w2, ids, 1, a_scale=hs, w_scale=w2s, topk_weights=tw)

        case = f"T={t} E={e} k={k} D={d} I={i}"
        want = aligned().float()
        rows = []
        for impl, fn, note in (("triton moe_align + up + act_quant + down", aligned, "the decode program now"),
                               ("triton scan up + act_quant + scan down", scan, "DSV3_TORCH_MOE_ALIGN=scan")):
            def one(impl=impl, fn=fn, note=note):
                err = mean_rel(fn().float(), want)
                ms = bench(_graph_of(fn).replay if sh.device == "cuda" else fn, sh, quick)
                return add(report, Row("moe_scan", case, impl, ms, error=err, tol=1e-3, ok=err < 1e-3,
                                       note=f"{note}; {active} experts active, floor = their fp8 weights"),
                           bytes_=nbytes)

            rows.append(guarded(report, f"moe_scan {case} {impl}", one))
        show(case, [r for r in rows if r])


SECTIONS = {  # cheap sections first: if the time budget runs out, the expensive autotuning goes last
    "copy": ("device copy bandwidth", bench_copy),
    "quant": ("fp8 act_quant / weight_dequant", bench_act_quant),
    "norm": ("fused add + RMSNorm", bench_rmsnorm),
    "topk": ("router top-k", bench_topk),
    "gate": ("MoE gate GEMM + router at decode: split over programs vs cuBLAS + router (CUDA graphs)", bench_gate),
    "absorb": ("MLA absorbed projections (W_UK, W_UV per head)", bench_absorb),
    "tail": ("MLA decode tail: split + merge/W_UV/act_quant in one kernel vs the separate kernels (CUDA graphs)",
             bench_tail),
    "mla": ("MLA absorbed attention", bench_mla),
    "mla_sweep": ("MLA decode variants (TMA, splits, merge), pinned configs, CUDA graphs", bench_mla_sweep),
    "moe": ("MoE: grouped GEMM + fused MoE", bench_moe),
    "moe_cfg": ("grouped GEMM configs at decode (fp8, 16b MoE)", bench_moe_configs),
    "moe_scan": ("decode MoE without moe_align: grouped_gemm_scan vs align + grouped_gemm (fp8, 16b)",
                 bench_moe_scan),
    "fp8_prefill": ("fp8 blockwise GEMM at prefill M: TMA candidates, pinned", bench_fp8_prefill),
    "fp8": ("fp8 blockwise GEMM", bench_fp8_gemm),
}


# --------------------------------------------------------------------------------------------
# output


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def to_markdown(report: Report) -> str:
    lines = [f"# Kernel benchmark on {report.device}", "",
             f"versions: {report.versions}; device copy {_fmt(report.copy_tbps, '.2f')} TB/s; floors use "
             f"{HBM_BW / 1e12:.1f} TB/s, {FP8_PEAK / 1e12:.0f} TFLOP/s fp8, {BF16_PEAK / 1e12:.0f} TFLOP/s bf16", "",
             "| section | case | impl | ms | TFLOP/s | TB/s | floor ms | floor/time | speedup vs best torch | err (tol) | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in report.rows:
        check = "-" if r.error is None else f"{r.error:.2e} ({r.tol:g}) {'ok' if r.ok else 'FAIL'}"
        lines.append(f"| {r.section} | {r.case} | {r.impl} | {_fmt(r.ms, '.4f')} | {_fmt(r.tflops, '.1f')} | "
                     f"{_fmt(r.tbps, '.2f')} | {_fmt(r.floor_ms, '.4f')} | {_fmt(r.frac_of_roofline, '.2f')} | "
                     f"{_fmt(r.speedup_vs_best_alt, '.2f')} | {check} | {r.note} |")
    if report.failures:
        lines += ["", "## failures", *[f"- {f}" for f in report.failures]]
    return "\n".join(lines) + "\n"


def print_table(report: Report) -> None:
    """The summary, compact (~110 characters a row) so that a tail of ~12k characters holds it."""
    print(f"\n{'case':<40} {'impl':<34} {'ms':>9} {'TF/s':>7} {'TB/s':>5} {'%roof':>5} {'vs best':>7} check")
    for r in report.rows:
        check = "" if r.ok is None else ("ok" if r.ok else f"FAIL err={r.error:.2e}")
        print(f"{r.case[:40]:<40} {r.impl[:34]:<34} {_fmt(r.ms, '9.4f')} {_fmt(r.tflops, '7.1f')} "
              f"{_fmt(r.tbps, '5.2f')} "
              f"{_fmt(None if r.frac_of_roofline is None else 100 * r.frac_of_roofline, '5.1f')} "
              f"{_fmt(r.speedup_vs_best_alt, '7.2f')} {check}")
    for f in report.failures:
        print("FAILED:", f[:240])


def write_reports(report: Report, out: Path) -> None:
    """kernels.json + kernels.md, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(device=report.device, versions=report.versions, copy_tbps=report.copy_tbps,
                   ceilings=dict(hbm_bw=HBM_BW, fp8_peak=FP8_PEAK, bf16_peak=BF16_PEAK),
                   rows=[asdict(r) for r in report.rows], failures=report.failures)
    for name, text in (("kernels.json", json.dumps(payload, indent=1)), ("kernels.md", to_markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def run_section(report: Report, key: str, sh: Shapes, quick: bool) -> None:
    """One guarded section: an exception is printed and recorded, and the run goes on."""
    title, fn = SECTIONS[key]
    t0 = time.time()
    print(f"\n== {title}", flush=True)
    try:
        fn(report, sh, quick)
    except Exception as e:  # noqa: BLE001 - a benchmark section must never stop the run
        msg = f"{title}: {type(e).__name__}: {e}"
        report.failures.append(msg)
        print("SECTION FAILED:", msg, flush=True)
        traceback.print_exc()
    print(f"   ({time.time() - t0:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="every shape, longer timing (the default run is the ~4-minute quick set)")
    parser.add_argument("--quick", action="store_true", help="the default; kept for old command lines")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="start no new section after this many seconds (default: a ~4-minute run)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU through TRITON_INTERPRET=1: checks the script, times nothing useful")
    parser.add_argument("--sweep-fused", action="store_true",
                        help="the MLA split sweep also times the fused-merge form (minutes of autotuning)")
    args = parser.parse_args(argv)
    SWEEP_MERGES[1:] = ["fused"] if args.sweep_fused else []
    if args.full and args.quick:
        parser.error("--full and --quick contradict each other")
    quick = not args.full
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        sh = TINY
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (or --cpu-smoke).", file=sys.stderr)
        return 2
    else:
        sh = Shapes()
    if quick:
        sh = dataclasses.replace(sh, decode_m=sh.decode_m[:1] + sh.decode_m[-1:], mla_decode=sh.mla_decode[:2])
    _bootstrap_imports()
    import triton

    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if sh.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.multi_processor_count} SMs)"
    else:
        device = "CPU smoke test (TRITON_INTERPRET=1, tiny shapes)"
    report = Report(device=device,
                    versions=dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda))
    print(f"{report.device}; {report.versions}", flush=True)
    t0 = time.time()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    for key in [k for k in SECTIONS if k in wanted]:
        if time.time() - t0 > args.budget_s:
            msg = f"{SECTIONS[key][0]}: skipped, the {args.budget_s:.0f} s budget was spent"
            report.failures.append(msg)
            print(msg, flush=True)
            continue
        run_section(report, key, sh, quick)
        if out_dir:  # after every section, so a run killed at its time limit still leaves results
            write_reports(report, out_dir)
    if out_dir:
        write_reports(report, out_dir)
        print(f"wrote {out_dir / 'kernels.json'} and {out_dir / 'kernels.md'}")
    print(f"total {time.time() - t0:.0f} s on {report.device}; {report.versions}", flush=True)
    print_table(report)  # last: the device runner returns only the tail of stdout
    wrong = [r for r in report.rows if r.ok is False]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
