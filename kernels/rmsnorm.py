"""RMSNorm, optionally fused with the residual add that precedes it in every DeepSeek block, and
optionally with the 1x128 fp8 quantization of its output that the next fp8 GEMM needs.

    h = x + residual          (rounded to x.dtype, exactly what the unfused `x + residual` gives)
    y = h / sqrt(mean(h^2) + eps) * weight      (fp32 math, cast to x.dtype)
    q, s = act_quant(y)       (rmsnorm_quant: of y as stored, bit for bit kernels/fp8_quant.act_quant)

Layout: x, residual [..., D] with unit stride on D (rows flattened), weight [D]. One program
normalizes BLOCK_ROWS rows with the whole row (next power of 2 >= D) in registers: one read of x
(and residual), one write of y (and h), the memory-bound minimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsv3_export.kernels._common import (FP8_DTYPE, QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv,
                                         check_tensor, launch, next_pow2)
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.fp8_quant import quantize_rows
from dsv3_export.reference import fp8 as fp8_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

RMSNORM_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4}, num_warps=8, num_stages=1),
]


@waits_for_producer
@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, q_ptr, s_ptr,
    ROWS, D, eps,
    stride_x, stride_res, stride_y, stride_h, stride_q, stride_s,
    HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    """QUANT: also q fp8 [ROWS, D] and s fp32 [ROWS, ceil(D/128)] from y (BLOCK_D >= 128)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64 scalars
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < ROWS) & (cols[None, :] < D)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows64 * stride_res + cols[None, :], mask=mask, other=0.0)
        h = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)  # round like the unfused add
        tl.store(h_ptr + rows64 * stride_h + cols[None, :], h, mask=mask)
        x = h
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)  # [BLOCK_ROWS]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = (xf * inv_rms[:, None] * w[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y, mask=mask)
    if QUANT:  # act_quant of y as stored: its 128-blocks are rows of a [BLOCK_ROWS * NB, 128] view
        yq = tl.reshape(tl.where(mask, y.to(tl.float32), 0.0), (BLOCK_ROWS * (BLOCK_D // 128), 128))
        q, s = quantize_rows(yq, SCALE_RECIPROCAL)
        q = tl.reshape(q, (BLOCK_ROWS, BLOCK_D))
        tl.store(q_ptr + rows64 * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        blocks = tl.arange(0, BLOCK_D // 128)
        tl.store(s_ptr + rows64 * stride_s + blocks[None, :], tl.reshape(s, (BLOCK_ROWS, BLOCK_D // 128)),
                 mask=(rows[:, None] < ROWS) & (blocks[None, :] * 128 < D))


_rmsnorm_tuned = autotune_or_single(_rmsnorm_kernel, RMSNORM_CONFIGS, key=["D", "HAS_RESIDUAL", "QUANT"])


def rmsnorm_spec(x2: torch.Tensor, res2: torch.Tensor | None, weight: torch.Tensor, y: torch.Tensor,
                 h: torch.Tensor | None, q: torch.Tensor | None, s: torch.Tensor | None, eps: float,
                 scale_reciprocal: bool) -> LaunchSpec:
    """One launch over rows [R, D] (unit stride on D) into given outputs (checked by the caller)."""
    rows, d = x2.shape
    quant = q is not None
    dummy = y  # never read or written: the constexpr flags compile its uses away
    grid = lambda meta: (cdiv(rows, meta["BLOCK_ROWS"]),)  # noqa: E731
    args = (x2, res2 if res2 is not None else x2, weight, y, h if h is not None else dummy,
            q if quant else dummy, s if quant else dummy, rows, d, float(eps),
            x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0), h.stride(0) if h is not None else 0,
            q.stride(0) if quant else 0, s.stride(0) if quant else 0)
    kwargs = dict(HAS_RESIDUAL=res2 is not None, QUANT=quant, SCALE_RECIPROCAL=scale_reciprocal,
                  BLOCK_D=max(next_pow2(d), QUANT_BLOCK) if quant else next_pow2(d))
    return LaunchSpec(_rmsnorm_kernel, _rmsnorm_tuned, RMSNORM_CONFIGS, grid, args, kwargs)


def rmsnorm_outputs(x2: torch.Tensor, residual: bool, quant: bool) -> tuple:
    """(y, h, q, s) for rows x2 [R, D]: y [R, D] in x2's dtype, h likewise with a residual (else
    None), q fp8 [R, D] and s fp32 [R, ceil(D/128)] when quantizing (else None)."""
    rows, d = x2.shape
    y = torch.empty((rows, d), dtype=x2.dtype, device=x2.device)
    h = torch.empty((rows, d), dtype=x2.dtype, device=x2.device) if residual else None
    q = torch.empty((rows, d), dtype=FP8_DTYPE, device=x2.device) if quant else None
    s = torch.empty((rows, cdiv(d, QUANT_BLOCK)), dtype=torch.float32, device=x2.device) if quant else None
    return y, h, q, s


def _checked_rows(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, name: str):
    check_tensor(f"{name}: x", x, dtypes=DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least 1 dim [..., D]")
    d = x.shape[-1]
    check_tensor(f"{name}: weight", weight, dtypes=DTYPES, ndim=1, device=x.device, contiguous=True)
    if weight.shape[0] != d:
        raise ValueError(f"{name}: weight has {weight.shape[0]} entries, x's last dim is {d}")
    if residual is not None:
        check_tensor(f"{name}: residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    x2 = x.reshape(-1, d)  # [rows, D]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    res2 = None
    if residual is not None:
        res2 = residual.reshape(-1, d)  # [rows, D]
        res2 = res2 if res2.stride(-1) == 1 else res2.contiguous()
    return x2, res2


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
            config: triton.Config | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> y [..., D]; with residual: (y, h = x + residual), y = rmsnorm(h)."""
    x2, res2 = _checked_rows(x, weight, residual, "rmsnorm")
    n_rows, d = x2.shape
    y, h, _, _ = rmsnorm_outputs(x2, residual is not None, False)
    if n_rows and d:
        launch(*rmsnorm_spec(x2, res2, weight, y, h, None, None, eps, False), config)
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), h.view(x.shape)


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
                  scale_reciprocal: bool | None = None, config: triton.Config | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (y [..., D], h [..., D] or None without residual, q fp8 [..., D], s fp32 [..., ceil(D/128)]).

    q, s = fp8_quant.act_quant(y) bit for bit (scale_reciprocal: as there; default as on x's device).
    """
    x2, res2 = _checked_rows(x, weight, residual, "rmsnorm_quant")
    n_rows, d = x2.shape
    y, h, q, s = rmsnorm_outputs(x2, residual is not None, True)
    if n_rows and d:
        reciprocal = x.is_cuda if scale_reciprocal is None else scale_reciprocal
        launch(*rmsnorm_spec(x2, res2, weight, y, h, q, s, eps, reciprocal), config)
    lead = x.shape[:-1]
    return (y.view(x.shape), None if h is None else h.view(x.shape), q.view(x.shape),
            s.view(*lead, cdiv(d, QUANT_BLOCK)))


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The unfused torch math (dsv3_export.reference.layers.RMSNorm after `x + residual`)."""
    h = x if residual is None else x + residual
    y = F.rms_norm(h.float(), (h.shape[-1],), weight.float(), eps).to(x.dtype)
    return y if residual is None else (y, h)


def rmsnorm_quant_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The unfused torch math, then the act_quant oracle of y."""
    out = rmsnorm_ref(x, weight, eps, residual)
    y, h = out if residual is not None else (out, None)
    q, s = fp8_ref.act_quant(y.reshape(-1, y.shape[-1]))
    return y, h, q.view(y.shape), s.view(*y.shape[:-1], -1)
