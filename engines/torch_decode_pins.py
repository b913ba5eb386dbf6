"""The decode program's per-row kernels with one fixed config instead of Inductor's autotune pick.

Why: AOTInductor times each kernel's configs once, at the tuning batch (64 rows), and the pick then
serves every batch. For act_quant and the router the configs differ by less than the timing noise
there, so each build picked differently, and at batch 1 the picks are not equal: in six 27-layer 16b
fp8 builds on the H200 (session 15, benchmarks/RESULTS.md) act_quant took 1.2 us per call with one
row per program (BLOCK_M 1, 1 warp) and 2.0 us with BLOCK_M 8 or 32 (109 calls per step: up to
90 us), the router 2.2 us with one row per program and 3.7 us with 16 rows (26 calls: 40 us). One
row per program is also what a larger decode batch needs from these memory-bound kernels (a
program per row, M programs). Prefill keeps the autotuner.

DSV3_TORCH_DECODE_PINS=0 restores the autotuned picks (read when a program is lowered).
"""

from __future__ import annotations

import functools

from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels import fp8_quant as kq
from dsv3_export.kernels import topk as kt
from dsv3_export.kernels._common import LaunchSpec, autotune_or_single

DECODE_PINS_ENV = "DSV3_TORCH_DECODE_PINS"
DECODE_PINS_CHOICES = {"1": "act_quant and the router with one row per program, decode program",
                       "0": "Inductor's autotune picks"}
# kernel -> the config it runs with in the decode program
PINNED_CONFIGS = {
    kq._act_quant_kernel: kq.ACT_QUANT_CONFIGS[1],
    kq._act_quant_ieee_kernel: kq.ACT_QUANT_CONFIGS[1],
    kt._router_kernel: kt.ROUTER_CONFIGS[0],
}
assert all(c.kwargs.get("BLOCK_M", c.kwargs.get("BLOCK_ROWS")) == 1 for c in PINNED_CONFIGS.values())


def decode_pins() -> bool:
    return env_choice(DECODE_PINS_ENV, "1", DECODE_PINS_CHOICES) == "1"


@functools.cache
def _single(kernel):
    """The kernel's pinned config as a one-config autotuner (None under the interpreter): Triton times nothing, and Inductor compiles
    the kernel with the config's warps and stages."""
    return autotune_or_single(kernel, [PINNED_CONFIGS[kernel]], key=[])


def pinned(spec: LaunchSpec | None, decode: bool) -> LaunchSpec | None:
    """spec with its pinned config in a decode program (DECODE_PINS_ENV on); unchanged otherwise."""
    if spec is None or not decode or spec.kernel not in PINNED_CONFIGS or not decode_pins():
        return spec
    config = PINNED_CONFIGS[spec.kernel]
    return spec._replace(tuned=_single(spec.kernel), configs=[config])
