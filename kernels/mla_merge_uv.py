"""MLA decode's split merge and W_UV's head_gemv in one launch, for the batch-1/2 decode step.

Why: after the split kernel (kernels/mla_decode.py mla_decode_partials) the decode program ran the reduce
kernel (the splits merged into lat [B, H, C], bf16) and then head_gemv (lat @ W_UV[h]^T): two launches per
layer, the reduce ~1.9 us + a 0.42 us launch gap at batch 1 on the H200. Here each head_gemv program merges
its (row, head)'s splits itself, in registers, and multiplies: the latent never goes through memory.

Layouts (as the two kernels it replaces read them):
  o_part [B, H, S, C] fp32, lse [B, H, S] fp32  the split kernel's partials (contiguous), row b's first
                                                `splits` written (the runtime rule: _batch_splits /
                                                _row_splits from the split launch's batch x head blocks)
  w      [H, C, N]  W_UV^T's view (C contiguous: ka.head_gemv_suits), N = dv
  out    [B, H, N]  w's dtype (the latent's: q's), fp32 accumulation

Algorithm: head_gemv's grid (H, N / BLOCK_N, B) and config. A program merges the row's splits as the reduce
kernel does (kernels/mla_decode_kernels.py _merged_splits: the same
split count, from tl.num_programs(2) = the batch the split kernel's grid had, and the same fp32 arithmetic),
rounds the latent row to out's dtype as the reduce kernel's store does, loads its [BLOCK_N, C] weight rows and
sums the product as head_gemv does (ka._head_gemv_product). So the result equals reduce + head_gemv bit for
bit: in the interpreter (tests/kernels/test_mla_merge_uv.py); on sm_90 the compiled reductions run in the two
kernels' layouts (test_compile_sm90.py), not yet compared on a GPU.
Cost: each of a (row, head)'s N / BLOCK_N programs merges the whole row again (16 at dv = 128): splits x C x
4 B of L2 reads each (64 KB at 32 splits), where the reduce kernel read them once.
PREFETCH_W (opt-in, session 21, not yet timed): the program's weight rows are prefetched into L2 at its start (PTX
prefetch.global.L2, no data result: the same bits), so their load after the merge is an L2 hit instead of a third
DRAM round trip after the row's lengths and the partials (~3.7 us per call in the H200's batch-1 profile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels import mla_absorb as ka
from dsv3_export.kernels._common import (LaunchSpec, autotune_or_single, cdiv, check_tensor, is_interpreted, launch,
                                         next_pow2)
from dsv3_export.kernels.l2_prefetch import prefetch_l2
from dsv3_export.kernels.mla_absorb import _head_gemv_product, _head_gemv_weights
from dsv3_export.kernels.mla_decode import DecodePartials
from dsv3_export.kernels.mla_decode_kernels import _merged_splits
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

# head_gemv's config: its product's fp32 sum order (the weight tile's layout) follows BLOCK_N and the warps.
MERGE_UV_CONFIGS = ka.HEAD_GEMV_CONFIGS


@waits_for_producer
@triton.jit
def _mla_merge_uv_kernel(
    o_part_ptr, lse_ptr, seqlens_ptr, SEQ_CAP, NUM_SPLITS, HEAD_BLOCKS,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    w_ptr, out_ptr, N, stride_wh, stride_wn, stride_outm, stride_outh, stride_outn,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_TARGET: tl.constexpr, MIN_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH_W: tl.constexpr,  # the weight rows into L2 first (PTX: never in the interpreter)
):
    """out[m, h, n] for row m (program axis 2), head h (axis 0) and BLOCK_N columns (axis 1). PREFETCH_W's
    prefetch comes before the wait (kernels/pdl.py PRE_WAIT_CALLS): under a programmatic graph edge it overlaps the
    split kernel's end."""
    head = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PREFETCH_W:  # an address in each 128-byte line of each row (64 bf16 / fp16 elements a line), none past w
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        cols = tl.minimum(tl.arange(0, BLOCK_C // 64) * 64, C - 1)
        prefetch_l2(w_ptr + head * stride_wh + rows[:, None] * stride_wn + cols[None, :])
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid_m = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c, mask_n = offs_c < C, offs_n < N
    lat = _merged_splits(o_part_ptr, lse_ptr, seqlens_ptr, SEQ_CAP, pid_m, head, tl.num_programs(2) * HEAD_BLOCKS,
                         NUM_SPLITS,
                         stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                         C, BLOCK_C, BLOCK_S, SPLIT_TARGET, MIN_SPLITS, MIN_KEYS)  # fp32 [BLOCK_C]
    # The weights after the merge: Triton 3.9 then sums the product in the weight tile's layout, as head_gemv
    # does (loaded before it, the tile was converted to the partials' layout: another fp32 sum order on the GPU;
    # tests/kernels/test_compile_sm90.py compares the kernels' reduction layouts)
    w = _head_gemv_weights(w_ptr, head, offs_n, offs_c, mask_n, mask_c, stride_wh, stride_wn)
    x = lat.to(out_ptr.dtype.element_ty)  # the latent as the reduce kernel stores it
    acc = _head_gemv_product(w, x)  # [BLOCK_N]
    row = pid_m.to(tl.int64)
    tl.store(out_ptr + row * stride_outm + head * stride_outh + offs_n * stride_outn,
             acc.to(out_ptr.dtype.element_ty), mask=mask_n)


_merge_uv_single = autotune_or_single(_mla_merge_uv_kernel, MERGE_UV_CONFIGS, key=[])


def merge_uv_spec(parts: DecodePartials, w: torch.Tensor, out: torch.Tensor, prefetch_w: bool = False) -> LaunchSpec:
    """The launch for parts' splits times w [H, C, N] (C contiguous) into out [B, H, N]; checked by the
    caller. B may be symbolic (traced): the kernel reads it from its grid. prefetch_w: PREFETCH_W (the module
    docstring), ignored in the interpreter (no PTX)."""
    bsz, heads, _, c = parts.o_part.shape
    n = w.shape[2]
    grid = lambda meta: (heads, cdiv(n, meta["BLOCK_N"]), bsz)  # noqa: E731
    args = (*parts.merge_args(), w, out, n, w.stride(0), w.stride(2), *out.stride())
    kwargs = dict(parts.merge_constexprs(), BLOCK_C=next_pow2(c),
                  PREFETCH_W=(prefetch_w and w.element_size() == 2 and c >= 64
                              and not is_interpreted(_mla_merge_uv_kernel)))
    return LaunchSpec(_mla_merge_uv_kernel, _merge_uv_single, MERGE_UV_CONFIGS, grid, args, kwargs)


def mla_merge_uv(parts: DecodePartials, w: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """mla_decode_reduce(parts, w.dtype) then head_gemv(., w), in one launch -> [B, H, N] in w.dtype.
    Meant for B <= 2, as head_gemv; w [H, C, N] with C contiguous (ka.head_gemv_suits)."""
    check_tensor("mla_merge_uv: o_part", parts.o_part, dtypes=(torch.float32,), ndim=4, contiguous=True)
    bsz, heads, splits, c = parts.o_part.shape
    check_tensor("mla_merge_uv: lse", parts.lse, dtypes=(torch.float32,), ndim=3, device=parts.o_part.device,
                 contiguous=True)
    check_tensor("mla_merge_uv: w", w, dtypes=ka.DTYPES, ndim=3, device=parts.o_part.device)
    if tuple(parts.lse.shape) != (bsz, heads, splits):
        raise ValueError(f"mla_merge_uv: lse is {tuple(parts.lse.shape)}, o_part {tuple(parts.o_part.shape)}")
    if tuple(w.shape[:2]) != (heads, c) or not ka.head_gemv_suits(w):
        raise ValueError(f"mla_merge_uv: w {tuple(w.shape)} (strides {w.stride()}) must be [H={heads}, C={c}, N] "
                         f"with C contiguous and C <= {ka.HEAD_GEMV_MAX_K}")
    if out is None:
        out = torch.empty((bsz, heads, w.shape[2]), dtype=w.dtype, device=w.device)
    check_tensor("mla_merge_uv: out", out, dtypes=(w.dtype,), ndim=3, device=w.device)
    if tuple(out.shape) != (bsz, heads, w.shape[2]):
        raise ValueError(f"mla_merge_uv: out must be {(bsz, heads, w.shape[2])}, got {tuple(out.shape)}")
    if out.numel():
        launch(*merge_uv_spec(parts, w, out), None)
    return out
