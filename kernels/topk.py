"""Top-k over short rows (the MoE router's [T, E] scores), one program per block of rows; and the
whole softmax router (softmax, top-k, weights, the shared experts' columns) as one kernel.

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

router_topk (engines/torch_router.py puts it in the CUDA programs): the Gate of a softmax-scored
MoE (DeepSeek-V2/16b: one group, no bias) from its logits: p = softmax(logits) in fp32, the top-k
of p as above, weights p * route_scale in the output dtype, then the experts every token takes
(passes/fuse_shared_experts) with weight 1: the five kernels of that chain (softmax, gatherTopK,
sort, gather * scale, the concatenations) in one.

The gate GEMM fused in front of the router (router_topk_gate, router_topk_gate_split) is in
kernels/router_gate.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import LaunchSpec, autotune_or_single, cdiv, check_tensor, launch, next_pow2
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_N = 1024  # a row in registers
MAX_K = 32  # k passes over the row

TOPK_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 1}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 16}, num_warps=4, num_stages=1),
]



@triton.jit
def _take_max(key, nan, valid, cols, BLOCK_N: tl.constexpr):
    """The next pick of each row: (index [BLOCK_ROWS], one-hot [BLOCK_ROWS, BLOCK_N]). Among the
    maxima of key a NaN first (it ranks above +inf), then the lowest index."""
    best = tl.max(key, axis=1)  # [BLOCK_ROWS]
    is_best = (key == best[:, None]) & valid
    nan_best = tl.max((is_best & nan).to(tl.int32), axis=1) > 0
    pick = is_best & (nan | ~nan_best[:, None])
    idx = tl.min(tl.where(pick, cols[None, :], BLOCK_N), axis=1)  # [BLOCK_ROWS]
    return idx, cols[None, :] == idx[:, None]


@triton.jit
def _value_at(x, nan, chosen):
    """x at the chosen column of each row, NaN kept."""
    val = tl.sum(tl.where(chosen & ~nan, x, 0.0), axis=1)
    return tl.where(tl.max((chosen & nan).to(tl.int32), axis=1) > 0, float("nan"), val)


@waits_for_producer
@triton.jit
def _topk_kernel(x_ptr, val_ptr, idx_ptr, ROWS, N, stride_x, stride_v, stride_i,
                 TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < ROWS
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :],
                mask=row_ok[:, None] & (cols[None, :] < N), other=float("-inf")).to(tl.float32)
    # the ranking key: NaN above +inf (torch's CUDA order); -inf for the masked tail and taken entries
    nan = x != x
    key = tl.where(nan, float("inf"), x)
    valid = cols[None, :] < N
    for j in tl.static_range(TOPK):
        idx, chosen = _take_max(key, nan, valid, cols, BLOCK_N)
        tl.store(val_ptr + rows64 * stride_v + j, _value_at(x, nan, chosen).to(val_ptr.dtype.element_ty), mask=row_ok)
        tl.store(idx_ptr + rows64 * stride_i + j, idx.to(tl.int64), mask=row_ok)
        key = tl.where(chosen, float("-inf"), key)
        valid = valid & ~chosen


@triton.jit
def _route(x, rows, row_ok, valid, cols, w_ptr, idx_ptr, scale, first_extra, stride_w, stride_i,
           TOPK: tl.constexpr, N_EXTRA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The router's math from fp32 logits x [BLOCK_ROWS, BLOCK_N] (-inf past N): columns [0, TOPK):
    the top-k of softmax(x), weight p * scale; columns [TOPK, TOPK + N_EXTRA): expert
    first_extra + j with weight 1 (experts every token takes)."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64 scalars
    rows64 = rows.to(tl.int64)
    m = tl.max(x, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows past ROWS (all -inf): no inf - inf
    e = tl.where(valid, tl.exp(x - m[:, None]), 0.0)
    total = tl.where(row_ok, tl.sum(e, axis=1), 1.0)  # >= 1 on a real row (its max gives exp(0))
    p = e / total[:, None]  # [BLOCK_ROWS, BLOCK_N] softmax, fp32
    nan = p != p
    key = tl.where(nan, float("inf"), tl.where(valid, p, float("-inf")))
    for j in tl.static_range(TOPK):
        idx, chosen = _take_max(key, nan, valid, cols, BLOCK_N)
        w = _value_at(p, nan, chosen) * scale
        tl.store(w_ptr + rows64 * stride_w + j, w.to(w_ptr.dtype.element_ty), mask=row_ok)
        tl.store(idx_ptr + rows64 * stride_i + j, idx.to(tl.int64), mask=row_ok)
        key = tl.where(chosen, float("-inf"), key)
        valid = valid & ~chosen
    for j in tl.static_range(N_EXTRA):
        tl.store(w_ptr + rows64 * stride_w + TOPK + j, tl.full((BLOCK_ROWS,), 1.0, tl.float32).to(w_ptr.dtype.element_ty),
                 mask=row_ok)
        tl.store(idx_ptr + rows64 * stride_i + TOPK + j, tl.full((BLOCK_ROWS,), 0, tl.int64) + first_extra + j,
                 mask=row_ok)


@waits_for_producer
@triton.jit
def _router_kernel(logits_ptr, w_ptr, idx_ptr, ROWS, N, scale, first_extra, stride_l, stride_w, stride_i,
                   TOPK: tl.constexpr, N_EXTRA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """_route from the logits [ROWS, N]."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < ROWS
    valid = cols[None, :] < N
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :], mask=row_ok[:, None] & valid,
                other=float("-inf")).to(tl.float32)
    _route(x, rows, row_ok, valid, cols, w_ptr, idx_ptr, scale, first_extra, stride_w, stride_i,
           TOPK, N_EXTRA, BLOCK_N, BLOCK_ROWS)


_topk_tuned = autotune_or_single(_topk_kernel, TOPK_CONFIGS, key=["N", "TOPK"])
_router_tuned = autotune_or_single(_router_kernel, TOPK_CONFIGS, key=["N", "TOPK", "N_EXTRA"])
def rows_unfit(n, k) -> str | None:
    """Why the top-k of rows of n values is not one the kernels take (None: it is). n and k may be
    traced sizes: only static ones fit (the launchers and engines/ lowerings ask here)."""
    if not isinstance(n, int) or n > MAX_N:
        return f"last dim {n}: rows of more than {MAX_N} values (or not static) do not fit the kernel"
    if not isinstance(k, int) or not 1 <= k <= min(n, MAX_K):
        return f"k={k} must be in [1, min(N={n}, {MAX_K})]"
    return None


def check_topk(x: torch.Tensor, k: int) -> None:
    """Raise naming the problem when (x, k) is outside what the kernel takes."""
    check_tensor("topk: x", x, dtypes=DTYPES, ndim=2)
    if (reason := rows_unfit(x.shape[1], k)) is not None:
        raise ValueError(f"topk: {reason}")
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


# ---------------------------------------------------------------------------------------------
# the MoE router: softmax, top-k, weights (and the experts every token takes) in one launch


def router_spec(logits: torch.Tensor, k: int, scale: float, n_extra: int, first_extra: int,
                weights: torch.Tensor, indices: torch.Tensor) -> LaunchSpec:
    """The launch into weights [R, k + n_extra], indices [R, k + n_extra] int64 (checked by the caller)."""
    rows, n = logits.shape
    grid = lambda meta: (cdiv(rows, meta["BLOCK_ROWS"]),)  # noqa: E731
    return LaunchSpec(_router_kernel, _router_tuned, TOPK_CONFIGS, grid,
                      (logits, weights, indices, rows, n, float(scale), first_extra, logits.stride(0),
                       weights.stride(0), indices.stride(0)),
                      dict(TOPK=k, N_EXTRA=n_extra, BLOCK_N=max(next_pow2(n), 16)))


def router_topk(logits: torch.Tensor, k: int, *, scale: float = 1.0, n_extra: int = 0, first_extra: int = 0,
                out_dtype: torch.dtype = torch.float32, config: triton.Config | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, E] -> (weights [R, k + n_extra] out_dtype, ids [R, k + n_extra] int64): the top-k
    experts of softmax(logits) (fp32) with weight p * scale, then experts first_extra + j (j < n_extra)
    with weight 1. DeepSeek's softmax router (Gate with score_func softmax, one group, no bias) plus
    the shared experts of passes/fuse_shared_experts."""
    check_topk(logits, k)
    if n_extra < 0:
        raise ValueError(f"router_topk: n_extra={n_extra} must be >= 0")
    weights = torch.empty((logits.shape[0], k + n_extra), dtype=out_dtype, device=logits.device)
    indices = torch.empty((logits.shape[0], k + n_extra), dtype=torch.int64, device=logits.device)
    if logits.shape[0]:
        launch(*router_spec(logits, k, scale, n_extra, first_extra, weights, indices), config)
    return weights, indices


def router_topk_ref(logits: torch.Tensor, k: int, *, scale: float = 1.0, n_extra: int = 0, first_extra: int = 0,
                    out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference Gate's math (softmax in fp32, top-k, gather, scale, cast) and the extra columns."""
    p = logits.softmax(dim=-1, dtype=torch.float32)
    _, ids = topk_ref(p, k)
    weights = (p.gather(1, ids) * scale).to(out_dtype)
    extra_ids = torch.arange(first_extra, first_extra + n_extra, device=logits.device).expand(logits.shape[0], -1)
    return (torch.cat([weights, weights.new_ones(logits.shape[0], n_extra)], 1),
            torch.cat([ids, extra_ids], 1))
