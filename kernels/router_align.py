"""The MoE router and moe_align in one single-program kernel (the decode MoE's routing in one launch).

    weights, ids, sorted_token_ids, expert_ids, num_tokens_post_pad = router_align(logits [T, N], k, E, block_m)

Why: a batch-1 decode MoE layer launched kernels/topk.py's router kernel (softmax, top-k, weights,
the shared experts' columns) and then kernels/moe_align.py's single-program alignment of its ids
(4.4 us per call on the H200, mostly launch latency and the gap before it): two tiny launches in a
row, the second reading only what the first wrote. Here one program does both.

Algorithm (grid (1,), one CTA): for each chunk of BLOCK_ROWS rows, topk.py's _route (the same code as
router_topk: softmax in fp32, k extractions of the maximum, p * scale, then experts first_extra + j
with weight 1), storing weights [T, k + n_extra] (out_dtype) and ids [T, k + n_extra] int64; then
tl.debug_barrier() (bar.sync: the CTA's global stores are visible to all of its threads after it,
as moe_align's own sentinel fill relies on); then moe_align.py's align_ids on those ids, read back
flat: sorted_token_ids int32 [n_blocks * block_m], expert_ids int32 [n_blocks], num_tokens_post_pad
int32 [1], n_blocks = cdiv(T * (k + n_extra) + E * (block_m - 1), block_m) (moe_align's sizes; E is
every expert of the grouped GEMMs, the shared ones included). Every output equals router_topk's and
moe_align's bit for bit: the same helpers on the same values, the alignment in exact integer
arithmetic, and the one floating-point sum (the softmax's denominator) reduced in router_topk's order
for the router_topk config of the same tile (ROUTER_TWINS; the autotuners of the two kernels choose
their configs independently, and router_topk's own 16-row config sums in another order than its
1- and 4-row ones: at most one fp32 rounding of that sum apart, then mostly the same bf16 weight).

One program serializes the rows: at decode batches (T <= 64, 1-16 row chunks) that is a few
microseconds of work against a launch saved; prefill keeps the two launches (engines/torch_router.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import LaunchSpec, autotune_or_single, check_tensor, launch, next_pow2
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.moe_align import MAX_ALIGN_EXPERTS, align_blocks, align_ids, align_meta, align_outputs, \
    check_align, moe_align_ref
from dsv3_export.kernels.topk import DTYPES, TOPK_CONFIGS, _route, router_topk_ref, rows_unfit

# Rows per routing step of the one program. Only configs whose routing tile [BLOCK_ROWS, BLOCK_N] gets
# the layout of one of router_topk's (kernels/topk.py TOPK_CONFIGS; the same BLOCK_ROWS and num_warps):
# the softmax's sum over a row is then reduced in the same order (in-thread, then the same lane
# shuffles), so the weights are router_topk's bits, not one fp32 rounding of the sum away. Measured
# in the sm_90 TTGIR at N=64 (tests/kernels/test_router_align.py): 4 rows / 4 warps and router_topk's
# 1 row / 1 warp and 4 / 4 all give each row [2 per thread x 32 lanes] on one warp; 16 / 4 gives
# [8 x 8 lanes]; a 1-row / 4-warp or 8-warp tile would split the row otherwise (other sums).
# Decode batches first (the interpreter runs the first).
ROUTER_ALIGN_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 16}, num_warps=4, num_stages=1),
]
# router_topk's config with the same routing tile as each of ROUTER_ALIGN_CONFIGS (tests, benchmark)
ROUTER_TWINS = [TOPK_CONFIGS[1], TOPK_CONFIGS[2]]


@waits_for_producer
@triton.jit
def _router_align_kernel(logits_ptr, w_ptr, idx_ptr, sorted_ids_ptr, expert_ids_ptr, npp_ptr,
                         ROWS, N, scale, first_extra, stride_l, N_BLOCKS,
                         TOPK: tl.constexpr, N_EXTRA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                         E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                         FILL: tl.constexpr):
    """_route over all ROWS in chunks of BLOCK_ROWS (weights, ids contiguous [ROWS, TOPK + N_EXTRA]),
    a CTA barrier, then align_ids on the ids."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    cols = tl.arange(0, BLOCK_N)
    valid = cols[None, :] < N
    for r0 in range(0, ROWS, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < ROWS
        x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :],
                    mask=row_ok[:, None] & valid, other=float("-inf")).to(tl.float32)  # [BLOCK_ROWS, BLOCK_N]
        _route(x, rows, row_ok, valid, cols, w_ptr, idx_ptr, scale, first_extra, TOPK + N_EXTRA, TOPK + N_EXTRA,
               TOPK, N_EXTRA, BLOCK_N, BLOCK_ROWS)
    tl.debug_barrier()  # every thread's ids stored before any thread reads them back
    align_ids(idx_ptr, sorted_ids_ptr, expert_ids_ptr, npp_ptr, ROWS * (TOPK + N_EXTRA), N_BLOCKS, E, BLOCK_E,
              BLOCK_M, CHUNK, FILL)


# ROWS in the key: the row chunk that suits 1 row does not suit 64; AOTInductor tunes each program once
_router_align_tuned = autotune_or_single(_router_align_kernel, ROUTER_ALIGN_CONFIGS,
                                         key=["ROWS", "N", "TOPK", "N_EXTRA", "E", "BLOCK_M"])


def check_router_align(logits: torch.Tensor, k: int, n_experts: int, block_m: int, n_extra: int,
                       first_extra: int) -> None:
    """Raise naming the tensor or argument when the call is outside what the kernel takes. The ids
    it writes must index the grouped GEMMs' experts: [0, N) and [first_extra, first_extra + n_extra)
    inside [0, n_experts)."""
    check_tensor("router_align: logits", logits, dtypes=DTYPES, ndim=2)
    n = logits.shape[1]
    if (reason := rows_unfit(n, k)) is not None:
        raise ValueError(f"router_align: logits: {reason}")
    if logits.stride(1) != 1:
        raise ValueError(f"router_align: logits needs unit stride along the row, got strides {logits.stride()}")
    if n_extra < 0 or first_extra < 0:
        raise ValueError(f"router_align: n_extra={n_extra}, first_extra={first_extra} must be >= 0")
    check_align("router_align", n_experts, block_m)
    if n_experts > MAX_ALIGN_EXPERTS:
        raise ValueError(f"router_align: n_experts={n_experts} is more than the alignment's {MAX_ALIGN_EXPERTS}")
    if n > n_experts or (n_extra and first_extra + n_extra > n_experts):
        raise ValueError(f"router_align: ids up to {max(n, first_extra + n_extra) - 1} (logits {tuple(logits.shape)}, "
                         f"extra experts [{first_extra}, {first_extra + n_extra})) do not fit n_experts={n_experts}")


def router_align_outputs(rows, k: int, n_extra: int, n_experts: int, block_m: int, out_dtype: torch.dtype,
                         device: torch.device) -> tuple[torch.Tensor, ...]:
    """The five outputs, allocated: weights [T, k + n_extra] out_dtype, ids [T, k + n_extra] int64
    (contiguous: the alignment reads them flat), then moe_align's three (align_outputs). rows may be
    a traced size."""
    width = k + n_extra
    weights = torch.empty((rows, width), dtype=out_dtype, device=device)
    ids = torch.empty((rows, width), dtype=torch.int64, device=device)
    return (weights, ids, *align_outputs(rows * width, n_experts, block_m, device))


def router_align_spec(logits: torch.Tensor, k: int, scale: float, n_extra: int, first_extra: int, n_experts: int,
                      block_m: int, weights: torch.Tensor, ids: torch.Tensor, sorted_token_ids: torch.Tensor,
                      expert_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor) -> LaunchSpec:
    """The one-program launch into router_align_outputs' tensors (checked by the caller)."""
    rows, n = logits.shape
    return LaunchSpec(_router_align_kernel, _router_align_tuned, ROUTER_ALIGN_CONFIGS, lambda meta: (1,),
                      (logits, weights, ids, sorted_token_ids, expert_ids, num_tokens_post_pad, rows, n,
                       float(scale), first_extra, logits.stride(0),
                       align_blocks(rows * (k + n_extra), n_experts, block_m)),
                      dict(TOPK=k, N_EXTRA=n_extra, BLOCK_N=max(next_pow2(n), 16),
                           **align_meta(n_experts, block_m)))


def router_align(logits: torch.Tensor, k: int, n_experts: int, block_m: int, *, scale: float = 1.0,
                 n_extra: int = 0, first_extra: int = 0, out_dtype: torch.dtype = torch.float32,
                 config: triton.Config | None = None) -> tuple[torch.Tensor, ...]:
    """logits [T, N] -> (weights, ids) = kernels/topk.py router_topk(logits, k, scale=, n_extra=,
    first_extra=, out_dtype=) and (sorted_token_ids, expert_ids, num_tokens_post_pad) =
    kernels/moe_align.py moe_align(ids, n_experts, block_m), from one launch."""
    check_router_align(logits, k, n_experts, block_m, n_extra, first_extra)
    out = router_align_outputs(logits.shape[0], k, n_extra, n_experts, block_m, out_dtype, logits.device)
    launch(*router_align_spec(logits, k, scale, n_extra, first_extra, n_experts, block_m, *out), config)
    return out


def router_align_ref(logits: torch.Tensor, k: int, n_experts: int, block_m: int, *, scale: float = 1.0,
                     n_extra: int = 0, first_extra: int = 0, out_dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, ...]:
    """router_topk_ref, then moe_align_ref on its ids."""
    weights, ids = router_topk_ref(logits, k, scale=scale, n_extra=n_extra, first_extra=first_extra,
                                   out_dtype=out_dtype)
    return (weights, ids, *moe_align_ref(ids, n_experts, block_m))
