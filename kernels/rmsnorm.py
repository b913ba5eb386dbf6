"""RMSNorm, optionally fused with the residual add that precedes it in every DeepSeek block.

    h = x + residual          (rounded to x.dtype, exactly what the unfused `x + residual` gives)
    y = h / sqrt(mean(h^2) + eps) * weight      (fp32 math, cast to x.dtype)

Layout: x, residual [..., D] with unit stride on D (rows flattened), weight [D]. One program
normalizes BLOCK_ROWS rows with the whole row (next power of 2 >= D) in registers: one read of x
(and residual), one write of y (and h), the memory-bound minimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsv3_export.kernels._common import autotune_or_single, cdiv, check_tensor, launch, next_pow2

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

RMSNORM_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4}, num_warps=8, num_stages=1),
]


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr,
    ROWS, D, eps,
    stride_x, stride_res, stride_y, stride_h,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
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
    y = xf * inv_rms[:, None] * w[None, :]
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


_rmsnorm_tuned = autotune_or_single(_rmsnorm_kernel, RMSNORM_CONFIGS, key=["D", "HAS_RESIDUAL"])


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
            config: triton.Config | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> y [..., D]; with residual: (y, h = x + residual), y = rmsnorm(h)."""
    check_tensor("rmsnorm: x", x, dtypes=DTYPES)
    if x.dim() == 0:
        raise ValueError("rmsnorm: x must have at least 1 dim [..., D]")
    d = x.shape[-1]
    check_tensor("rmsnorm: weight", weight, dtypes=DTYPES, ndim=1, device=x.device, contiguous=True)
    if weight.shape[0] != d:
        raise ValueError(f"rmsnorm: weight has {weight.shape[0]} entries, x's last dim is {d}")
    if residual is not None:
        check_tensor("rmsnorm: residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"rmsnorm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    x2 = x.reshape(-1, d)  # [rows, D]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    res2 = None
    if residual is not None:
        res2 = residual.reshape(-1, d)  # [rows, D]
        res2 = res2 if res2.stride(-1) == 1 else res2.contiguous()
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, d), dtype=x.dtype, device=x.device)
    h = torch.empty((n_rows, d), dtype=x.dtype, device=x.device) if residual is not None else y
    if n_rows and d:
        grid = lambda meta: (cdiv(n_rows, meta["BLOCK_ROWS"]),)  # noqa: E731
        launch(_rmsnorm_kernel, _rmsnorm_tuned, RMSNORM_CONFIGS, grid,
               (x2, res2 if res2 is not None else x2, weight, y, h, n_rows, d, float(eps),
                x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0), h.stride(0)),
               dict(HAS_RESIDUAL=residual is not None, BLOCK_D=next_pow2(d)), config)
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), h.view(x.shape)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The unfused torch math (dsv3_export.reference.layers.RMSNorm after `x + residual`)."""
    h = x if residual is None else x + residual
    y = F.rms_norm(h.float(), (h.shape[-1],), weight.float(), eps).to(x.dtype)
    return y if residual is None else (y, h)
