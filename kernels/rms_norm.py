"""Residual add + RMSNorm of whole rows: h = r + d, x = rms_norm(h) * w, each row in one load.

Why: the attention norm of a decode step (h = residual + the last layer's output, x = RMSNorm(h) feeding the
wq + wkv_a GEMM) is an Inductor kernel of its own per layer (~2.2 us a launch in the H200 batch-1 16b step,
sessions 22-23). engines/torch_attn_norm.py moves it into the decode GEMV's prologue (kernels/fp8_gemv.py NORM,
built on `add_rms_stats` below) at the batches the GEMV serves; at larger batches, where the tile GEMM runs, this
kernel computes x and h instead, gated the other way (engines/torch_decode_gemv.py), so one compiled program
launches one or the other.

Algorithm: one program per row; the row's r and d are loaded whole ([KP] = K rounded up to a power of two), so
the mean square costs one round trip to memory. Numerics as the eager program's: h = r + d rounded to r's dtype
(torch's add), the mean square of h in fp32, x = h * (1 / sqrt(mean + eps)) * w in fp32 rounded to r's dtype (the
reference RMSNorm in fp32, then the cast): h the same bits; x within one rounding of r's dtype, from the fp32
summation order of the mean square and, on the GPU, Triton's approximate square root and division where torch takes
rsqrt. bf16 rounding by integers (kernels/topk.py round_to), so the CPU interpreter's truncating cast does not
decide it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import LaunchSpec, autotune_or_single, check_tensor, launch, next_pow2
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.topk import round_to

DTYPES = (torch.bfloat16, torch.float16)
# One program per row, the row in registers: K = 7168 (V3) is 28 values per thread per tensor at 8 warps.
MAX_K = 16384
NORM_CONFIGS = [
    triton.Config({}, num_warps=8, num_stages=1),
    triton.Config({}, num_warps=4, num_stages=1),
]


class ResidualNorm(NamedTuple):
    """A norm a kernel computes its input rows from (kernels/fp8_gemv.py NORM): x = rms_norm(r + d) * nw; r, d [M, K]
    with unit stride along K, nw [K], and h [M, K] (r's dtype) that the kernel writes r + d into."""

    r: torch.Tensor
    d: torch.Tensor
    nw: torch.Tensor
    eps: float
    h: torch.Tensor


@triton.jit
def add_rms_stats(r_row, d_row, K, eps, KP: tl.constexpr):
    """(h [KP] in r's dtype, 1 / rms(h) fp32) of one row: h = r + d rounded as torch's add, masked past K."""
    cols = tl.arange(0, KP)
    mask = cols < K
    r = tl.load(r_row + cols, mask=mask, other=0.0)
    h = round_to(r.to(tl.float32) + tl.load(d_row + cols, mask=mask, other=0.0).to(tl.float32), r.dtype)
    hf = h.to(tl.float32)
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64 scalars
    return h, 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / K + eps)


@waits_for_producer
@triton.jit
def _add_rms_norm_kernel(r_ptr, d_ptr, w_ptr, x_ptr, h_ptr, K, stride_r, stride_d, stride_x, stride_h, eps,
                         KP: tl.constexpr):
    """Row program_id(0): h = r + d and x = rms_norm(h) * w, both in r's dtype."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    row = tl.program_id(0).to(tl.int64)
    h, inv = add_rms_stats(r_ptr + row * stride_r, d_ptr + row * stride_d, K, eps, KP)
    cols = tl.arange(0, KP)
    mask = cols < K
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x = round_to(h.to(tl.float32) * inv * w, h.dtype)
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    tl.store(x_ptr + row * stride_x + cols, x, mask=mask)


_norm_single = autotune_or_single(_add_rms_norm_kernel, NORM_CONFIGS[:1], key=[])  # the config's warps in Inductor


def check_norm(r: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> None:
    """Raise naming the problem when r, d [M, K] and w [K] are not what the kernel takes."""
    check_tensor("add_rms_norm: residual", r, dtypes=DTYPES, ndim=2)
    check_tensor("add_rms_norm: delta", d, dtypes=(r.dtype,), ndim=2, device=r.device)
    check_tensor("add_rms_norm: weight", w, dtypes=(r.dtype, torch.float32), ndim=1, device=r.device)
    if d.shape != r.shape or w.shape[0] != r.shape[1]:
        raise ValueError(f"add_rms_norm: residual {tuple(r.shape)}, delta {tuple(d.shape)} and weight "
                         f"{tuple(w.shape)} must be [M, K], [M, K] and [K]")
    if r.shape[1] > MAX_K:
        raise ValueError(f"add_rms_norm: K = {r.shape[1]} rows exceed the one-load row of {MAX_K}")
    for name, t in (("residual", r), ("delta", d), ("weight", w)):
        if t.stride(-1) != 1:
            raise ValueError(f"add_rms_norm: {name} needs unit stride along its last dim, got strides {t.stride()}")


def add_rms_norm_spec(r: torch.Tensor, d: torch.Tensor, w: torch.Tensor, eps: float, x: torch.Tensor,
                      h: torch.Tensor) -> LaunchSpec:
    """The launch writing x and h [M, K] (unit stride along K) from r, d, w (checked by the caller)."""
    m, k = r.shape
    return LaunchSpec(_add_rms_norm_kernel, _norm_single, NORM_CONFIGS, lambda meta: (m,),
                      (r, d, w, x, h, k, r.stride(0), d.stride(0), x.stride(0), h.stride(0), float(eps)),
                      dict(KP=next_pow2(k)))


def add_rms_norm(r: torch.Tensor, d: torch.Tensor, w: torch.Tensor, eps: float, *,
                 config: triton.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, h) for r, d [M, K] and the norm's weight w [K]: h = r + d, x = rms_norm(h) * w (module docstring)."""
    check_norm(r, d, w)
    x, h = torch.empty_like(r), torch.empty_like(r)
    if r.numel():
        launch(*add_rms_norm_spec(r, d, w, eps, x, h), config)
    return x, h


def add_rms_norm_ref(r: torch.Tensor, d: torch.Tensor, w: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager program's (x, h): torch's add, the reference RMSNorm in fp32, the cast back."""
    h = r + d
    x = torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), w.float(), eps).to(r.dtype)
    return x, h
