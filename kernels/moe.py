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
      W8A16 (bf16/fp16 a, fp8 w widened in registers). Epilogues: SwiGLU (w rows = [gate ; up], writes
      silu(gate) * up, N/2 columns) and the routing weight (row a scaled by topk_weights.flatten()[a]);
      quant_out: the output written as act_quant would quantize it (rounded to out_dtype, then fp8 +
      1x128 scales: the up GEMM hands the down GEMM its fp8 h, one act_quant launch fewer; BLOCK_N = 128).
  grouped_gemm_scan(a, w, topk_ids, topk): the same GEMM without the alignment (decode): program
      (row block, column tile) finds its block of moe_align's layout in the flat topk_ids itself
      and shares grouped_gemm's K loop and epilogue (equal results, one launch less).
  fused_moe = align -> grouped gemm up (+SwiGLU) -> grouped gemm down (x routing weight) -> sum over k.
BLOCK_M of the GEMM is the alignment's block_m (inferred from the tensor sizes); BLOCK_N and the
pipeline are autotuned. Accumulation and epilogues are fp32. The launchers' argument checks live in
kernels/moe_checks.py, the pure-torch references (grouped_gemm_ref, fused_moe_ref, re-exported here)
in kernels/moe_ref.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import FP8_DTYPE  # noqa: F401 (re-exported: the tests read moe.FP8_DTYPE)
from dsv3_export.kernels._common import (QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv,
                                         check_tensor, is_interpreted, launch, next_pow2)
from dsv3_export.kernels.fp8_quant import act_quant as act_quant_kernel
from dsv3_export.kernels.fp8_quant import act_quant_outputs, quantize_rows
from dsv3_export.kernels.moe_checks import OUT_DTYPES  # noqa: F401 (re-exported)
from dsv3_export.kernels.moe_checks import DENSE_DTYPES, check_alignment, check_operands, check_scan_routing
from dsv3_export.kernels.moe_ref import fused_moe_ref, grouped_gemm_ref  # noqa: F401 (re-exported)
from dsv3_export.kernels.moe_align import TRACED_ALIGN_FORMS, moe_align, moe_align_ref  # noqa: F401 (re-exported)
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
# quant_out (the output quantized 1x128 in the epilogue): one output column tile = one scale block, so
# BLOCK_N is 128 in every config. At the 16b decode up GEMM (T=1: I = 1408 -> 11 column tiles x 8
# experts = 88 programs on 132 SMs, each streaming 512 KB of fp8 w13) the pipeline depth and warps are
# what is left; deeper pipelines keep more bytes in flight per program. (Session 7's moe_cfg, T=1: the
# BN=128 tiles took 26.4-27.8 us against 22.5 us for the tuned BN=32 w4 s5.)
QUANT_OUT_CONFIGS = [
    triton.Config({"BLOCK_N": QUANT_BLOCK}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": QUANT_BLOCK}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": QUANT_BLOCK}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_N": QUANT_BLOCK}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_N": QUANT_BLOCK}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": QUANT_BLOCK}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": QUANT_BLOCK}, num_warps=8, num_stages=5),
]
# OUT_ROUND: the dtype a quantized output is rounded to first (the dtype h would be stored in).
OUT_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, c_s_ptr, topk_w_ptr,
    expert, tok, tok_mask, pid_n,
    N_OUT, K, TOPK, UP_OFFSET,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, stride_csm,
    W_FP8: tl.constexpr, A_FP8: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT_A: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr, QUANT_OUT: tl.constexpr, OUT_ROUND: tl.constexpr,
):
    """Rows tok [BLOCK_M] (assignment ids, tok_mask: real ones) of one expert times column tile
    pid_n: the K loop and epilogue shared by the aligned and the scan kernels, so that a row's
    arithmetic does not depend on how its rows were found.

    QUANT_OUT: the epilogue stores act_quant of the output instead (fp8 rows into c, the row's scale
    into c_s[:, pid_n]: BLOCK_N == SCALE_BLOCK), of exactly what act_quant would read: the output
    rounded to the dtype it would be stored in (OUT_ROUND: 1 bf16, 2 fp16, 0 fp32), masked columns 0."""
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
    c_rows = tok.to(tl.int64)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :]
    c_mask = tok_mask[:, None] & mask_n[None, :]
    if QUANT_OUT:
        tl.static_assert(BLOCK_N == SCALE_BLOCK, "QUANT_OUT: one column tile per 1x128 scale block")
        if OUT_ROUND == 1:
            out = out.to(tl.bfloat16).to(tl.float32)
        if OUT_ROUND == 2:
            out = out.to(tl.float16).to(tl.float32)
        q, s = quantize_rows(tl.where(mask_n[None, :], out, 0.0), SCALE_RECIPROCAL)
        tl.store(c_ptrs, q.to(c_ptr.dtype.element_ty), mask=c_mask)  # exact: q is on the e4m3 grid
        tl.store(c_s_ptr + c_rows * stride_csm + pid_n, s, mask=tok_mask)
    else:
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


@waits_for_producer
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, c_s_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    N_OUT, K, NUM_VALID, TOPK, UP_OFFSET,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, stride_csm,
    W_FP8: tl.constexpr, A_FP8: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT_A: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr, QUANT_OUT: tl.constexpr, OUT_ROUND: tl.constexpr,
):
    """A_FP8: fp8 x fp8 dots with a's 1x128 scales; from a_s_ptr, or with QUANT_A from quantizing
    a's bf16/fp16 tiles here (BLOCK_K = 128, SCALE_RECIPROCAL as in fp8_quant.quantize_rows)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    tok = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # assignment ids
    _expert_rows_tile(a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, c_s_ptr, topk_w_ptr, expert, tok, tok < NUM_VALID,
                      pid_n, N_OUT, K, TOPK, UP_OFFSET,
                      stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, stride_csm,
                      W_FP8, A_FP8, SWIGLU, MUL_WEIGHT, UPCAST, SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K,
                      QUANT_A, SCALE_RECIPROCAL, QUANT_OUT, OUT_ROUND)


@triton.jit
def _scan_chunk(ids_ptr, c0, NUM_VALID, expert, CHUNK: tl.constexpr):
    """Assignment ids c0 + [0, CHUNK) and each one's rank among expert's ids of the chunk (-1: not expert's)."""
    offs = c0 + tl.arange(0, CHUNK)
    match = (tl.load(ids_ptr + offs, mask=offs < NUM_VALID, other=-1) == expert).to(tl.int32)  # [CHUNK]
    return offs, tl.where(match != 0, tl.cumsum(match, axis=0) - 1, -1)


@waits_for_producer
@triton.jit
def _grouped_gemm_scan_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, c_s_ptr, topk_w_ptr, ids_ptr,
    N_OUT, K, NUM_VALID, TOPK, UP_OFFSET, N_EXPERTS,
    stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, stride_csm,
    W_FP8: tl.constexpr, A_FP8: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    QUANT_A: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr, QUANT_OUT: tl.constexpr, OUT_ROUND: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Program (row block b, column tile): block b of moe_align's layout (experts in order, each
    expert's assignments in order, BLOCK_M per block), found from the flat topk_ids here: a
    histogram of the ids gives each expert's blocks, b's expert and its first row r0; a second
    pass picks that expert's rows r0..r0+BLOCK_M-1. The ids are read CHUNK at a time (the
    [CHUNK, BLOCK_E] and [BLOCK_M, CHUNK] one-hots stay small); blocks past the last exit."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
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
    _expert_rows_tile(a_ptr, a_s_ptr, w_ptr, w_s_ptr, c_ptr, c_s_ptr, topk_w_ptr, expert.to(tl.int64), tok,
                      tok_mask, pid_n, N_OUT, K, TOPK, UP_OFFSET,
                      stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, stride_csm,
                      W_FP8, A_FP8, SWIGLU, MUL_WEIGHT, UPCAST, SCALE_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K,
                      QUANT_A, SCALE_RECIPROCAL, QUANT_OUT, OUT_ROUND)


_TUNE_KEY = ["N_OUT", "K", "BLOCK_M", "W_FP8", "A_FP8", "SWIGLU", "QUANT_A", "QUANT_OUT"]
_grouped_gemm_tuned = autotune_or_single(_grouped_gemm_kernel, GROUPED_GEMM_CONFIGS, key=_TUNE_KEY)
_grouped_gemm_qout_tuned = autotune_or_single(_grouped_gemm_kernel, QUANT_OUT_CONFIGS, key=_TUNE_KEY)


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


def _outputs(fn: str, rows: int, n_out: int, out_dtype: torch.dtype, device: torch.device, quant_out: bool,
             config: triton.Config | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A launcher's out (and, with quant_out, the scales)."""
    if not quant_out:
        return torch.empty((rows, n_out), dtype=out_dtype, device=device), None
    if config is not None and config.kwargs.get("BLOCK_N") != QUANT_BLOCK:
        raise ValueError(f"{fn}: quant_out needs BLOCK_N={QUANT_BLOCK} (one scale block per column tile), "
                         f"got config {config}")
    return act_quant_outputs(rows, n_out, device)


def _epilogue(out: torch.Tensor, out_scale: torch.Tensor | None, round_dtype: torch.dtype):
    """The output's part of a launch -> (scale pointer, its row stride, constexprs): plain stores into
    out, or (out_scale given) act_quant of the output rounded to round_dtype, fp8 rows into out and
    scales into out_scale."""
    if out_scale is None:
        return out, 0, dict(QUANT_OUT=False, OUT_ROUND=0)  # out: never read or written as scales
    return out_scale, out_scale.stride(0), dict(QUANT_OUT=True, OUT_ROUND=OUT_ROUND[round_dtype])


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                 num_tokens_post_pad: torch.Tensor, topk: int, *, a_scale: torch.Tensor | None = None,
                 w_scale: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                 fuse_swiglu: bool = False, out_dtype: torch.dtype | None = None,
                 quant_a: bool = False, scale_reciprocal: bool | None = None, quant_out: bool = False,
                 config: triton.Config | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """a [T, K] (row of assignment i is i // topk), w [E, N, K] -> [T*topk, N] (or N/2 with fuse_swiglu).

    Precisions: a and w bf16/fp16 (same dtype); w fp8 + w_scale with fp8 a + a_scale (W8A8);
    w fp8 + w_scale with bf16/fp16 a and no a_scale: weight-only W8A16, or with quant_a W8A8
    with a quantized 1x128 in the kernel, bit for bit fp8_quant.act_quant(a, scale_reciprocal=
    scale_reciprocal) (default: as on a's device) followed by this GEMM.
    quant_out: -> (q fp8 [T*topk, N'], s fp32 [T*topk, ceil(N'/128)]), bit for bit act_quant(the
    out_dtype output, scale_reciprocal=scale_reciprocal): the epilogue quantizes (one launch fewer;
    column tiles of 128, QUANT_OUT_CONFIGS).
    """
    n_out, out_dtype = check_operands("grouped_gemm", a, w, topk, a_scale, w_scale, topk_weights, fuse_swiglu,
                                      out_dtype, quant_a)
    check_alignment(sorted_token_ids, expert_ids, num_tokens_post_pad, a.device)
    out, out_scale = _outputs("grouped_gemm", a.shape[0] * topk, n_out, out_dtype, a.device, quant_out, config)
    result = (out, out_scale) if quant_out else out
    if out.numel() == 0:
        return result
    reciprocal = a.is_cuda if scale_reciprocal is None else scale_reciprocal
    launch(*grouped_gemm_spec(a, a_scale, w, w_scale, out, topk_weights, sorted_token_ids, expert_ids,
                              num_tokens_post_pad, topk, fuse_swiglu, quant_a, reciprocal, out_scale, out_dtype),
           config)
    return result


def grouped_gemm_spec(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
                      out: torch.Tensor, topk_weights: torch.Tensor | None, sorted_token_ids: torch.Tensor,
                      expert_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor, topk: int, fuse_swiglu: bool,
                      quant_a: bool, scale_reciprocal: bool, out_scale: torch.Tensor | None = None,
                      round_dtype: torch.dtype = torch.bfloat16) -> LaunchSpec:
    """grouped_gemm's launch into out [T*topk, N or N/2] (inputs checked by the caller); block_m is
    inferred from moe_align's sizes, the grid's rows bounded by row_blocks (symbolic when traced).
    out_scale (fp8_quant.act_quant_outputs): out is fp8, the output rounded to round_dtype is quantized 1x128."""
    t, k = a.shape
    n_out = out.shape[1]
    a_fp8, w_fp8 = a_scale is not None, w_scale is not None
    dummy = out  # never read: the constexpr flags compile its loads away
    c_s, stride_csm, quant = _epilogue(out, out_scale, round_dtype)
    args = (a, a_scale if a_fp8 else dummy, w, w_scale if w_fp8 else dummy, out, c_s,
            topk_weights if topk_weights is not None else dummy,
            sorted_token_ids, expert_ids, num_tokens_post_pad,
            n_out, k, t * topk, topk, n_out if fuse_swiglu else 0,
            a.stride(0), a_scale.stride(0) if a_fp8 else 0, w.stride(0), w.stride(1),
            w_scale.stride(0) if w_fp8 else 0, w_scale.stride(1) if w_fp8 else 0, out.stride(0), stride_csm)
    fp8_dot = a_fp8 or quant_a
    kwargs = dict(W_FP8=w_fp8, A_FP8=fp8_dot, SWIGLU=fuse_swiglu, MUL_WEIGHT=topk_weights is not None,
                  UPCAST=is_interpreted(_grouped_gemm_kernel) and not fp8_dot, SCALE_BLOCK=QUANT_BLOCK,
                  BLOCK_M=sorted_token_ids.shape[0] // expert_ids.shape[0],
                  BLOCK_K=QUANT_BLOCK if w_fp8 else DENSE_BLOCK_K, QUANT_A=quant_a, SCALE_RECIPROCAL=scale_reciprocal,
                  **quant)
    rows = row_blocks(expert_ids.shape[0], t * topk)  # symbolic Min while traced: no guard on T
    grid = lambda meta: (rows, cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    if quant["QUANT_OUT"]:
        return LaunchSpec(_grouped_gemm_kernel, _grouped_gemm_qout_tuned, QUANT_OUT_CONFIGS, grid, args, kwargs)
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
                                              key=_TUNE_KEY + ["CHUNK"])
_grouped_gemm_scan_qout_tuned = autotune_or_single(_grouped_gemm_scan_kernel, QUANT_OUT_CONFIGS,
                                                   key=_TUNE_KEY + ["CHUNK"])


def grouped_gemm_scan(a: torch.Tensor, w: torch.Tensor, topk_ids: torch.Tensor, topk: int, *,
                      a_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                      topk_weights: torch.Tensor | None = None, fuse_swiglu: bool = False,
                      out_dtype: torch.dtype | None = None, quant_a: bool = False,
                      scale_reciprocal: bool | None = None, block_m: int = SCAN_BLOCK_M, chunk: int = SCAN_CHUNK,
                      quant_out: bool = False, config: triton.Config | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """grouped_gemm without moe_align: the same operands, precisions and epilogues (quant_out too),
    with topk_ids [T, k'] (any int dtype; k' * T == T_a * topk assignments: the up GEMM's [T, k] ids
    with topk=k, the down GEMM's the same ids with topk=1) instead of the alignment.

    Why: at decode the alignment is a single-program launch (~4.4 us per MoE layer on the H200)
    in front of GEMMs of ~13 us each. Here program (row block b, column tile) reads the flat ids
    itself (chunk ids at a time, twice: a histogram, then its rows) and finds block b of
    moe_align's layout: the same row groups, the same K loop and epilogue, so the results equal
    grouped_gemm's bit for bit under the same config, and the same grid (row_blocks). Correct for
    any T*k; meant for decode: every program reads all T*k ids twice. Ids outside [0, E) match no
    expert: their rows are not written.
    """
    n_out, out_dtype = check_operands("grouped_gemm_scan", a, w, topk, a_scale, w_scale, topk_weights,
                                      fuse_swiglu, out_dtype, quant_a)
    check_scan_routing(a, topk_ids, topk, block_m, chunk)
    out, out_scale = _outputs("grouped_gemm_scan", a.shape[0] * topk, n_out, out_dtype, a.device, quant_out, config)
    result = (out, out_scale) if quant_out else out
    if out.numel() == 0:
        return result
    reciprocal = a.is_cuda if scale_reciprocal is None else scale_reciprocal
    launch(*grouped_gemm_scan_spec(a, a_scale, w, w_scale, out, topk_weights, topk_ids.contiguous(), topk,
                                   fuse_swiglu, quant_a, reciprocal, block_m, chunk, out_scale, out_dtype), config)
    return result


def grouped_gemm_scan_spec(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor,
                           w_scale: torch.Tensor | None, out: torch.Tensor, topk_weights: torch.Tensor | None,
                           topk_ids: torch.Tensor, topk: int, fuse_swiglu: bool, quant_a: bool,
                           scale_reciprocal: bool, block_m: int = SCAN_BLOCK_M, chunk: int = SCAN_CHUNK,
                           out_scale: torch.Tensor | None = None,
                           round_dtype: torch.dtype = torch.bfloat16) -> LaunchSpec:
    """grouped_gemm_scan's launch into out [T*topk, N or N/2] (inputs checked by the caller; topk_ids
    contiguous): grouped_gemm's grid, row_blocks(moe_align's n_blocks, T*k) x column tiles; out_scale
    as in grouped_gemm_spec."""
    t, k = a.shape
    n_out = out.shape[1]
    a_fp8, w_fp8 = a_scale is not None, w_scale is not None
    dummy = out  # never read: the constexpr flags compile its loads away
    c_s, stride_csm, quant = _epilogue(out, out_scale, round_dtype)
    args = (a, a_scale if a_fp8 else dummy, w, w_scale if w_fp8 else dummy, out, c_s,
            topk_weights if topk_weights is not None else dummy, topk_ids,
            n_out, k, t * topk, topk, n_out if fuse_swiglu else 0, w.shape[0],
            a.stride(0), a_scale.stride(0) if a_fp8 else 0, w.stride(0), w.stride(1),
            w_scale.stride(0) if w_fp8 else 0, w_scale.stride(1) if w_fp8 else 0, out.stride(0), stride_csm)
    fp8_dot = a_fp8 or quant_a
    kwargs = dict(W_FP8=w_fp8, A_FP8=fp8_dot, SWIGLU=fuse_swiglu, MUL_WEIGHT=topk_weights is not None,
                  UPCAST=is_interpreted(_grouped_gemm_scan_kernel) and not fp8_dot, SCALE_BLOCK=QUANT_BLOCK,
                  BLOCK_M=block_m, BLOCK_K=QUANT_BLOCK if w_fp8 else DENSE_BLOCK_K, QUANT_A=quant_a,
                  SCALE_RECIPROCAL=scale_reciprocal, **quant, CHUNK=chunk, BLOCK_E=next_pow2(w.shape[0]))
    n_experts = w.shape[0]
    n_blocks = cdiv(t * topk + n_experts * (block_m - 1), block_m)  # moe_align's worst case
    rows = row_blocks(n_blocks, t * topk)  # symbolic Min while traced: no guard on T
    grid = lambda meta: (rows, cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    if quant["QUANT_OUT"]:
        return LaunchSpec(_grouped_gemm_scan_kernel, _grouped_gemm_scan_qout_tuned, QUANT_OUT_CONFIGS, grid, args,
                          kwargs)
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
