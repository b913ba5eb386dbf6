"""Timing shared by the benchmark scripts: CUDA events over back-to-back calls (cuda_ms, the eager host cost of each
call included), medians of single calls with the L2 evicted before each (median_ms) and the device copy bandwidth the
floors divide by (copy_tbps)."""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch


def cuda_ms(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Mean ms per call of fn over `reps` back-to-back calls after `warmup` ones, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


# How the L2 is emptied between timed samples (median_ms). "zero" is triton.testing.do_bench's own: a 256 MiB buffer
# zeroed, which leaves the L2 full of dirty lines, so the timed call pays their write-back to HBM (up to the L2's
# 50 MB at ~4 TB/s, ~12 us) as its first reads evict them. "read" reads a 256 MiB buffer instead: the lines left
# are clean, as in a decode step whose earlier kernels write kilobytes. Both leave none of the timed call's data.
L2_FLUSHES = ("zero", "read")
_FLUSH_BYTES = 256 << 20


def l2_flush(kind: str) -> Callable[[], Any]:
    """The eviction median_ms runs before each sample (see L2_FLUSHES)."""
    if kind not in L2_FLUSHES:
        raise ValueError(f"unknown L2 flush {kind!r}; choose from {L2_FLUSHES}")
    buf = torch.zeros(_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    if kind == "zero":
        return buf.zero_
    floats = buf.view(torch.float32)  # zeros: a float sum reads them in place (an int64 sum would first copy them)
    return lambda: floats.sum()  # a read-only kernel; its 4-byte result is dropped


def median_ms(fn: Callable[[], Any], flush: str = "zero", warmup_ms: float = 25.0, rep_ms: float = 100.0,
              samples: int | None = None) -> float:
    """Median ms of one call of fn, each sample timed by CUDA events right after an L2 flush of the given kind; as
    many samples as fit rep_ms (estimated from 5 calls, the flush included) unless `samples` is given. With
    flush="zero" this is triton.testing.do_bench's measurement."""
    evict = l2_flush(flush)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        evict()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    samples = samples or max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
    for start, end in zip(starts, ends):
        evict()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def interleaved_ms(fns: dict[str, Callable[[], Any]], flush: str = "zero", rounds: int = 5, warmup_ms: float = 10.0,
                   rep_ms: float = 40.0) -> dict[str, list[float]]:
    """median_ms of each fn, round-robin over `rounds` rounds: {name: [ms per round]}. A GPU whose clocks drift with
    power and heat within a run (the H200's blockwise _scaled_mm moved by 5% between rounds in session 29) moves the
    fns of one round alike, so the per-round ratios are steadier than one median_ms per fn, timed minutes apart.
    Round r starts at fn r % len(fns) (then in order, wrapping): which fn starts a round rotates, so with two fns
    each precedes the other in turn; with three, each still follows its predecessor in the dict in 2 of 3 rounds
    (session 32, w2's Gluon GEMM against cuBLAS: 0.951x twice with every round in one order, cuBLAS after the
    0.33 ms Triton GEMM and Gluon after cuBLAS; 0.966x rotated; 0.98-1.00x in pairs)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds if names else 0):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            times[name].append(median_ms(fns[name], flush, warmup_ms, rep_ms))
    return times


def copy_tbps(nbytes: int = 1 << 29, flush: str = "zero") -> float:
    """TB/s of a device-to-device copy of nbytes (read + write counted), the median of median_ms: the copy row of
    benchmarks/kernels.py (kbench.common.bench_copy), whose bandwidth issue #4's MLA target is a share of."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), flush)
    return 2 * nbytes / (ms * 1e-3) / 1e12
