"""moe_align: the MoE's token assignments grouped by expert, padded per expert (kernels/moe.py).

  moe_align(topk_ids [T, k], E, block_m)
      -> sorted_token_ids int32 [n_blocks * block_m]: flat assignment ids a = t * k + j grouped by
         expert, each expert's run padded to a multiple of block_m with the sentinel T * k;
         expert_ids int32 [n_blocks]: the expert of each block_m-row block (-1 past the end);
         num_tokens_post_pad int32 [1]: rows actually used (sum of the padded runs).
      n_blocks = ceil((T*k + E*(block_m-1)) / block_m) is the worst case, so every size is a
      function of T, k, E only: no .item(), graph-capturable, exportable.
Two Triton forms with identical outputs, and moe_align_ref, the same in ATen ops (oracle and a traced form):
  single   one program does it all (histogram, offsets, scatter, block experts): one launch, what decode
           batches want (8-14 us at T = 1-64 on the H200), but at T = 4096 x 6 assignments 0.53 ms, a third of
           the bf16 MoE layer (session 33).
  parallel three launches over CHUNK-assignment slices: each slice's expert histogram (and its share of the
           sentinel fill), one program turning the histograms into each slice's first slot per expert (and the
           block experts), each slice scattering its assignments; slices are taken in order and each keeps its
           own order, so the result is the same stable sort.
moe_align picks parallel at block_m >= 64 (PARALLEL_BLOCK_M): what choose_block_m gives above 32 assignments per
expert, and the prefill programs' block_m; a static choice, so traced programs need no guard on T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import cdiv, check_tensor, next_pow2, traceable, tracing
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

# moe_align kernel: [CHUNK, next_pow2(E)] one-hot tiles of ALIGN_TILE elements; above
# MAX_ALIGN_EXPERTS experts the ATen form is used.
ALIGN_TILE = 8192
MAX_ALIGN_EXPERTS = 1024
# the parallel form from this block_m up (see the module docstring); PARALLEL_SLICES programs' worth of offsets are
# summed per loop step of its offsets kernel
PARALLEL_BLOCK_M = 64
PARALLEL_SLICES = 32


@triton.jit
def _padded_runs(counts, BLOCK_M: tl.constexpr):
    """Each expert's run of `counts` assignments padded to BLOCK_M rows, the runs laid out in expert order:
    (padded, ends, total), ends inclusive; lanes past E have count 0."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return padded, tl.cumsum(padded, axis=0), tl.sum(padded, axis=0)


@triton.jit
def _chunk_histogram(ids_ptr, offs, NUMEL, BLOCK_E: tl.constexpr):
    """Assignments `offs` (those < NUMEL) per expert: [BLOCK_E]."""
    e = tl.load(ids_ptr + offs, mask=offs < NUMEL, other=BLOCK_E).to(tl.int32)
    return tl.sum((e[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32), axis=0)


@triton.jit
def _fill_sentinels(sorted_ids_ptr, lo, hi, NUMEL, FILL: tl.constexpr):
    """The padding sentinel NUMEL into sorted slots [lo, hi)."""
    for f0 in range(lo, hi, FILL):
        slots = f0 + tl.arange(0, FILL)
        tl.store(sorted_ids_ptr + slots, tl.full((FILL,), 0, tl.int32) + NUMEL, mask=slots < hi)


@triton.jit
def _scatter_chunk(ids_ptr, sorted_ids_ptr, offs, NUMEL, first, BLOCK_E: tl.constexpr):
    """Assignments `offs` to their slots: first[e] (the chunk's first slot for expert e) plus the same-expert
    assignments before each in the chunk, a stable sort. Returns the chunk's assignments per expert."""
    experts = tl.arange(0, BLOCK_E)
    valid = offs < NUMEL
    e = tl.load(ids_ptr + offs, mask=valid, other=BLOCK_E).to(tl.int32)
    onehot = (e[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, BLOCK_E]
    before = tl.cumsum(onehot, axis=0) - onehot  # same-expert assignments earlier in the chunk
    dest = tl.sum((before + first[None, :]) * onehot, axis=1)  # [CHUNK]
    tl.store(sorted_ids_ptr + dest, offs.to(tl.int32), mask=valid)
    return tl.sum(onehot, axis=0)


@triton.jit
def _store_block_experts(ends, total, expert_ids_ptr, npp_ptr, N_BLOCKS, E: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """Block b belongs to the first expert whose padded run ends past b * BLOCK_M (-1 past the last run); and the
    padded total (num_tokens_post_pad). ends: the runs' inclusive ends [BLOCK_E], lanes >= E ignored."""
    experts = tl.arange(0, BLOCK_E)
    real = experts < E
    for b0 in range(0, N_BLOCKS, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        owner = tl.sum(((ends[None, :] <= blocks[:, None] * BLOCK_M) & real[None, :]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.where(owner < E, owner, -1), mask=blocks < N_BLOCKS)
    tl.store(npp_ptr, total)


@waits_for_producer
@triton.jit
def _moe_align_kernel(
    ids_ptr, sorted_ids_ptr, expert_ids_ptr, npp_ptr,
    NUMEL, N_BLOCKS,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
):
    """One program: histogram -> padded offsets -> stable scatter -> block experts (see moe_align)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    # 1. assignments per expert
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, NUMEL, CHUNK):
        counts += _chunk_histogram(ids_ptr, c0 + tl.arange(0, CHUNK), NUMEL, BLOCK_E)
    # 2. each expert's run padded to BLOCK_M rows; runs laid out in expert order
    padded, ends, total = _padded_runs(counts, BLOCK_M)
    # 3. every slot starts as the padding sentinel NUMEL ...
    _fill_sentinels(sorted_ids_ptr, 0, N_BLOCKS * BLOCK_M, NUMEL, FILL)
    tl.debug_barrier()  # ... before any thread writes a real id over a sentinel
    # 4. assignment a goes to ends[e] - padded[e] + (assignments of e before a): a stable sort
    next_slot = ends - padded
    for c0 in range(0, NUMEL, CHUNK):
        next_slot += _scatter_chunk(ids_ptr, sorted_ids_ptr, c0 + tl.arange(0, CHUNK), NUMEL, next_slot, BLOCK_E)
    # 5. the block experts and the padded total
    _store_block_experts(ends, total, expert_ids_ptr, npp_ptr, N_BLOCKS, E, BLOCK_E, BLOCK_M, CHUNK)


@waits_for_producer
@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, sorted_ids_ptr, NUMEL, N_SLOTS, FILL_SHARE,
                        BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    """Parallel form, step 1 (one program per CHUNK slice): the slice's assignments per expert into
    counts[slice, :], and the sentinel NUMEL into this program's FILL_SHARE of the sorted slots."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid = tl.program_id(0)
    tl.store(counts_ptr + pid * BLOCK_E + tl.arange(0, BLOCK_E),
             _chunk_histogram(ids_ptr, pid * CHUNK + tl.arange(0, CHUNK), NUMEL, BLOCK_E))
    _fill_sentinels(sorted_ids_ptr, pid * FILL_SHARE, tl.minimum((pid + 1) * FILL_SHARE, N_SLOTS), NUMEL, FILL)


@waits_for_producer
@triton.jit
def _align_offsets_kernel(counts_ptr, offsets_ptr, expert_ids_ptr, npp_ptr, N_SLICES, N_BLOCKS,
                          E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, SLICES: tl.constexpr,
                          CHUNK: tl.constexpr):
    """Parallel form, step 2 (one program): the experts' padded runs from the slices' histograms, each slice's
    first slot per expert (its run's start plus the earlier slices' counts) into offsets[slice, :], the block
    experts and the padded total, as the single kernel's steps 2 and 5."""
    wait_for_producer()
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for s0 in range(0, N_SLICES, SLICES):
        rows = s0 + tl.arange(0, SLICES)
        tile = tl.load(counts_ptr + rows[:, None] * BLOCK_E + experts[None, :], mask=(rows < N_SLICES)[:, None],
                       other=0)
        counts += tl.sum(tile, axis=0)
    padded, ends, total = _padded_runs(counts, BLOCK_M)
    carry = ends - padded  # the next slice's first slot per expert
    for s0 in range(0, N_SLICES, SLICES):
        rows = s0 + tl.arange(0, SLICES)
        in_range = (rows < N_SLICES)[:, None]
        tile = tl.load(counts_ptr + rows[:, None] * BLOCK_E + experts[None, :], mask=in_range, other=0)
        before = tl.cumsum(tile, axis=0) - tile  # earlier slices of this step
        tl.store(offsets_ptr + rows[:, None] * BLOCK_E + experts[None, :], carry[None, :] + before, mask=in_range)
        carry += tl.sum(tile, axis=0)
    _store_block_experts(ends, total, expert_ids_ptr, npp_ptr, N_BLOCKS, E, BLOCK_E, BLOCK_M, CHUNK)


@waits_for_producer
@triton.jit
def _align_scatter_kernel(ids_ptr, offsets_ptr, sorted_ids_ptr, NUMEL, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """Parallel form, step 3 (one program per slice): each assignment to its slice's first slot for its expert
    plus the same-expert assignments before it in the slice (the single kernel's step 4)."""
    wait_for_producer()
    pid = tl.program_id(0)
    first = tl.load(offsets_ptr + pid * BLOCK_E + tl.arange(0, BLOCK_E))
    _scatter_chunk(ids_ptr, sorted_ids_ptr, pid * CHUNK + tl.arange(0, CHUNK), NUMEL, first, BLOCK_E)


def align_blocks(numel, n_experts: int, block_m: int):
    """n_blocks of moe_align's layout for numel assignments: the worst case, a function of sizes only
    (numel may be a traced size)."""
    return cdiv(numel + n_experts * (block_m - 1), block_m)


# How moe_align is traced (torch.export inside the engines' triton_ops, then AOTInductor): "kernel"
# (default) is the single-program kernel behind wrap_triton, one launch per layer; "aten" is
# moe_align_ref's ~15 ops, which Inductor compiles into several kernels per MoE layer (the form the
# 16b engines ran in session 4). On the H200 (session 5, 4-layer 16b fp8 decode program) the kernel
# form took the CUDA-graph step from 0.739 to 0.708 ms (1.84 to 1.05 ms without a graph).
TRACED_ALIGN_FORMS = ("kernel", "aten")


def takes_parallel_form(block_m: int, parallel: bool | None = None) -> bool:
    """Whether moe_align runs its parallel form: as `parallel` asks, else from PARALLEL_BLOCK_M rows per block
    (the module docstring says why)."""
    return block_m >= PARALLEL_BLOCK_M if parallel is None else parallel


def align_gate(n_tokens):
    """1 when a batch of n_tokens needs moe_align, 0 at one token, whose grouped GEMMs run in direct
    mode (kernels/moe.py grouped_gemm_spec): min(1, T // 2), a symbolic Min while traced (no guard on
    T; T = 0 gives 0 too, and then nothing is launched anywhere)."""
    return torch.sym_min(1, n_tokens // 2)


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int, *, traced_form: str = "kernel",
              launch_gate=1, parallel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*k (token, slot) assignments by expert, padded per expert to block_m rows.

    topk_ids values must lie in [0, n_experts) (not checked: that would need a host sync).
    Eager: the Triton kernels, the single-program form or (parallel; default: block_m >= PARALLEL_BLOCK_M) the
    three-launch one (the module docstring). The ATen form below is ~15 launches, 0.48 ms on the H200 at T=1, which
    dominated a decode MoE step. While tracing (torch.export / AOTInductor): `traced_form` (TRACED_ALIGN_FORMS).
    Every form gives identical outputs.
    launch_gate (0 or 1, symbolic while traced; align_gate): multiplies the kernels' grids; 0 launches
    nothing and leaves the outputs unwritten, for callers whose grouped GEMMs do not read them (direct
    mode). The ATen form ignores it.
    """
    check_tensor("moe_align: topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2)
    if n_experts <= 0:
        raise ValueError(f"moe_align: n_experts={n_experts} must be positive")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"moe_align: block_m={block_m} must be a power of 2 >= 16 (tl.dot tile)")
    if traced_form not in TRACED_ALIGN_FORMS:
        raise ValueError(f"moe_align: traced_form={traced_form!r} must be one of {TRACED_ALIGN_FORMS}")
    if (tracing() and traced_form == "aten") or n_experts > MAX_ALIGN_EXPERTS:
        return moe_align_ref(topk_ids, n_experts, block_m)
    dev = topk_ids.device
    numel = topk_ids.numel()
    n_blocks = align_blocks(numel, n_experts, block_m)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    sorted_token_ids = torch.empty((n_blocks * block_m,), dtype=torch.int32, device=dev)
    expert_ids = torch.empty((n_blocks,), dtype=torch.int32, device=dev)
    num_tokens_post_pad = torch.empty((1,), dtype=torch.int32, device=dev)
    if type(launch_gate) is int and not launch_gate:
        return sorted_token_ids, expert_ids, num_tokens_post_pad
    block_e = max(16, next_pow2(n_experts))
    chunk = max(16, ALIGN_TILE // block_e)
    if not takes_parallel_form(block_m, parallel):
        traceable(_moe_align_kernel)[(launch_gate,)](
            ids, sorted_token_ids, expert_ids, num_tokens_post_pad, numel, n_blocks,
            E=n_experts, BLOCK_E=block_e, BLOCK_M=block_m, CHUNK=chunk, FILL=1024, num_warps=4)
        return sorted_token_ids, expert_ids, num_tokens_post_pad
    # one slice at least: with no assignments its program still writes the sentinels and zero counts
    n_slices = torch.sym_max(cdiv(numel, chunk), 1)
    n_slots = n_blocks * block_m
    counts = torch.empty((n_slices, block_e), dtype=torch.int32, device=dev)
    offsets = torch.empty((n_slices, block_e), dtype=torch.int32, device=dev)
    traceable(_align_count_kernel)[(n_slices * launch_gate,)](
        ids, counts, sorted_token_ids, numel, n_slots, cdiv(n_slots, n_slices), BLOCK_E=block_e, CHUNK=chunk,
        FILL=1024, num_warps=4)
    traceable(_align_offsets_kernel)[(launch_gate,)](
        counts, offsets, expert_ids, num_tokens_post_pad, n_slices, n_blocks, E=n_experts, BLOCK_E=block_e,
        BLOCK_M=block_m, SLICES=PARALLEL_SLICES, CHUNK=chunk, num_warps=4)
    traceable(_align_scatter_kernel)[(n_slices * launch_gate,)](
        ids, offsets, sorted_token_ids, numel, BLOCK_E=block_e, CHUNK=chunk, num_warps=4)
    return sorted_token_ids, expert_ids, num_tokens_post_pad


def moe_align_ref(topk_ids: torch.Tensor, n_experts: int, block_m: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align in ATen ops (argsort + scatter + searchsorted): the oracle, and the traced form."""
    dev = topk_ids.device
    numel = topk_ids.numel()
    n_blocks = align_blocks(numel, n_experts, block_m)
    flat = topk_ids.reshape(-1).long()  # [T*k]
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = torch.cumsum(padded, 0)  # [E]
    starts = ends - padded
    order = torch.argsort(flat, stable=True)  # [T*k] assignment ids by expert
    sorted_experts = flat[order]
    rank = torch.arange(numel, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    dest = starts[sorted_experts] + rank  # [T*k] slot of each sorted assignment
    sorted_token_ids = torch.full((n_blocks * block_m,), numel, dtype=torch.int32, device=dev)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(n_blocks, device=dev) * block_m  # [n_blocks]
    expert_ids = torch.searchsorted(ends, block_starts, right=True)  # first expert whose run ends past the block
    expert_ids = torch.where(expert_ids < n_experts, expert_ids, -1).to(torch.int32)
    num_tokens_post_pad = ends[-1:].to(torch.int32)
    return sorted_token_ids, expert_ids, num_tokens_post_pad
