"""Top-k over short rows (the MoE router's [T, E] scores), one program per block of rows.

    values, indices = topk(x [R, N], k)      # largest k of each row, in descending order

Why a kernel: torch's CUDA topk for a [1, 64] router row is two launches (gatherTopK, then a
bitonic sort of the k results), ~9 us per MoE layer in the 16b batch-1 decode profile; a row of
E <= 1024 scores fits in registers and k extractions of the maximum give the sorted top-k in one
launch. Algorithm: load the row (masked tail = -inf); k times: m = max(row), i = the lowest
index holding m, emit (x[i], i), set row[i] = -inf.

Semantics are torch.topk(x, k, dim=-1, largest=True, sorted=True)'s: same values, descending;
among equal values the lower index comes first (torch leaves that order unspecified). NaN ranks
above every number, as in torch's CUDA topk, and is returned as NaN. Values keep x's dtype,
indices are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import LaunchSpec, autotune_or_single, cdiv, check_tensor, launch, next_pow2

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_N = 1024  # a row in registers
MAX_K = 32  # k passes over the row

TOPK_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 1}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 16}, num_warps=4, num_stages=1),
]


@triton.jit
def _topk_kernel(x_ptr, val_ptr, idx_ptr, ROWS, N, stride_x, stride_v, stride_i,
                 TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < ROWS
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :],
                mask=row_ok[:, None] & (cols[None, :] < N), other=float("-inf")).to(tl.float32)
    # the ranking key: NaN above +inf (torch's CUDA order); -inf for the masked tail and taken entries
    key = tl.where(x != x, float("inf"), x)
    nan = x != x
    valid = cols[None, :] < N
    for j in tl.static_range(TOPK):
        best = tl.max(key, axis=1)  # [BLOCK_ROWS]
        # among the maxima: a NaN first (it ranks above +inf), then the lowest index
        is_best = (key == best[:, None]) & valid
        nan_best = tl.max((is_best & nan).to(tl.int32), axis=1) > 0
        pick = is_best & (nan | ~nan_best[:, None])
        idx = tl.min(tl.where(pick, cols[None, :], BLOCK_N), axis=1)  # [BLOCK_ROWS]
        chosen = cols[None, :] == idx[:, None]
        val = tl.sum(tl.where(chosen & ~nan, x, 0.0), axis=1)
        val = tl.where(tl.max((chosen & nan).to(tl.int32), axis=1) > 0, float("nan"), val)
        tl.store(val_ptr + rows64 * stride_v + j, val.to(val_ptr.dtype.element_ty), mask=row_ok)
        tl.store(idx_ptr + rows64 * stride_i + j, idx.to(tl.int64), mask=row_ok)
        key = tl.where(chosen, float("-inf"), key)
        valid = valid & ~chosen


_topk_tuned = autotune_or_single(_topk_kernel, TOPK_CONFIGS, key=["N", "TOPK"])


def check_topk(x: torch.Tensor, k: int) -> None:
    """Raise naming the problem when (x, k) is outside what the kernel takes."""
    check_tensor("topk: x", x, dtypes=DTYPES, ndim=2)
    n = x.shape[1]
    if n > MAX_N:
        raise ValueError(f"topk: rows of {n} > {MAX_N} values do not fit the kernel (use torch.topk)")
    if not 1 <= k <= min(n, MAX_K):
        raise ValueError(f"topk: k={k} must be in [1, min(N={n}, {MAX_K})]")
    if x.stride(1) != 1:
        raise ValueError(f"topk: x needs unit stride along the row, got strides {x.stride()}")


def topk_spec(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> LaunchSpec:
    """The launch into given outputs values [R, k] (x.dtype), indices [R, k] int64 (checked by the caller)."""
    rows, n = x.shape
    grid = lambda meta: (cdiv(rows, meta["BLOCK_ROWS"]),)  # noqa: E731
    return LaunchSpec(_topk_kernel, _topk_tuned, TOPK_CONFIGS, grid,
                      (x, values, indices, rows, n, x.stride(0), values.stride(0), indices.stride(0)),
                      dict(TOPK=k, BLOCK_N=max(next_pow2(n), 16)))


def topk(x: torch.Tensor, k: int, *, config: triton.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, N] -> (values [R, k] in x.dtype, indices [R, k] int64), largest first."""
    check_topk(x, k)
    values = torch.empty((x.shape[0], k), dtype=x.dtype, device=x.device)
    indices = torch.empty((x.shape[0], k), dtype=torch.int64, device=x.device)
    if x.shape[0]:
        launch(*topk_spec(x, k, values, indices), config)
    return values, indices


def topk_ref(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk with the kernel's tie order: a stable descending sort (NaN first, as on CUDA)."""
    key = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x).float()
    # NaN above +inf: order by (is NaN, value) descending, stable so equal keys keep index order
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    nan_first = torch.argsort(torch.isnan(x).gather(-1, order).to(torch.int8), dim=-1, descending=True,
                              stable=True)
    idx = order.gather(-1, nan_first)[:, :k]
    return x.gather(-1, idx), idx
