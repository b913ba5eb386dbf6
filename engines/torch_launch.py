"""How the torch backend's triton_ops launch our kernels: a kernel family's LaunchSpec through wrap_triton.

Shared by the op modules (engines/torch_triton.py fp8_linear, torch_triton_moe.py, torch_triton_mla.py,
torch_router.py): on the GPU the autotuned (or one-config) kernel, under the CPU interpreter the first config;
a gated spec with a zero grid (engines/torch_decode_gemv.py gated) launches nothing.
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from dsv3_export.engines.torch_decode_gemv import gated
from dsv3_export.kernels import fp8_quant as kq
from dsv3_export.kernels._common import LaunchSpec, fake_values_only, is_interpreted

def launch_spec(spec: LaunchSpec | None) -> None:
    """A kernel family's launch (its *_spec) through wrap_triton: the autotuned kernel on the GPU,
    the first config under the CPU interpreter. The interpreter runs a kernel even on fake tensors
    (wrap_triton defers only compiled kernels), so there a launch whose outputs are only fake
    metadata is skipped: their shapes are set (kernels/_common.py fake_values_only). None: no launch
    (engines/torch_decode_gemv.py gated)."""
    if spec is None:
        return
    if spec.tuned is not None:
        wrap_triton(spec.tuned)[spec.grid](*spec.args, **spec.kwargs)
        return
    if is_interpreted(spec.kernel) and fake_values_only():
        return
    cfg = spec.configs[0]
    meta = {**spec.kwargs, **cfg.kwargs}
    wrap_triton(spec.kernel)[spec.grid(meta)](*spec.args, **spec.kwargs, **cfg.kwargs)


def act_quant_launch(x: torch.Tensor, gate=1, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> fp8 [M, K], fp32 scales [M, ceil(K/128)] (kernels/fp8_quant.py); gate 0: no launch
    (engines/torch_decode_gemv.py gated). rows (>= M, may be symbolic): both outputs have that many rows, of
    which the kernel writes the first M (engines/torch_scaled_mm.py pads M for cuBLAS)."""
    q, s = kq.act_quant_outputs(x.shape[0] if rows is None else rows, x.shape[1], x.device)
    launch_spec(gated(kq.act_quant_spec(x, q, s, x.is_cuda), gate))  # the scale's rounding as torch's on x's device
    return q, s

