"""The MoE router of a softmax-scored model (softmax, top-k, weights, the shared experts' columns) as
one kernel, one program per block of rows.

    weights, ids = router_topk(logits [R, E], k)    # the top-k experts of softmax(logits), weights p * scale

Why a kernel: between the gate GEMM and the grouped GEMMs a batch-1 decode step ran, per MoE layer,
a softmax, torch's top-k (gatherTopK, then a bitonic sort of the k results), a gather * route_scale
and the concatenations of the shared experts' columns: ~5 launches of ~2-5 us for a [T, 64] tensor.
A row of E <= 1024 logits fits in registers and k extractions of the maximum give the sorted top-k
in the same launch. Algorithm: load the row (masked tail = -inf); p = softmax(row) in fp32; k times:
m = max(p), i = the lowest index holding m, emit (p[i] * scale, i), set p[i] = -inf; then the
experts every token takes (passes/fuse_shared_experts), ids first_extra + j with weight 1.

The Gate of a softmax-scored MoE (DeepSeek-V2/16b: one group, no bias); engines/torch_router.py puts
it in the CUDA programs. The ids are torch.topk's (largest, sorted): among equal values the lower
index comes first (torch leaves that order unspecified), NaN ranks above every number, as in
torch's CUDA topk. Weights are in the output dtype, ids int64.

The standalone top-k kernel (DSV3_TORCH_TOPK=kernel) was removed in session 14: 0.14x torch.topk at
64 rows and 0.57x at 4096 on the H200 (session 7), 1.0x at one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import LaunchSpec, autotune_or_single, cdiv, check_tensor, launch, next_pow2
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the routing weights
MAX_N = 1024  # a row in registers
MAX_K = 32  # k passes over the row

ROUTER_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 1}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 16}, num_warps=4, num_stages=1),
]
# The one config compiled runs use (ROUTER_CONFIGS: every config the kernel supports, each tested): one row per
# 1-warp program. Why: AOTInductor tunes the decode program once, at batch 64, and its picks there cost the batch-1
# step 57-63 us of router (BLOCK_ROWS 1, 12 of the 24 H200 builds of sessions 18-21), 63-76 (BLOCK_ROWS 4, 10 builds)
# and 95-97 (BLOCK_ROWS 16, 2 builds): 26 calls of one token each.
ROUTER_TUNED_CONFIGS = ROUTER_CONFIGS[:1]


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


@triton.jit
def _round_bf16(x):
    """fp32 x -> the nearest bf16 value (ties to even), kept in fp32; NaN stays NaN. Integer arithmetic,
    so the CPU interpreter (whose bf16 cast truncates) rounds as the GPU and torch do."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 v rounded to dtype to nearest even, as torch rounds, returned in dtype (bf16 through _round_bf16: the
    interpreter's bf16 cast truncates). Kernels call it by name: AOTInductor's copy of a kernel carries the JIT
    helpers it reaches, not the modules they live in."""
    if dtype == tl.bfloat16:
        return _round_bf16(v).to(dtype)
    return v.to(dtype)


@triton.jit
def _load_logits(logits_ptr, rows64, cols, mask, stride_l, stride_ls, SPLITS: tl.constexpr,
                 ROUND_BF16: tl.constexpr):
    """The [BLOCK_ROWS, BLOCK_N] logits in fp32, -inf where masked: the logits tensor itself (SPLITS 1,
    no rounding), or kernels/router_gate.py's SPLITS fp32 partials summed in split order and, with
    ROUND_BF16, rounded to bf16 as F.linear's bf16 output is."""
    ptrs = logits_ptr + rows64[:, None] * stride_l + cols[None, :]
    if SPLITS == 1 and not ROUND_BF16:
        return tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLITS):
        x = x + tl.load(ptrs + s * stride_ls, mask=mask, other=0.0).to(tl.float32)
    if ROUND_BF16:
        x = _round_bf16(x)
    return tl.where(mask, x, float("-inf"))


@waits_for_producer
@triton.jit
def _router_kernel(logits_ptr, w_ptr, idx_ptr, ROWS, N, scale, first_extra, stride_l, stride_w, stride_i, stride_ls,
                   TOPK: tl.constexpr, N_EXTRA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   SPLITS: tl.constexpr, ROUND_BF16: tl.constexpr):
    """From the logits [ROWS, N] (or SPLITS partials [SPLITS, ROWS, N] that sum to them, stride_ls
    apart): columns [0, TOPK): the top-k of softmax(logits) in fp32, weight p * scale; columns
    [TOPK, TOPK + N_EXTRA): expert first_extra + j with weight 1 (experts every token takes)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < ROWS
    valid = cols[None, :] < N
    rows64 = rows.to(tl.int64)
    x = _load_logits(logits_ptr, rows64, cols, row_ok[:, None] & valid, stride_l, stride_ls, SPLITS,
                     ROUND_BF16)  # [BLOCK_ROWS, BLOCK_N], -inf past N
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64 scalars
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


_router_tuned = autotune_or_single(_router_kernel, ROUTER_TUNED_CONFIGS,
                                   key=["N", "TOPK", "N_EXTRA", "SPLITS"])


def rows_unfit(n, k) -> str | None:
    """Why the top-k of rows of n values is not one the kernel takes (None: it is). n and k may be
    traced sizes: only static ones fit (router_topk and engines/torch_router.py ask here)."""
    if not isinstance(n, int) or n > MAX_N:
        return f"last dim {n}: rows of more than {MAX_N} values (or not static) do not fit the kernel"
    if not isinstance(k, int) or not 1 <= k <= min(n, MAX_K):
        return f"k={k} must be in [1, min(N={n}, {MAX_K})]"
    return None


def check_router(logits: torch.Tensor, k: int, n_extra: int, out_dtype: torch.dtype | None = None) -> None:
    """Raise naming the problem when (logits, k, n_extra, out_dtype) is outside what the kernel takes."""
    check_tensor("router_topk: logits", logits, dtypes=DTYPES, ndim=2)
    if (reason := rows_unfit(logits.shape[1], k)) is not None:
        raise ValueError(f"router_topk: {reason}")
    if logits.stride(1) != 1:
        raise ValueError(f"router_topk: logits need unit stride along the row, got strides {logits.stride()}")
    check_extra("router_topk", n_extra, out_dtype)


def check_extra(op: str, n_extra: int, out_dtype: torch.dtype | None = None) -> None:
    """n_extra < 0 would allocate fewer output columns than the kernel's k top-k columns it stores; the weights
    (probabilities in [0, 1]) need a floating out_dtype (an integer one stores them as zeros)."""
    if n_extra < 0:
        raise ValueError(f"{op}: n_extra={n_extra} must be >= 0")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype {out_dtype} not supported; expected one of {[str(d) for d in OUT_DTYPES]}")


def topk_ref(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk with the kernel's tie order: a stable descending sort (NaN first, as on CUDA)."""
    key = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x).float()
    # NaN above +inf: order by (is NaN, value) descending, stable so equal keys keep index order
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    nan_first = torch.argsort(torch.isnan(x).gather(-1, order).to(torch.int8), dim=-1, descending=True,
                              stable=True)
    idx = order.gather(-1, nan_first)[:, :k]
    return x.gather(-1, idx), idx


def router_spec(logits: torch.Tensor, k: int, scale: float, n_extra: int, first_extra: int,
                weights: torch.Tensor, indices: torch.Tensor, round_bf16: bool = False) -> LaunchSpec:
    """The launch into weights [R, k + n_extra], indices [R, k + n_extra] int64 (checked by the caller).
    logits [R, N], or fp32 partials [S, R, N] (kernels/router_gate.py, unit stride along N) whose sum in
    split order, rounded to bf16 with round_bf16, is the logits."""
    splits = logits.shape[0] if logits.dim() == 3 else 1
    rows, n = logits.shape[-2:]
    grid = lambda meta: (cdiv(rows, meta["BLOCK_ROWS"]),)  # noqa: E731
    return LaunchSpec(_router_kernel, _router_tuned, ROUTER_TUNED_CONFIGS, grid,
                      (logits, weights, indices, rows, n, float(scale), first_extra, logits.stride(-2),
                       weights.stride(0), indices.stride(0), logits.stride(0) if splits > 1 else 0),
                      dict(TOPK=k, N_EXTRA=n_extra, BLOCK_N=max(next_pow2(n), 16), SPLITS=splits,
                           ROUND_BF16=round_bf16))


def router_outputs(rows, k: int, n_extra: int, out_dtype: torch.dtype, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router kernel's outputs for `rows` rows (may be symbolic): weights [rows, k + n_extra] out_dtype and
    ids [rows, k + n_extra] int64; every launcher of the kernel (eager, traced, from logits or partials)
    allocates them here."""
    return (torch.empty((rows, k + n_extra), dtype=out_dtype, device=device),
            torch.empty((rows, k + n_extra), dtype=torch.int64, device=device))


def router_topk(logits: torch.Tensor, k: int, *, scale: float = 1.0, n_extra: int = 0, first_extra: int = 0,
                out_dtype: torch.dtype = torch.float32, config: triton.Config | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, E] -> (weights [R, k + n_extra] out_dtype, ids [R, k + n_extra] int64): the top-k
    experts of softmax(logits) (fp32) with weight p * scale, then experts first_extra + j (j < n_extra)
    with weight 1. DeepSeek's softmax router (Gate with score_func softmax, one group, no bias) plus
    the shared experts of passes/fuse_shared_experts."""
    check_router(logits, k, n_extra, out_dtype)
    weights, indices = router_outputs(logits.shape[0], k, n_extra, out_dtype, logits.device)
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
