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

router_topk_gate: the same from x [T, D] and the gate's weight [E, D]: logits = x @ W^T in fp32,
rounded to x's dtype as the reference's F.linear is, then router_topk's math (one @triton.jit
helper, _route, for both). The logits differ from cuBLAS's by the summation order only, so an id
can differ only where two logits are within one rounding of x's dtype (tests/kernels/test_topk.py).
Why: the 16b gate GEMM ([1, 2048] @ [2048, 64] at decode, 262 KB of bf16 weight) is a cuBLAS call
of ~5 us whose 64-wide tile gives ONE thread block, followed by the router's launch; here it is
one launch. Launch shape at T=1: one program reads the whole weight (the routing needs every
expert's logit, so splitting E or K over programs would need a second launch, or a counter that
itself must be zeroed by a launch, to combine the parts). A single program's read is latency
bound, so the decode configs keep many loads in flight: wide K steps (BLOCK_K 256: 32 KB of
weight per step over 8-16 warps), few steps (8 at D=2048), and the next step's loads issued
before this step's products (Triton's pipeliner stages only loads that feed a dot: the sm_90
PTX of these configs has plain ld.global, no cp.async). One SM's read rate still bounds it: at
~100-200 GB/s per SM, 262 KB is ~1.5-2.5 us, against ~5 us for cuBLAS's one block plus the
router: that was the estimate. Measured on the H200 (session 7, the 16b fp8 decode program at batch
1): 13.2 us per call, against ~5 + ~2.5 us for cuBLAS's gate and router_topk, so the engine leaves
it opt-in (engines/torch_router.py DSV3_TORCH_ROUTER_GATE). Rows < 16 per program use a broadcast
multiply and a sum over K (tl.dot's M tile is >= 16: padding one row to 16 would multiply 15 zero
rows); prefill row blocks of 16/64 use tl.dot (fp32 inputs at input_precision "ieee", not tf32: the
reference's fp32 linear).

router_topk_gate_split: the same result from programs that split the experts, so the weight is
streamed P-way in parallel (the 16b at batch 1: 16 or 8 programs of 16 or 32 KB, in 2 or 4 K
steps, instead of one program reading 262 KB in 8). Grid (row blocks, P = cdiv(E, BLOCK_E));
program (r, p) computes the logits of row block r for its BLOCK_E experts (the same K loop,
_gate_logits), rounds them to x's dtype and stores them in a [T, E] scratch; then it counts itself on an int32 arrival counter of row block r
(kernels/_common.py last_to_arrive: bar.sync, one thread's acq_rel atomic add). The program that
completes the count (the last to finish) reads the whole rows back from L2 (ld.global.cg: the
other programs' stores are not in its L1) and runs _route, then resets the counter to 0, so the
counters are zero again for the next launch or CUDA-graph replay with no memset. Eager calls share
one cached counter buffer per device; traced calls (engines/torch_router.py, AOTInductor) allocate
zeroed counters (one memset in the package). Its logits are summed in the same per-lane / tl.dot
order as router_topk_gate's config of the same BLOCK_K, so the ids follow the same tie rule.
sm_90 (ptxas): 64-80 registers per thread for the decode configs, 105 for the tl.dot one, no spills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsv3_export.kernels._common import LaunchSpec, arrival_counters, autotune_or_single, cdiv, check_tensor, \
    is_interpreted, last_to_arrive, launch, next_pow2, reset_arrivals
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_N = 1024  # a row in registers
MAX_K = 32  # k passes over the row

TOPK_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 1}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 16}, num_warps=4, num_stages=1),
]

# The gate GEMM + router (router_topk_gate). Decode rows first (the interpreter runs the first):
# BLOCK_ROWS < 16 multiply-and-sum, 64 fp32 partials per thread at E = 64 (plus two K steps' tiles
# in flight); >= 16: tl.dot, its loads staged by the pipeliner (num_stages).
GATE_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 1, "BLOCK_K": 256}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_ROWS": 1, "BLOCK_K": 256}, num_warps=16, num_stages=1),
    triton.Config({"BLOCK_ROWS": 1, "BLOCK_K": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 4, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_ROWS": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_ROWS": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),  # 128 programs at T=4096
    triton.Config({"BLOCK_ROWS": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]

# The split form (router_topk_gate_split): BLOCK_E experts per program, so P = cdiv(E, BLOCK_E)
# programs per row block stream the gate weight side by side. Decode first (the interpreter runs
# the first). At the 16b's E=64, D=2048 bf16 and batch 1 a program's whole slice is 16 or 32 KB, so
# the decode configs take it in few wide K steps (2 or 4, the next one loaded before this one's
# products): a program's read is a chain of ~1-2 DRAM round trips, not 8 (per-lane fp32 partials
# [ROWS, BLOCK_E, BLOCK_K]: 16-32 registers per thread at 8 warps); 4 rows a program for batches of
# 8-64; one tl.dot form (E tile >= 16, 32-row blocks) for prefill programs, which AOTInductor tunes
# at their own example size.
GATE_SPLIT_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 1, "BLOCK_E": 4, "BLOCK_K": 1024}, num_warps=8, num_stages=1),  # P=16 at E=64
    triton.Config({"BLOCK_ROWS": 1, "BLOCK_E": 8, "BLOCK_K": 512}, num_warps=8, num_stages=1),  # P=8
    triton.Config({"BLOCK_ROWS": 4, "BLOCK_E": 8, "BLOCK_K": 256}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_ROWS": 32, "BLOCK_E": 16, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
MIN_SPLIT_ROWS = min(c.kwargs["BLOCK_ROWS"] for c in GATE_SPLIT_CONFIGS)  # sizes the counters before tuning


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


@triton.jit
def _gate_tiles(x_rows, g_rows, row_ok, cols, ks, k0, N, D):
    """The K step at k0: x [BLOCK_ROWS, BLOCK_K] and gate [BLOCK_N, BLOCK_K] tiles, zero past the edges."""
    k_ok = (k0 + ks)[None, :] < D
    a = tl.load(x_rows + k0 + ks[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
    b = tl.load(g_rows + k0 + ks[None, :], mask=(cols[:, None] < N) & k_ok, other=0.0)
    return a, b


@triton.jit
def _gate_logits(x_ptr, g_ptr, rows, row_ok, cols, D, N, stride_x, stride_g, BLOCK_ROWS: tl.constexpr,
                 BLOCK_COLS: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """x [rows, D] @ gate [cols, D]^T -> [BLOCK_ROWS, BLOCK_COLS] fp32 (0 past the edges). Row blocks of
    >= 16 use tl.dot (its M tile minimum); smaller ones (decode) multiply-and-add into per-lane fp32
    partials [BLOCK_ROWS, BLOCK_COLS, BLOCK_K] (no padded MMA rows, no cross-warp reduction inside
    the loop) summed once at the end, loading one K step ahead (Triton's pipeliner stages only
    loads that feed a dot). UPCAST (the CPU interpreter only): its tl.dot multiplies bf16 as raw
    uint16, so fp32 operands."""
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # [BLOCK_ROWS, 1]
    g_rows = g_ptr + cols.to(tl.int64)[:, None] * stride_g  # [BLOCK_COLS, 1]
    if BLOCK_ROWS >= 16:
        acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a, b = _gate_tiles(x_rows, g_rows, row_ok, cols, ks, k0, N, D)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        part = tl.zeros((BLOCK_ROWS, BLOCK_COLS, BLOCK_K), dtype=tl.float32)  # per-lane partial sums
        a, b = _gate_tiles(x_rows, g_rows, row_ok, cols, ks, 0, N, D)
        for k0 in range(BLOCK_K, D + BLOCK_K, BLOCK_K):
            a_next, b_next = _gate_tiles(x_rows, g_rows, row_ok, cols, ks, k0, N, D)
            part += a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :]
            a, b = a_next, b_next
        acc = tl.sum(part, axis=2)
    return acc


@waits_for_producer
@triton.jit
def _router_gate_kernel(x_ptr, g_ptr, w_ptr, idx_ptr, ROWS, N, D, scale, first_extra, stride_x, stride_g,
                        stride_w, stride_i, TOPK: tl.constexpr, N_EXTRA: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """_route from logits = x [ROWS, D] @ gate [N, D]^T (_gate_logits), rounded to x's dtype (the
    reference's F.linear in x.dtype)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < ROWS
    valid = cols[None, :] < N
    acc = _gate_logits(x_ptr, g_ptr, rows, row_ok, cols, D, N, stride_x, stride_g, BLOCK_ROWS, BLOCK_N, BLOCK_K,
                       UPCAST)
    logits = tl.where(valid, acc.to(x_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
    _route(logits, rows, row_ok, valid, cols, w_ptr, idx_ptr, scale, first_extra, stride_w, stride_i,
           TOPK, N_EXTRA, BLOCK_N, BLOCK_ROWS)


@waits_for_producer
@triton.jit
def _router_gate_split_kernel(x_ptr, g_ptr, logits_ptr, cnt_ptr, w_ptr, idx_ptr, ROWS, N, D, scale, first_extra,
                              stride_x, stride_g, stride_w, stride_i, TOPK: tl.constexpr, N_EXTRA: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
                              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """Program (r, p): logits of row block r for experts [p * BLOCK_E, (p + 1) * BLOCK_E), rounded to
    x's dtype, into logits_ptr [ROWS, N] (x's dtype, row stride N); the last of the row block's
    tl.num_programs(1) programs to count itself on cnt_ptr[r] runs _route on the whole rows."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    r = tl.program_id(0)
    rows = r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < ROWS
    acc = _gate_logits(x_ptr, g_ptr, rows, row_ok, cols, D, N, stride_x, stride_g, BLOCK_ROWS, BLOCK_E, BLOCK_K,
                       UPCAST)
    l_rows = logits_ptr + rows.to(tl.int64)[:, None] * N  # [BLOCK_ROWS, 1]
    tl.store(l_rows + cols[None, :], acc.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])
    if last_to_arrive(cnt_ptr + r, tl.num_programs(1)):
        all_cols = tl.arange(0, BLOCK_N)
        valid = all_cols[None, :] < N
        logits = tl.load(l_rows + all_cols[None, :], mask=row_ok[:, None] & valid, other=float("-inf"),
                         cache_modifier=".cg").to(tl.float32)  # [BLOCK_ROWS, BLOCK_N], the others' parts from L2
        _route(logits, rows, row_ok, valid, all_cols, w_ptr, idx_ptr, scale, first_extra, stride_w, stride_i,
               TOPK, N_EXTRA, BLOCK_N, BLOCK_ROWS)
        reset_arrivals(cnt_ptr + r)


_topk_tuned = autotune_or_single(_topk_kernel, TOPK_CONFIGS, key=["N", "TOPK"])
_router_tuned = autotune_or_single(_router_kernel, TOPK_CONFIGS, key=["N", "TOPK", "N_EXTRA"])
# ROWS in the key: the decode (1-row programs) and prefill (dot) configs are far apart; AOTInductor
# tunes each program once, at its example size
_GATE_INTERPRETED = is_interpreted(_router_gate_kernel)
_router_gate_tuned = autotune_or_single(_router_gate_kernel, GATE_CONFIGS, key=["ROWS", "N", "D", "TOPK", "N_EXTRA"])
# no ROWS in the split form's key: eager decode calls at every batch size share one tuning (the
# first call's); AOTInductor tunes each program at its own example size anyway
_router_gate_split_tuned = autotune_or_single(_router_gate_split_kernel, GATE_SPLIT_CONFIGS,
                                              key=["N", "D", "TOPK", "N_EXTRA"])


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


# ---------------------------------------------------------------------------------------------
# the gate GEMM and the router in one launch


def router_gate_spec(x: torch.Tensor, gate: torch.Tensor, k: int, scale: float, n_extra: int, first_extra: int,
                     weights: torch.Tensor, indices: torch.Tensor) -> LaunchSpec:
    """The launch of logits = x [R, D] @ gate [E, D]^T and the router into weights, indices
    [R, k + n_extra] (checked by the caller)."""
    rows, d = x.shape
    grid = lambda meta: (cdiv(rows, meta["BLOCK_ROWS"]),)  # noqa: E731
    return LaunchSpec(_router_gate_kernel, _router_gate_tuned, GATE_CONFIGS, grid,
                      (x, gate, weights, indices, rows, gate.shape[0], d, float(scale), first_extra, x.stride(0),
                       gate.stride(0), weights.stride(0), indices.stride(0)),
                      dict(TOPK=k, N_EXTRA=n_extra, BLOCK_N=max(next_pow2(gate.shape[0]), 16),
                           UPCAST=_GATE_INTERPRETED and x.dtype != torch.float32))


def check_router_gate(x: torch.Tensor, gate: torch.Tensor, k: int, n_extra: int) -> None:
    """Raise naming the tensor and the problem when (x, gate, k) is outside what the kernel takes."""
    check_tensor("router_topk_gate: x", x, dtypes=DTYPES, ndim=2)
    check_tensor("router_topk_gate: weight", gate, dtypes=(x.dtype,), ndim=2, device=x.device)
    if gate.shape[1] != x.shape[1]:
        raise ValueError(f"router_topk_gate: weight {tuple(gate.shape)} is not [E, D] for x {tuple(x.shape)} "
                         f"(D={x.shape[1]})")
    if (reason := rows_unfit(gate.shape[0], k)) is not None:
        raise ValueError(f"router_topk_gate: weight rows (experts): {reason}")
    for name, t in (("x", x), ("weight", gate)):
        if t.stride(1) != 1:
            raise ValueError(f"router_topk_gate: {name} needs unit stride along the row, got strides {t.stride()}")
    if n_extra < 0:
        raise ValueError(f"router_topk_gate: n_extra={n_extra} must be >= 0")


def router_topk_gate(x: torch.Tensor, weight: torch.Tensor, k: int, *, scale: float = 1.0, n_extra: int = 0,
                     first_extra: int = 0, out_dtype: torch.dtype = torch.float32,
                     config: triton.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, D], the gate's weight [E, D] (x's dtype) -> router_topk(F.linear(x, weight), ...) in one
    launch: (weights [R, k + n_extra] out_dtype, ids [R, k + n_extra] int64)."""
    check_router_gate(x, weight, k, n_extra)
    weights = torch.empty((x.shape[0], k + n_extra), dtype=out_dtype, device=x.device)
    indices = torch.empty((x.shape[0], k + n_extra), dtype=torch.int64, device=x.device)
    if x.shape[0]:
        launch(*router_gate_spec(x, weight, k, scale, n_extra, first_extra, weights, indices), config)
    return weights, indices


def router_topk_gate_ref(x: torch.Tensor, weight: torch.Tensor, k: int, *, scale: float = 1.0, n_extra: int = 0,
                         first_extra: int = 0, out_dtype: torch.dtype = torch.float32
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference Gate: F.linear in x's dtype, then router_topk_ref."""
    return router_topk_ref(F.linear(x, weight), k, scale=scale, n_extra=n_extra, first_extra=first_extra,
                           out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# the gate GEMM split over programs by experts, the last program of a row block routing it


def router_gate_split_spec(x: torch.Tensor, gate: torch.Tensor, k: int, scale: float, n_extra: int,
                           first_extra: int, logits: torch.Tensor, counters: torch.Tensor, weights: torch.Tensor,
                           indices: torch.Tensor) -> LaunchSpec:
    """The launch of router_topk_gate_split into weights, indices [R, k + n_extra], with scratch logits
    [R, E] (x's dtype, contiguous) and counters (int32, zero, >= cdiv(R, MIN_SPLIT_ROWS); checked by
    the caller). Grid (row blocks, cdiv(E, BLOCK_E))."""
    rows, d = x.shape
    n = gate.shape[0]
    grid = lambda meta: (cdiv(rows, meta["BLOCK_ROWS"]), cdiv(n, meta["BLOCK_E"]))  # noqa: E731
    return LaunchSpec(_router_gate_split_kernel, _router_gate_split_tuned, GATE_SPLIT_CONFIGS, grid,
                      (x, gate, logits, counters, weights, indices, rows, n, d, float(scale), first_extra,
                       x.stride(0), gate.stride(0), weights.stride(0), indices.stride(0)),
                      dict(TOPK=k, N_EXTRA=n_extra, BLOCK_N=max(next_pow2(n), 16),
                           UPCAST=_GATE_INTERPRETED and x.dtype != torch.float32))


def router_topk_gate_split(x: torch.Tensor, weight: torch.Tensor, k: int, *, scale: float = 1.0, n_extra: int = 0,
                           first_extra: int = 0, out_dtype: torch.dtype = torch.float32,
                           config: triton.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_topk_gate's result (the same rounding of the logits, the same routing) from one launch
    whose programs split the experts: (weights [R, k + n_extra] out_dtype, ids [R, k + n_extra] int64).
    Eager calls share the device's arrival counters (kernels/_common.py): one stream at a time."""
    check_router_gate(x, weight, k, n_extra)
    rows = x.shape[0]
    weights = torch.empty((rows, k + n_extra), dtype=out_dtype, device=x.device)
    indices = torch.empty((rows, k + n_extra), dtype=torch.int64, device=x.device)
    if rows:
        logits = torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device)  # [R, E] scratch
        counters = arrival_counters(cdiv(rows, MIN_SPLIT_ROWS), x.device)
        launch(*router_gate_split_spec(x, weight, k, scale, n_extra, first_extra, logits, counters, weights,
                                       indices), config)
    return weights, indices
