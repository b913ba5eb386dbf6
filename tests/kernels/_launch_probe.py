"""Host-side cost of the kernel launchers, measured on the CPU with the GPU launch itself mocked.

Run as `python -m tests.kernels._launch_probe` WITHOUT TRITON_INTERPRET (the test runs it in a
subprocess): the kernels are then real JITFunction / Autotuner objects, exactly the launch path of
the GPU, but JITFunction.run and Autotuner.run are replaced by counters, so everything before the
driver call (checks, allocation, config choice, wrap_triton or not) is timed and nothing needs a
GPU. For each launcher it prints one JSON line: microseconds per call in eager mode, the same
with the torch.library.wrap_triton path forced (what every eager launch paid in the first H200
run), how many kernel launches one call makes, and how many of them went through wrap_triton
in eager mode and under FakeTensorMode (tracing must still wrap them).
"""

from __future__ import annotations

import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET: this probes compiled launches"

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from dsv3_export.kernels import _common, fp8_gemm, fp8_quant, mla_decode, moe, topk  # noqa: E402

COUNTS = {"launch": 0, "wrapped": 0}


def _count_launch(self, *args, **kwargs):
    COUNTS["launch"] += 1


JITFunction.run = _count_launch
Autotuner.run = _count_launch
_real_wrap = torch.library.wrap_triton


def _counting_wrap(kernel):
    COUNTS["wrapped"] += 1
    return _real_wrap(kernel)


torch.library.wrap_triton = _counting_wrap


def _cases():
    bf, f8 = torch.bfloat16, torch.float8_e4m3fn
    x = torch.randn(1, 2048, dtype=bf)
    logits = torch.randn(1, 64, dtype=bf)
    yield "router_topk M=1", lambda: topk.router_topk(logits, 6, n_extra=2, first_extra=64, out_dtype=bf)
    yield "act_quant M=1", lambda: fp8_quant.act_quant(x)
    wq, ws = torch.zeros(10944, 2048, dtype=f8), torch.ones(86, 16)
    a, a_s = torch.zeros(1, 2048, dtype=f8), torch.ones(1, 16)
    yield "fp8_gemm M=1", lambda: fp8_gemm.fp8_gemm(a, a_s, wq, ws)
    q, qp = torch.randn(32, 16, 512, dtype=bf), torch.randn(32, 16, 64, dtype=bf)
    cache = torch.randn(32, 64, 576, dtype=bf)
    seqlens = torch.full((32,), 64, dtype=torch.int32)
    yield "mla_decode B=32", lambda: mla_decode.mla_decode(q, qp, cache[..., :512], cache[..., 512:], seqlens, 0.1)
    w13, w2 = torch.randn(8, 96, 64, dtype=bf), torch.randn(8, 64, 48, dtype=bf)
    xm = torch.randn(4, 64, dtype=bf)
    ids = torch.randint(0, 8, (4, 2))
    tw = torch.rand(4, 2, dtype=bf)
    yield "fused_moe bf16 T=4", lambda: moe.fused_moe(xm, w13, w2, tw, ids)


def _per_call_us(fn, n: int = 200) -> float:
    fn()
    best = float("inf")
    for _ in range(3):  # best of 3: the CPU is shared
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> int:
    real_tracing = _common.tracing
    for name, fn in _cases():
        COUNTS.update(launch=0, wrapped=0)
        fn()
        launches, wrapped_eager = COUNTS["launch"], COUNTS["wrapped"]
        eager_us = _per_call_us(fn)
        _common.tracing = lambda: True  # the old behaviour: wrap_triton on every launch
        try:
            forced_us = _per_call_us(fn)
        finally:
            _common.tracing = real_tracing
        COUNTS.update(launch=0, wrapped=0)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fn()
        print(json.dumps(dict(case=name, eager_us=round(eager_us, 1), wrap_triton_us=round(forced_us, 1),
                              launches=launches, wrapped_eager=wrapped_eager,
                              wrapped_fake=COUNTS["wrapped"], launched_fake=COUNTS["launch"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
