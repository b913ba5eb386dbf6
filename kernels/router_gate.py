"""The MoE gate GEMM and the softmax router in one launch (kernels/topk.py has the router alone).

router_topk_gate: kernels/topk.py's router_topk from x [T, D] and the gate's weight [E, D]: logits = x @ W^T in fp32,
rounded to x's dtype as the reference's F.linear is, then router_topk's math (one @triton.jit
helper, _route, for both). The logits differ from cuBLAS's by the summation order only, so an id
can differ only where two logits are within one rounding of x's dtype (tests/kernels/test_router_gate.py).
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

from dsv3_export.kernels._common import (LaunchSpec, arrival_counters, autotune_or_single, cdiv, check_tensor,
                                         is_interpreted, last_to_arrive, launch, next_pow2, reset_arrivals)
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.topk import DTYPES, _route, router_topk_ref, rows_unfit

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


# ROWS in the key: the decode (1-row programs) and prefill (dot) configs are far apart; AOTInductor
# tunes each program once, at its example size
_GATE_INTERPRETED = is_interpreted(_router_gate_kernel)
_router_gate_tuned = autotune_or_single(_router_gate_kernel, GATE_CONFIGS, key=["ROWS", "N", "D", "TOPK", "N_EXTRA"])
# no ROWS in the split form's key: eager decode calls at every batch size share one tuning (the
# first call's); AOTInductor tunes each program at its own example size anyway
_router_gate_split_tuned = autotune_or_single(_router_gate_split_kernel, GATE_SPLIT_CONFIGS,
                                              key=["N", "D", "TOPK", "N_EXTRA"])


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
