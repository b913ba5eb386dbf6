"""What every kernel family's section shares: the shapes (the 16b preset; TINY for the CPU smoke
test), the roofline ceilings, the result rows and the report, and the timing / checking / printing
helpers.

A section is `bench_x(report, sh, quick)`: it checks each implementation against its reference at
sh's shapes, times it with bench() (do_bench's median on the GPU), adds one Row per implementation
(add() fills the roofline columns), sets the speedups with finish_group() and prints the case with
show(). bench_copy (section `copy`) lives here because mla_sweep measures the copy bandwidth itself
when `copy` did not run first.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


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
    root = Path(__file__).resolve().parents[2]  # benchmarks/kbench/common.py -> the checkout
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
    l2_flush: str = ""  # how the L2 was emptied between timed samples (L2_FLUSH)
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# helpers


# How bench() empties the L2 before each sample (benchmarks/_timing.py L2_FLUSHES); kernels.py --l2-flush sets it.
# "read" leaves clean lines; "zero" (do_bench's, every run before session 28) leaves dirty ones whose write-back the
# timed call pays: ~9 us per call on the H200 (benchmarks/l2_flush_probe.py).
L2_FLUSH = "read"


def bench(fn, sh: Shapes, quick: bool) -> float:
    """Median milliseconds: _timing.median_ms on the GPU (do_bench's method with the L2_FLUSH eviction), one timed
    call on the CPU smoke test."""
    if sh.device == "cpu":  # the smoke test checks the plumbing; one call, no warm-up
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from _timing import median_ms  # benchmarks/_timing.py: benchmarks/ leads sys.path when kernels.py runs

    return median_ms(fn, L2_FLUSH, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100)


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


def bench_copy(report: Report, sh: Shapes, quick: bool) -> None:
    n = (1 << 29) if sh.device == "cuda" else (1 << 20)  # 512 MiB each way on the GPU
    src = torch.empty(n, dtype=torch.uint8, device=sh.device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), sh, quick)
    report.copy_tbps = 2 * n / (ms * 1e-3) / 1e12
    add(report, Row("copy", f"{n >> 20} MiB", "torch copy_", ms), bytes_=2 * n)
    print(f"  device copy: {report.copy_tbps:.2f} TB/s (read + write)")


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
