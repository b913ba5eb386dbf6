"""Mixture-of-Experts as token alignment + grouped GEMM (vLLM fused_moe style), no host sync.

Shapes: T tokens, k = top-k, E experts, D model dim, I expert inter dim.
  moe_align(topk_ids [T, k], E, block_m) -> sorted_token_ids, expert_ids, num_tokens_post_pad:
      the assignments grouped by expert, padded per expert to block_m rows (kernels/moe_align.py,
      re-exported here).
  grouped_gemm(a, w [E, N, K], sorted_token_ids, expert_ids, num_tokens_post_pad, topk)
      program (block b, column tile n): rows a[sorted_ids // topk] of its block times w[expert]^T;
      output row = the assignment id, so out is [T*k, N] in (token, slot) order. The grid has
      row_blocks(n_blocks, T*k) rows (no more blocks can hold work); blocks past
      num_tokens_post_pad exit at once. Precisions: bf16/fp16; W8A8 (a fp8 [T, K] with scales
      [T, ceil(K/128)], w fp8 with [E, ceil(N/128), ceil(K/128)] scales, applied per 128-wide K
      block); W8A16 (bf16/fp16 a, fp8 w widened in registers). Epilogues: SwiGLU (w rows = [gate ; up], writes
      silu(gate) * up, N/2 columns) and the routing weight (row a scaled by topk_weights.flatten()[a]).
  fused_moe = align -> grouped gemm up (+SwiGLU) -> grouped gemm down (x routing weight) -> sum over k.
BLOCK_M of the GEMM is the alignment's block_m (inferred from the tensor sizes); BLOCK_N and the
pipeline are autotuned. Accumulation and epilogues are fp32. The launchers' argument checks live in
kernels/moe_checks.py, the pure-torch references (grouped_gemm_ref, fused_moe_ref, re-exported here)
in kernels/moe_ref.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import FP8_DTYPE  # noqa: F401 (re-exported: the tests read moe.FP8_DTYPE)
from dsv3_export.kernels._common import (QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv,
                                         check_tensor, is_interpreted, launch)
from dsv3_export.kernels.fp8_quant import act_quant as act_quant_kernel
from dsv3_export.kernels.moe_checks import OUT_DTYPES  # noqa: F401 (re-exported)
from dsv3_export.kernels.moe_checks import DENSE_DTYPES, check_alignment, check_operands
from dsv3_export.kernels.moe_ref import fused_moe_ref, grouped_gemm_ref  # noqa: F401 (re-exported)
from dsv3_export.kernels.moe_align import TRACED_ALIGN_FORMS, align_gate, moe_align, moe_align_ref  # noqa: F401 (re-exported)
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

# K step of the dense path; the fp8 path steps by the scale block (128).
DENSE_BLOCK_K = 64

GROUPED_GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
]


@triton.jit
def _expert_k_step(a, a_s, w_ptrs, w_s_ptrs, mask_k, mask_n, acc, W_FP8: tl.constexpr, A_FP8: tl.constexpr,
                   UPCAST: tl.constexpr):
    """acc += one K block of a [BM, BK] x w [BK, BN], with the fp8 block scales where they apply."""
    w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
    if UPCAST:
        w = w.to(tl.float32)
    if W_FP8:
        w_s = tl.load(w_s_ptrs, mask=mask_n, other=0.0)
        if A_FP8:
            acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        else:  # weight-only: e4m3 -> a's dtype is exact, the block scale multiplies the fp32 partial
            acc += tl.dot(a, w.to(a.dtype)) * w_s[None, :]
    else:
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _expert_rows_tile(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, topk_w_ptr,
    expert, tok, tok_mask, pid_n,
    N_OUT, K, TOPK, UP_OFFSET,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
    W_FP8: tl.constexpr, A_FP8: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows tok [BLOCK_M] (assignment ids, tok_mask: real ones) of one expert times column tile
    pid_n: the K loop and epilogue of _grouped_gemm_kernel's program."""
    a_row = (tok // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT

    a_rows = a_ptr + a_row[:, None] * stride_am
    w_gate = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn
    w_up = w_ptr + expert * stride_we + (offs_n + UP_OFFSET)[None, :] * stride_wn
    a_s_rows = a_s_ptr + a_row * stride_asm
    w_s_gate = w_s_ptr + expert * stride_wse + (offs_n // SCALE_BLOCK) * stride_wsn
    w_s_up = w_s_ptr + expert * stride_wse + ((offs_n + UP_OFFSET) // SCALE_BLOCK) * stride_wsn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=tok_mask[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong
            a = a.to(tl.float32)
        if A_FP8:
            a_s = tl.load(a_s_rows + kb, mask=tok_mask, other=0.0)
        else:
            a_s = tl.zeros((BLOCK_M,), dtype=tl.float32)  # unused
        acc_g = _expert_k_step(a, a_s, w_gate + offs_k[:, None], w_s_gate + kb, mask_k, mask_n, acc_g,
                               W_FP8, A_FP8, UPCAST)
        if SWIGLU:
            acc_u = _expert_k_step(a, a_s, w_up + offs_k[:, None], w_s_up + kb, mask_k, mask_n, acc_u,
                                   W_FP8, A_FP8, UPCAST)

    out = acc_g
    if SWIGLU:
        out = acc_g * tl.sigmoid(acc_g) * acc_u
    if MUL_WEIGHT:
        rw = tl.load(topk_w_ptr + tok, mask=tok_mask, other=0.0).to(tl.float32)
        out = out * rw[:, None]
    c_ptrs = c_ptr + tok.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=tok_mask[:, None] & mask_n[None, :])


@waits_for_producer
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
    N_OUT, K, NUM_VALID, DIRECT_ROWS, TOPK, UP_OFFSET,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
    W_FP8: tl.constexpr, A_FP8: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A_FP8: fp8 x fp8 dots with a's 1x128 scales from a_s_ptr (BLOCK_K = 128).
    Direct mode (NUM_VALID <= DIRECT_ROWS, i.e. one token): program row b takes assignment b alone,
    its expert read from topk_ids_ptr; moe_align's outputs are not read (grouped_gemm_spec)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    direct = NUM_VALID <= DIRECT_ROWS
    # blocks past the used ones exit (direct: the grid has exactly NUM_VALID rows, none exits; the
    # alignment's num_post_pad, unwritten then, is loaded and discarded)
    if pid_m >= tl.where(direct, NUM_VALID, tl.load(num_post_pad_ptr) // BLOCK_M):
        return
    rows = tl.arange(0, BLOCK_M)
    if direct:
        expert = tl.load(topk_ids_ptr + pid_m).to(tl.int64)
        tok = pid_m + rows  # only row 0 is real
        tok_mask = rows == 0
    else:
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        tok = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + rows)  # assignment ids
        tok_mask = tok < NUM_VALID
    _expert_rows_tile(a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, topk_w_ptr, expert, tok, tok_mask,
                      pid_n, N_OUT, K, TOPK, UP_OFFSET,
                      stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
                      W_FP8, A_FP8, SWIGLU, MUL_WEIGHT, UPCAST, SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K)


_TUNE_KEY = ["N_OUT", "K", "BLOCK_M", "W_FP8", "A_FP8", "SWIGLU"]
_grouped_gemm_tuned = autotune_or_single(_grouped_gemm_kernel, GROUPED_GEMM_CONFIGS, key=_TUNE_KEY)


@functools.cache
def _grouped_gemm_single(block_n: int, warps: int, stages: int):
    """The kernel compiled with one config (an autotuner of one, which times nothing): one object per config."""
    config = triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    return autotune_or_single(_grouped_gemm_kernel, [config], key=_TUNE_KEY)


def grouped_gemm_pinned(spec: LaunchSpec, config: triton.Config) -> LaunchSpec:
    """grouped_gemm_spec's launch with `config` alone (no autotuning), e.g. the one-token launch of a decode program
    tuned at a larger batch (engines/torch_triton_moe.py MOE_DIRECT_CONFIGS_ENV)."""
    tuned = _grouped_gemm_single(config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    return spec._replace(tuned=tuned, configs=[config])


def row_blocks(n_blocks, n_assignments):
    """Row blocks of a grouped GEMM's grid: min(n_blocks, T*k), no guard on a traced size.

    Why no block past that bound can hold work: moe_align lays the experts' padded runs out from
    row 0, so the used blocks are the first num_tokens_post_pad / block_m; each used block holds
    at least one real assignment (a run of c > 0 assignments has ceil(c / block_m) blocks, the
    last one partial, none empty), so used blocks <= T*k; and used <= n_blocks by construction.
    At T=1, k=6, E=64, block_m=16 that is 6 row blocks instead of 61. torch.sym_min: a Min of the
    symbolic sizes while tracing (a Python min would specialize T), a plain int in eager mode.
    """
    return torch.sym_min(n_blocks, n_assignments)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                 num_tokens_post_pad: torch.Tensor, topk: int, *, a_scale: torch.Tensor | None = None,
                 w_scale: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                 fuse_swiglu: bool = False, out_dtype: torch.dtype | None = None,
                 direct_ids: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """a [T, K] (row of assignment i is i // topk), w [E, N, K] -> [T*topk, N] (or N/2 with fuse_swiglu).

    Precisions: a and w bf16/fp16 (same dtype); w fp8 + w_scale with fp8 a + a_scale (W8A8);
    w fp8 + w_scale with bf16/fp16 a and no a_scale: weight-only W8A16.
    direct_ids: the routing's topk_ids [tokens, k] (contiguous), for the direct mode of one token
    (grouped_gemm_spec); the alignment's outputs are then not read.
    """
    n_out, out_dtype = check_operands("grouped_gemm", a, w, topk, a_scale, w_scale, topk_weights, fuse_swiglu,
                                      out_dtype)
    check_alignment(sorted_token_ids, expert_ids, num_tokens_post_pad, a.device)
    if direct_ids is not None:
        check_tensor("grouped_gemm: direct_ids", direct_ids, dtypes=(torch.int32, torch.int64), ndim=2,
                     device=a.device)
        if direct_ids.numel() != a.shape[0] * topk or not direct_ids.is_contiguous():
            raise ValueError(f"grouped_gemm: direct_ids {tuple(direct_ids.shape)} must be the contiguous "
                             f"topk_ids of the {a.shape[0] * topk} assignments")
    out = torch.empty((a.shape[0] * topk, n_out), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    launch(*grouped_gemm_spec(a, a_scale, w, w_scale, out, topk_weights, sorted_token_ids, expert_ids,
                              num_tokens_post_pad, topk, fuse_swiglu, direct_ids), config)
    return out


def grouped_gemm_spec(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
                      out: torch.Tensor, topk_weights: torch.Tensor | None, sorted_token_ids: torch.Tensor,
                      expert_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor, topk: int, fuse_swiglu: bool,
                      direct_ids: torch.Tensor | None = None) -> LaunchSpec:
    """grouped_gemm's launch into out [T*topk, N or N/2] (inputs checked by the caller); block_m is
    inferred from moe_align's sizes, the grid's rows bounded by row_blocks (symbolic when traced).

    direct_ids (the routing's contiguous topk_ids [tokens, k]) turns on the direct mode for one
    token: when the assignments number at most k, program row b computes assignment b alone with
    expert direct_ids.flatten()[b] and the alignment's outputs are not read, so moe_align need not
    run (moe_align's launch_gate, align_gate). Why: at one token every assignment has its own expert
    (distinct top-k plus the shared experts), so the aligned layout holds one row per block anyway,
    and moe_align's one-program launch (~4.4 us in the H200's batch-1 16b step, 26 per step) bought
    nothing. Same rows, same per-row dot order: the same bits as the aligned path."""
    t, k = a.shape
    n_out = out.shape[1]
    a_fp8, w_fp8 = a_scale is not None, w_scale is not None
    dummy = out  # never read: the constexpr flags compile its loads away
    args = (a, a_scale if a_fp8 else dummy, w, w_scale if w_fp8 else dummy, out,
            topk_weights if topk_weights is not None else dummy,
            sorted_token_ids, expert_ids, num_tokens_post_pad,
            direct_ids if direct_ids is not None else sorted_token_ids,  # not read when DIRECT_ROWS = 0
            n_out, k, t * topk, direct_ids.shape[1] if direct_ids is not None else 0, topk,
            n_out if fuse_swiglu else 0,
            a.stride(0), a_scale.stride(0) if a_fp8 else 0, w.stride(0), w.stride(1),
            w_scale.stride(0) if w_fp8 else 0, w_scale.stride(1) if w_fp8 else 0, out.stride(0))
    kwargs = dict(W_FP8=w_fp8, A_FP8=a_fp8, SWIGLU=fuse_swiglu, MUL_WEIGHT=topk_weights is not None,
                  UPCAST=is_interpreted(_grouped_gemm_kernel) and not a_fp8, SCALE_BLOCK=QUANT_BLOCK,
                  BLOCK_M=sorted_token_ids.shape[0] // expert_ids.shape[0],
                  BLOCK_K=QUANT_BLOCK if w_fp8 else DENSE_BLOCK_K)
    rows = row_blocks(expert_ids.shape[0], t * topk)  # symbolic Min while traced: no guard on T
    grid = lambda meta: (rows, cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    return LaunchSpec(_grouped_gemm_kernel, _grouped_gemm_tuned, GROUPED_GEMM_CONFIGS, grid, args, kwargs)


def choose_block_m(n_tokens: int, topk: int, n_experts: int) -> int:
    """Rows per block ~ the mean assignments per expert, within [16, 64]: little padding at decode."""
    per_expert = n_tokens * topk / max(n_experts, 1)
    for bm in (16, 32):
        if per_expert <= bm:
            return bm
    return 64


def moe_routing(topk_ids: torch.Tensor, n_experts: int, block_m: int, direct: bool, *, traced_form: str = "kernel",
                parallel: bool | None = None):
    """The grouped GEMMs' routing: moe_align's (sorted_ids, expert_ids, num_tokens_post_pad), and
    direct_ids, the contiguous topk_ids when `direct` (grouped_gemm_spec's one-token mode: at T = 1
    the alignment then launches nothing, align_gate) or None. parallel: moe_align's."""
    alignment = moe_align(topk_ids, n_experts, block_m, traced_form=traced_form,
                          launch_gate=align_gate(topk_ids.shape[0]) if direct else 1, parallel=parallel)
    return alignment, topk_ids.contiguous() if direct else None


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              act_quant: bool = True, block_m: int | None = None, direct: bool = True) -> torch.Tensor:
    """Routed experts: x [T, D], w13 [E, 2I, D] (rows [w1; w3]), w2 [E, D, I] -> [T, D] in x.dtype.

    With w13_scale/w2_scale (fp8 weights): act_quant=True quantizes the activations 1x128 on the
    fly (W8A8, dsv3::moe_experts_fp8(act_quant=True)); act_quant=False keeps them in x.dtype (W8A16).
    direct: one token takes the grouped GEMMs' direct mode and no moe_align (grouped_gemm_spec).
    """
    check_tensor("fused_moe: x", x, dtypes=DENSE_DTYPES, ndim=2)
    check_tensor("fused_moe: topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2, device=x.device)
    check_tensor("fused_moe: topk_weights", topk_weights, ndim=2, device=x.device)
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T={x.shape[0]}, k]")
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("fused_moe: pass both w13_scale and w2_scale (fp8) or neither")
    check_tensor("fused_moe: w13", w13, ndim=3, device=x.device)
    check_tensor("fused_moe: w2", w2, ndim=3, device=x.device)
    # the alignment is built for w13's experts and read by both GEMMs: w2 with fewer would be read past its end
    if (w2.shape[0], w2.shape[1], 2 * w2.shape[2]) != (w13.shape[0], x.shape[1], w13.shape[1]):
        raise ValueError(f"fused_moe: w2 {tuple(w2.shape)} must be [E={w13.shape[0]}, D={x.shape[1]}, "
                         f"I={w13.shape[1] // 2}] for w13 {tuple(w13.shape)} and x {tuple(x.shape)}")
    t, _ = x.shape
    topk = topk_ids.shape[1]
    n_experts = w13.shape[0]
    bm = block_m or choose_block_m(t, topk, n_experts)
    (sorted_ids, expert_ids, npp), ids = moe_routing(topk_ids, n_experts, bm, direct)
    weights = topk_weights.contiguous()
    if w13_scale is None or not act_quant:
        scales = {} if w13_scale is None else dict(w_scale=w13_scale)
        h = grouped_gemm(x.contiguous(), w13, sorted_ids, expert_ids, npp, topk, fuse_swiglu=True,
                         out_dtype=x.dtype, direct_ids=ids, **scales)  # [T*k, I]
        scales = {} if w2_scale is None else dict(w_scale=w2_scale)
        y = grouped_gemm(h, w2, sorted_ids, expert_ids, npp, 1, topk_weights=weights, out_dtype=x.dtype,
                         direct_ids=ids, **scales)  # [T*k, D]
    else:
        xq, xs = act_quant_kernel(x.contiguous())
        h = grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, topk, a_scale=xs, w_scale=w13_scale,
                         fuse_swiglu=True, out_dtype=x.dtype, direct_ids=ids)  # [T*k, I]
        hq, hs = act_quant_kernel(h)
        y = grouped_gemm(hq, w2, sorted_ids, expert_ids, npp, 1, a_scale=hs, w_scale=w2_scale,
                         topk_weights=weights, out_dtype=x.dtype, direct_ids=ids)  # [T*k, D]
    return y.view(t, topk, y.shape[1]).sum(dim=1, dtype=torch.float32).to(x.dtype)  # [T, D] (-1: ambiguous at T=0)
