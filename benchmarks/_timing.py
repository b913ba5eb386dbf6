"""CUDA-event timing shared by the benchmark scripts (the eager host cost of each call included)."""

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
