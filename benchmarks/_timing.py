"""Timing shared by the benchmark scripts: CUDA events over back-to-back calls (cuda_ms, the eager host cost of each
call included) and the device copy bandwidth the floors divide by (copy_tbps)."""

from __future__ import annotations

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


def copy_tbps(nbytes: int = 1 << 29) -> float:
    """TB/s of a device-to-device copy of nbytes (read + write counted), triton.testing.do_bench's median: the copy
    row of benchmarks/kernels.py (kbench.common.bench_copy), whose bandwidth issue #4's MLA target is a share of."""
    import triton

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e12
