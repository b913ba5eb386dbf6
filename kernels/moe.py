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
      block); W8A8 with a in bf16/fp16, quantized 1x128 in registers with act_quant's arithmetic
      (quant_a: the same bits as act_quant + the fp8 GEMM, one launch less; each program
      re-quantizes its A tiles; opt-in, 2x slower than act_quant + GEMM on the H200 at decode);
      W8A16 (bf16/fp16 a, fp8 w widened in registers). Epilogues: SwiGLU (w rows = [gate ; up], writes silu(gate) * up, N/2
      columns) and the routing weight (row a scaled by topk_weights.flatten()[a]).
  grouped_gemm_scan(a, w, topk_ids, topk): the same GEMM without the alignment (decode): program
      (row block, column tile) finds its block of moe_align's layout in the flat topk_ids itself
      and shares grouped_gemm's K loop and epilogue (equal results, one launch less).
  fused_moe = align -> grouped gemm up (+SwiGLU) -> grouped gemm down (x routing weight) -> sum over k.
BLOCK_M of the GEMM is the alignment's block_m (inferred from the tensor sizes); BLOCK_N and the
pipeline are autotuned. Accumulation and epilogues are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsv3_export.kernels._common import (FP8_DTYPE, QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv,
                                         check_tensor, is_interpreted, launch, next_pow2)
from dsv3_export.kernels.fp8_quant import act_quant as act_quant_kernel
from dsv3_export.kernels.fp8_quant import quantize_rows
from dsv3_export.kernels.moe_align import TRACED_ALIGN_FORMS, moe_align, moe_align_ref  # noqa: F401 (re-exported)
from dsv3_export.reference import fp8 as fp8_ref

DENSE_DTYPES = (torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
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
    QUANT_A: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr,
):
    """Rows tok [BLOCK_M] (assignment ids, tok_mask: real ones) of one expert times column tile
    pid_n: the K loop and epilogue shared by the aligned and the scan kernels, so that a row's
    arithmetic does not depend on how its rows were found."""
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
        if QUANT_A:  # act_quant of this K block, masked entries 0 as act_quant loads them
            q, a_s = quantize_rows(a.to(tl.float32), SCALE_RECIPROCAL)
            a = q.to(w_ptr.dtype.element_ty)  # exact: q is on the e4m3 grid
        elif A_FP8:
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


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    N_OUT, K, NUM_VALID, TOPK, UP_OFFSET,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
    W_FP8: tl.constexpr, A_FP8: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT_A: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr,
):
    """A_FP8: fp8 x fp8 dots with a's 1x128 scales; from a_s_ptr, or with QUANT_A from quantizing
    a's bf16/fp16 tiles here (BLOCK_K = 128, SCALE_RECIPROCAL as in fp8_quant.quantize_rows)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    tok = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # assignment ids
    _expert_rows_tile(a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, topk_w_ptr, expert, tok, tok < NUM_VALID, pid_n,
                      N_OUT, K, TOPK, UP_OFFSET,
                      stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
                      W_FP8, A_FP8, SWIGLU, MUL_WEIGHT, UPCAST, SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K,
                      QUANT_A, SCALE_RECIPROCAL)


@triton.jit
def _scan_chunk(ids_ptr, c0, NUM_VALID, expert, CHUNK: tl.constexpr):
    """Assignment ids c0 + [0, CHUNK) and each one's rank among expert's ids of the chunk (-1: not expert's)."""
    offs = c0 + tl.arange(0, CHUNK)
    match = (tl.load(ids_ptr + offs, mask=offs < NUM_VALID, other=-1) == expert).to(tl.int32)  # [CHUNK]
    return offs, tl.where(match != 0, tl.cumsum(match, axis=0) - 1, -1)


@triton.jit
def _grouped_gemm_scan_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, topk_w_ptr, ids_ptr,
    N_OUT, K, NUM_VALID, TOPK, UP_OFFSET, N_EXPERTS,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
    W_FP8: tl.constexpr, A_FP8: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT_A: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Program (row block b, column tile): block b of moe_align's layout (experts in order, each
    expert's assignments in order, BLOCK_M per block), found from the flat topk_ids here: a
    histogram of the ids gives each expert's blocks, b's expert and its first row r0; a second
    pass picks that expert's rows r0..r0+BLOCK_M-1. The ids are read CHUNK at a time (the
    [CHUNK, BLOCK_E] and [BLOCK_M, CHUNK] one-hots stay small); blocks past the last exit."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, NUM_VALID, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < NUM_VALID, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)  # [BLOCK_E]
    counts = tl.where(experts < N_EXPERTS, counts, 0)  # ids past E match no expert (their rows stay unwritten)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, axis=0)  # [BLOCK_E] blocks up to and including each expert
    if pid_m >= tl.sum(blocks, axis=0):
        return
    expert = tl.sum((ends <= pid_m).to(tl.int32), axis=0)  # the expert whose blocks hold pid_m
    mine = experts == expert
    r0 = (pid_m - tl.sum(tl.where(mine, ends - blocks, 0), axis=0)) * BLOCK_M
    n_match = tl.sum(tl.where(mine, counts, 0), axis=0)
    rows = r0 + tl.arange(0, BLOCK_M)
    tok = tl.zeros((BLOCK_M,), dtype=tl.int32)
    before = tl.full((), 0, tl.int32)  # expert's assignments in the chunks already read
    for c0 in range(0, NUM_VALID, CHUNK):
        offs, ranks = _scan_chunk(ids_ptr, c0, NUM_VALID, expert, CHUNK)
        row = tl.where(ranks >= 0, ranks + before, -1)  # [CHUNK] expert's row of each id, -1: not its
        pick = row[None, :] == rows[:, None]  # [BLOCK_M, CHUNK] one-hot of each row's id
        tok += tl.sum(tl.where(pick, offs[None, :], 0), axis=1)  # [BLOCK_M] assignment ids
        before += tl.max(ranks, axis=0) + 1
    tok_mask = rows < n_match
    tok = tl.where(tok_mask, tok, NUM_VALID)
    _expert_rows_tile(a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, topk_w_ptr, expert.to(tl.int64), tok, tok_mask,
                      pid_n, N_OUT, K, TOPK, UP_OFFSET,
                      stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm,
                      W_FP8, A_FP8, SWIGLU, MUL_WEIGHT, UPCAST, SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K,
                      QUANT_A, SCALE_RECIPROCAL)


_grouped_gemm_tuned = autotune_or_single(_grouped_gemm_kernel, GROUPED_GEMM_CONFIGS,
                                         key=["N_OUT", "K", "BLOCK_M", "W_FP8", "A_FP8", "SWIGLU", "QUANT_A"])


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


def _check_operands(fn: str, a: torch.Tensor, w: torch.Tensor, topk: int, a_scale: torch.Tensor | None,
                    w_scale: torch.Tensor | None, topk_weights: torch.Tensor | None, fuse_swiglu: bool,
                    out_dtype: torch.dtype | None, quant_a: bool) -> tuple[int, torch.dtype]:
    """The checks grouped_gemm and grouped_gemm_scan share (fn names the caller in the errors);
    -> (output columns, output dtype)."""
    check_tensor(f"{fn}: a", a, dtypes=DENSE_DTYPES + (FP8_DTYPE,), ndim=2)
    dev = a.device
    check_tensor(f"{fn}: w", w, dtypes=DENSE_DTYPES + (FP8_DTYPE,), ndim=3, device=dev)
    a_fp8, w_fp8 = a.dtype == FP8_DTYPE, w.dtype == FP8_DTYPE
    if a_fp8 and not w_fp8 or not w_fp8 and w.dtype != a.dtype:
        raise TypeError(f"{fn}: a {a.dtype} with w {w.dtype} is not a supported pair "
                        "(same dense dtype, fp8 x fp8, or dense a x fp8 w)")
    if quant_a and (a_fp8 or not w_fp8):
        raise TypeError(f"{fn}: quant_a needs bf16/fp16 a and fp8 w, got a {a.dtype}, w {w.dtype}")
    t, k = a.shape
    e, n, kw = w.shape
    if kw != k:
        raise ValueError(f"{fn}: a is [T, K={k}] but w is [E, N, K={kw}]")
    if topk < 1:
        raise ValueError(f"{fn}: topk={topk} must be >= 1")
    if fuse_swiglu and n % 2:
        raise ValueError(f"{fn}: fuse_swiglu needs w rows [gate; up] (even N), got N={n}")
    k_blocks = cdiv(k, QUANT_BLOCK)
    if w_fp8:
        if w_scale is None:
            raise ValueError(f"{fn}: fp8 w needs w_scale [E, ceil(N/128), ceil(K/128)]")
        check_tensor(f"{fn}: w_scale", w_scale, dtypes=(torch.float32,), ndim=3, device=dev)
        if tuple(w_scale.shape) != (e, cdiv(n, QUANT_BLOCK), k_blocks) or w_scale.stride(2) != 1:
            raise ValueError(f"{fn}: w_scale must be [E, ceil(N/128), ceil(K/128)] = "
                             f"{(e, cdiv(n, QUANT_BLOCK), k_blocks)}, got {tuple(w_scale.shape)}")
    elif w_scale is not None:
        raise ValueError(f"{fn}: w_scale is only for fp8 w; w is {w.dtype}")
    if a_fp8:
        if a_scale is None:
            raise ValueError(f"{fn}: fp8 a needs a_scale [T, ceil(K/128)]")
        check_tensor(f"{fn}: a_scale", a_scale, dtypes=(torch.float32,), ndim=2, device=dev)
        if tuple(a_scale.shape) != (t, k_blocks) or a_scale.stride(1) != 1:
            raise ValueError(f"{fn}: a_scale must be [T, ceil(K/128)] = {(t, k_blocks)} with unit last "
                             f"stride, got {tuple(a_scale.shape)} strides {a_scale.stride()}")
    elif a_scale is not None:
        raise ValueError(f"{fn}: a_scale is only for fp8 a; a is {a.dtype}")
    if a.stride(1) != 1 or w.stride(2) != 1:
        raise ValueError(f"{fn}: a and w need unit stride along K, got {a.stride()} and {w.stride()}")
    if topk_weights is not None:
        check_tensor(f"{fn}: topk_weights", topk_weights, device=dev, contiguous=True,
                     dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if topk_weights.numel() != t * topk:
            raise ValueError(f"{fn}: topk_weights has {topk_weights.numel()} entries, need T*topk={t * topk}")
    out_dtype = out_dtype or (torch.bfloat16 if a_fp8 else a.dtype)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{fn}: out_dtype {out_dtype} not supported; expected one of {OUT_DTYPES}")
    return (n // 2 if fuse_swiglu else n), out_dtype


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                 num_tokens_post_pad: torch.Tensor, topk: int, *, a_scale: torch.Tensor | None = None,
                 w_scale: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                 fuse_swiglu: bool = False, out_dtype: torch.dtype | None = None,
                 quant_a: bool = False, scale_reciprocal: bool | None = None,
                 config: triton.Config | None = None) -> torch.Tensor:
    """a [T, K] (row of assignment i is i // topk), w [E, N, K] -> [T*topk, N] (or N/2 with fuse_swiglu).

    Precisions: a and w bf16/fp16 (same dtype); w fp8 + w_scale with fp8 a + a_scale (W8A8);
    w fp8 + w_scale with bf16/fp16 a and no a_scale: weight-only W8A16, or with quant_a W8A8
    with a quantized 1x128 in the kernel, bit for bit fp8_quant.act_quant(a, scale_reciprocal=
    scale_reciprocal) (default: as on a's device) followed by this GEMM.
    """
    n_out, out_dtype = _check_operands("grouped_gemm", a, w, topk, a_scale, w_scale, topk_weights, fuse_swiglu,
                                       out_dtype, quant_a)
    dev = a.device
    check_tensor("grouped_gemm: sorted_token_ids", sorted_token_ids, dtypes=(torch.int32,), ndim=1, device=dev,
                 contiguous=True)
    check_tensor("grouped_gemm: expert_ids", expert_ids, dtypes=(torch.int32,), ndim=1, device=dev, contiguous=True)
    check_tensor("grouped_gemm: num_tokens_post_pad", num_tokens_post_pad, dtypes=(torch.int32,), ndim=1,
                 device=dev)
    if expert_ids.numel() == 0 or sorted_token_ids.numel() % expert_ids.numel():
        raise ValueError(f"grouped_gemm: sorted_token_ids ({sorted_token_ids.numel()}) must be expert_ids "
                         f"({expert_ids.numel()}) blocks of block_m rows; pass moe_align's outputs unchanged")
    block_m = sorted_token_ids.numel() // expert_ids.numel()
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"grouped_gemm: inferred block_m={block_m} must be a power of 2 >= 16")
    out = torch.empty((a.shape[0] * topk, n_out), dtype=out_dtype, device=dev)
    if out.numel() == 0:
        return out
    reciprocal = a.is_cuda if scale_reciprocal is None else scale_reciprocal
    launch(*grouped_gemm_spec(a, a_scale, w, w_scale, out, topk_weights, sorted_token_ids, expert_ids,
                              num_tokens_post_pad, topk, fuse_swiglu, quant_a, reciprocal), config)
    return out


def grouped_gemm_spec(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
                      out: torch.Tensor, topk_weights: torch.Tensor | None, sorted_token_ids: torch.Tensor,
                      expert_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor, topk: int, fuse_swiglu: bool,
                      quant_a: bool, scale_reciprocal: bool) -> LaunchSpec:
    """grouped_gemm's launch into out [T*topk, N or N/2] (inputs checked by the caller); block_m is
    inferred from moe_align's sizes, the grid's rows bounded by row_blocks (symbolic when traced)."""
    t, k = a.shape
    n_out = out.shape[1]
    a_fp8, w_fp8 = a_scale is not None, w_scale is not None
    dummy = out  # never read: the constexpr flags compile its loads away
    args = (a, a_scale if a_fp8 else dummy, w, w_scale if w_fp8 else dummy, out,
            topk_weights if topk_weights is not None else dummy,
            sorted_token_ids, expert_ids, num_tokens_post_pad,
            n_out, k, t * topk, topk, n_out if fuse_swiglu else 0,
            a.stride(0), a_scale.stride(0) if a_fp8 else 0, w.stride(0), w.stride(1),
            w_scale.stride(0) if w_fp8 else 0, w_scale.stride(1) if w_fp8 else 0, out.stride(0))
    fp8_dot = a_fp8 or quant_a
    kwargs = dict(W_FP8=w_fp8, A_FP8=fp8_dot, SWIGLU=fuse_swiglu, MUL_WEIGHT=topk_weights is not None,
                  UPCAST=is_interpreted(_grouped_gemm_kernel) and not fp8_dot, SCALE_BLOCK=QUANT_BLOCK,
                  BLOCK_M=sorted_token_ids.shape[0] // expert_ids.shape[0],
                  BLOCK_K=QUANT_BLOCK if w_fp8 else DENSE_BLOCK_K, QUANT_A=quant_a, SCALE_RECIPROCAL=scale_reciprocal)
    rows = row_blocks(expert_ids.shape[0], t * topk)  # symbolic Min while traced: no guard on T
    grid = lambda meta: (rows, cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    return LaunchSpec(_grouped_gemm_kernel, _grouped_gemm_tuned, GROUPED_GEMM_CONFIGS, grid, args, kwargs)


# The scan form (grouped_gemm_scan): ids read SCAN_CHUNK at a time (one chunk up to T*k = 64, T = 8 at
# k = 8; its [SCAN_CHUNK, next_pow2(E)] histogram tile: 64 x 128 int32 at E = 66); few configs so that
# its autotuning stays short.
SCAN_CHUNK = 64
SCAN_BLOCK_M = 16
GROUPED_GEMM_SCAN_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
]
_grouped_gemm_scan_tuned = autotune_or_single(_grouped_gemm_scan_kernel, GROUPED_GEMM_SCAN_CONFIGS,
                                              key=["N_OUT", "K", "BLOCK_M", "W_FP8", "A_FP8", "SWIGLU", "QUANT_A",
                                                   "CHUNK"])


def grouped_gemm_scan(a: torch.Tensor, w: torch.Tensor, topk_ids: torch.Tensor, topk: int, *,
                      a_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                      topk_weights: torch.Tensor | None = None, fuse_swiglu: bool = False,
                      out_dtype: torch.dtype | None = None, quant_a: bool = False,
                      scale_reciprocal: bool | None = None, block_m: int = SCAN_BLOCK_M, chunk: int = SCAN_CHUNK,
                      config: triton.Config | None = None) -> torch.Tensor:
    """grouped_gemm without moe_align: the same operands, precisions and epilogues, with topk_ids
    [T, k'] (any int dtype; k' * T == T_a * topk assignments: the up GEMM's [T, k] ids with topk=k,
    the down GEMM's the same ids with topk=1) instead of the alignment.

    Why: at decode the alignment is a single-program launch (~4.4 us per MoE layer on the H200)
    in front of GEMMs of ~13 us each. Here program (row block b, column tile) reads the flat ids
    itself (chunk ids at a time, twice: a histogram, then its rows) and finds block b of
    moe_align's layout: the same row groups, the same K loop and epilogue, so the results equal
    grouped_gemm's bit for bit under the same config, and the same grid (row_blocks). Correct for
    any T*k; meant for decode: every program reads all T*k ids twice. Ids outside [0, E) match no
    expert: their rows are not written.
    """
    n_out, out_dtype = _check_operands("grouped_gemm_scan", a, w, topk, a_scale, w_scale, topk_weights,
                                       fuse_swiglu, out_dtype, quant_a)
    check_tensor("grouped_gemm_scan: topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), device=a.device)
    if topk_ids.numel() != a.shape[0] * topk:
        raise ValueError(f"grouped_gemm_scan: topk_ids has {topk_ids.numel()} entries, need T*topk="
                         f"{a.shape[0] * topk} (a is [T={a.shape[0]}, K], topk={topk})")
    if block_m < 16 or block_m & (block_m - 1) or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"grouped_gemm_scan: block_m={block_m} and chunk={chunk} must be powers of 2 >= 16")
    out = torch.empty((a.shape[0] * topk, n_out), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    reciprocal = a.is_cuda if scale_reciprocal is None else scale_reciprocal
    launch(*grouped_gemm_scan_spec(a, a_scale, w, w_scale, out, topk_weights, topk_ids.contiguous(), topk,
                                   fuse_swiglu, quant_a, reciprocal, block_m, chunk), config)
    return out


def grouped_gemm_scan_spec(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor,
                           w_scale: torch.Tensor | None, out: torch.Tensor, topk_weights: torch.Tensor | None,
                           topk_ids: torch.Tensor, topk: int, fuse_swiglu: bool, quant_a: bool,
                           scale_reciprocal: bool, block_m: int = SCAN_BLOCK_M,
                           chunk: int = SCAN_CHUNK) -> LaunchSpec:
    """grouped_gemm_scan's launch into out [T*topk, N or N/2] (inputs checked by the caller; topk_ids
    contiguous): grouped_gemm's grid, row_blocks(moe_align's n_blocks, T*k) x column tiles."""
    t, k = a.shape
    n_out = out.shape[1]
    a_fp8, w_fp8 = a_scale is not None, w_scale is not None
    dummy = out  # never read: the constexpr flags compile its loads away
    args = (a, a_scale if a_fp8 else dummy, w, w_scale if w_fp8 else dummy, out,
            topk_weights if topk_weights is not None else dummy, topk_ids,
            n_out, k, t * topk, topk, n_out if fuse_swiglu else 0, w.shape[0],
            a.stride(0), a_scale.stride(0) if a_fp8 else 0, w.stride(0), w.stride(1),
            w_scale.stride(0) if w_fp8 else 0, w_scale.stride(1) if w_fp8 else 0, out.stride(0))
    fp8_dot = a_fp8 or quant_a
    kwargs = dict(W_FP8=w_fp8, A_FP8=fp8_dot, SWIGLU=fuse_swiglu, MUL_WEIGHT=topk_weights is not None,
                  UPCAST=is_interpreted(_grouped_gemm_scan_kernel) and not fp8_dot, SCALE_BLOCK=QUANT_BLOCK,
                  BLOCK_M=block_m, BLOCK_K=QUANT_BLOCK if w_fp8 else DENSE_BLOCK_K, QUANT_A=quant_a,
                  SCALE_RECIPROCAL=scale_reciprocal, CHUNK=chunk, BLOCK_E=next_pow2(w.shape[0]))
    n_experts = w.shape[0]
    n_blocks = cdiv(t * topk + n_experts * (block_m - 1), block_m)  # moe_align's worst case
    rows = row_blocks(n_blocks, t * topk)  # symbolic Min while traced: no guard on T
    grid = lambda meta: (rows, cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    return LaunchSpec(_grouped_gemm_scan_kernel, _grouped_gemm_scan_tuned, GROUPED_GEMM_SCAN_CONFIGS, grid, args,
                      kwargs)


def choose_block_m(n_tokens: int, topk: int, n_experts: int) -> int:
    """Rows per block ~ the mean assignments per expert, within [16, 64]: little padding at decode."""
    per_expert = n_tokens * topk / max(n_experts, 1)
    for bm in (16, 32):
        if per_expert <= bm:
            return bm
    return 64


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              act_quant: bool = True, block_m: int | None = None, fuse_act_quant: bool = False
              ) -> torch.Tensor:
    """Routed experts: x [T, D], w13 [E, 2I, D] (rows [w1; w3]), w2 [E, D, I] -> [T, D] in x.dtype.

    With w13_scale/w2_scale (fp8 weights): act_quant=True quantizes the activations 1x128 on the
    fly (W8A8, dsv3::moe_experts_fp8(act_quant=True)); act_quant=False keeps them in x.dtype (W8A16).
    fuse_act_quant: quantize x and h inside the grouped GEMMs (same result, two launches fewer)
    instead of with act_quant launches. Off by default: 2x slower on the H200 at decode (see
    engines/torch_triton.py FUSED_ACT_QUANT_ENV).
    """
    check_tensor("fused_moe: x", x, dtypes=DENSE_DTYPES, ndim=2)
    check_tensor("fused_moe: topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2, device=x.device)
    check_tensor("fused_moe: topk_weights", topk_weights, ndim=2, device=x.device)
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T={x.shape[0]}, k]")
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("fused_moe: pass both w13_scale and w2_scale (fp8) or neither")
    t, _ = x.shape
    topk = topk_ids.shape[1]
    n_experts = w13.shape[0]
    bm = block_m or choose_block_m(t, topk, n_experts)
    sorted_ids, expert_ids, npp = moe_align(topk_ids, n_experts, bm)
    weights = topk_weights.contiguous()
    if w13_scale is None or not act_quant:
        scales = {} if w13_scale is None else dict(w_scale=w13_scale)
        h = grouped_gemm(x.contiguous(), w13, sorted_ids, expert_ids, npp, topk, fuse_swiglu=True,
                         out_dtype=x.dtype, **scales)  # [T*k, I]
        scales = {} if w2_scale is None else dict(w_scale=w2_scale)
        y = grouped_gemm(h, w2, sorted_ids, expert_ids, npp, 1, topk_weights=weights, out_dtype=x.dtype,
                         **scales)  # [T*k, D]
    elif fuse_act_quant:
        h = grouped_gemm(x.contiguous(), w13, sorted_ids, expert_ids, npp, topk, w_scale=w13_scale,
                         fuse_swiglu=True, out_dtype=x.dtype, quant_a=True)  # [T*k, I]
        y = grouped_gemm(h, w2, sorted_ids, expert_ids, npp, 1, w_scale=w2_scale, topk_weights=weights,
                         out_dtype=x.dtype, quant_a=True)  # [T*k, D]
    else:
        xq, xs = act_quant_kernel(x.contiguous())
        h = grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, topk, a_scale=xs, w_scale=w13_scale,
                         fuse_swiglu=True, out_dtype=x.dtype)  # [T*k, I]
        hq, hs = act_quant_kernel(h)
        y = grouped_gemm(hq, w2, sorted_ids, expert_ids, npp, 1, a_scale=hs, w_scale=w2_scale,
                         topk_weights=weights, out_dtype=x.dtype)  # [T*k, D]
    return y.view(t, topk, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)  # [T, D]


# ---------------------------------------------------------------------------------------------
# pure-torch references


def _dense_expert(w: torch.Tensor, s: torch.Tensor | None, e: int) -> torch.Tensor:
    """Expert e of [E, N, K] (+ scales) -> fp32 [N, K]."""
    return w[e].float() if s is None else fp8_ref.weight_dequant(w[e], s[e], torch.float32)


def grouped_gemm_ref(a: torch.Tensor, w: torch.Tensor, topk_ids: torch.Tensor, topk: int, *,
                     a_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                     topk_weights: torch.Tensor | None = None, fuse_swiglu: bool = False,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row i of the output = f(a[i // topk] @ w[topk_ids.flatten()[i]]^T), fp32 math.

    A loop over the experts that are used, one fp32 expert weight at a time: memory
    O(T*topk*max(N, K) + N*K). (Gathering w[topk_ids] instead materializes a [T*topk, N, K]
    tensor: 528 GiB at T=4096, top-6, N=2816, K=2048, the OOM of the first H200 run.)
    """
    a_f = fp8_ref.act_dequant(a, a_scale) if a_scale is not None else a.float()
    experts = topk_ids.reshape(-1).long()  # [T*topk]
    y = torch.zeros((experts.numel(), w.shape[1]), dtype=torch.float32, device=a.device)  # [T*topk, N]
    for e in torch.unique(experts).tolist():
        rows = torch.nonzero(experts == e).squeeze(1)  # assignment ids routed to e
        y[rows] = a_f[rows // topk] @ _dense_expert(w, w_scale, e).T  # [n_e, N]
    if fuse_swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if topk_weights is not None:
        y = y * topk_weights.reshape(-1, 1).float()
    return y.to(out_dtype)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, act_quant: bool = True) -> torch.Tensor:
    """Per-expert loop in fp32; with fp8 weights and act_quant the activations are quantized where the kernel does."""
    fp8 = w13_scale is not None and act_quant
    inter = w13.shape[1] // 2
    xf = fp8_ref.act_dequant(*fp8_ref.act_quant(x)) if fp8 else x.float()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        gu = xf[tok] @ _dense_expert(w13, w13_scale, e).T  # [n_e, 2I]
        h = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)  # the kernel stores h in x.dtype
        hf = fp8_ref.act_dequant(*fp8_ref.act_quant(h)) if fp8 else h.float()
        y.index_add_(0, tok, (hf @ _dense_expert(w2, w2_scale, e).T) * topk_weights[tok, slot, None].float())
    return y.to(x.dtype)
