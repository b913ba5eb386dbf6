"""Split-KV flash-decoding of absorbed MLA over the latent cache: one query per batch row -> [B, H, C].

The shared picture (layouts, the absorbed-MLA math, which keys a row sees, dtypes) is in
kernels/mla_attention.py, which also holds the input checks and mla_decode_ref.

Decode (flash-decoding): because all heads share the cache row, one program holds a block of
BLOCK_H heads and reads each KV tile once. The sequence of batch row b is cut into NUM_SPLITS
chunks of ceil(len_b / NUM_SPLITS) tokens (rounded to BLOCK_N) computed from the device-side
cache_seqlens, so ragged batches need no host sync; each program runs an online softmax (base 2)
over its chunk and writes a normalized partial output and its log2-sum-exp; a second kernel merges
the splits (merge="separate"). Empty chunks write lse = -inf, weight 0. merge="fused" merges in the
same launch: each program counts its finished split on an int32 counter per (row, head block)
(bar.sync, then one thread's acq_rel atomic add); the program that completes the count merges all
splits' partials (still in L2, read with ld.global.cg) into the output and resets the counter to 0,
so the counters stay valid across launches and CUDA-graph replays with no memset. With one split,
the fused form writes the output directly. Eager calls share a cached counter buffer per device;
traced calls (torch.export / AOTInductor, where the op is functional) allocate zeroed counters.
A traced decode program cannot pick NUM_SPLITS on the host (the batch and cache length are
symbolic), and a fixed count leaves B=1 with 8 programs on 132 SMs. runtime_splits=True launches
MAX_SPLITS split programs per (row, head block) and both kernels compute the count a row uses from
the grid's batch (tl.num_programs) and the row's cache length (RUNTIME_MIN_SPLITS' comment): the
surplus programs return before touching memory, so no shape or argument holds a min/max of the
batch. Its chunks are cdiv(len, splits) keys, not rounded to BLOCK_N, so the reduce kernel (which
has no BLOCK_N) recomputes the same count and merges only the partials that were written.
The decode tiles put the keys, not the heads, on the dots' M dimension ("swap AB", as decode
kernels do when the query block is small): scores^T = kv [BN, C] . q^T [C, BLOCK_H] and
out^T += kv^T [C, BN] . p^T [BN, BLOCK_H]. On sm_90 the value dot (M = C = 512) and, for
BLOCK_N >= 64, the score dot become wgmma reading the KV tile straight from the shared-memory
buffer the cp.async pipeline filled, q^T stays in shared memory instead of being replicated in
every warp's registers, and the fp32 accumulator [C, BLOCK_H] is spread over the warpgroup (64
registers per thread at 4 warps). The heads-as-M form (M = 16) ran everything as mma.sync with q
held in registers (164 registers/thread at 4 warps).
Variants (session 8, kernels/mla_variants.py; none is the default: benchmarks/kernels.py mla_sweep,
H200: "tma" 59.0 us at B=32 ctx 4096 like the default's 59.0 (62% of copy); "early" 13.8 vs 14.1 us at
B=1 ctx 1024 and 26.9 vs 28.7 at B=8 ctx 4096, eager-only for now). Sessions 4-5 left B=32 at context
4096 at 0.059 ms (61% of copy) with BN=32 w4 s3 at 8 splits, where bytes in flight are not short (two
programs per SM, two 36.9 KB tiles ahead each): what is left is per-tile issue work and the serial chain
of each tile. "tma" moves the tile loads to the TMA unit (device-side descriptors over the row's
[seqlen, C] keys, zero-filled past them): no per-thread address arithmetic, masks or cp.async issue in
the loop. At B=1 (16 programs of one or two tiles) the time is latency: "early" issues q and the new
token before the program waits for its cache length (which the runtime rule's row check does) and scores
the new token from q in registers, where the default reloads q after the loop (and, on sm_90, uses fewer
registers: 134 against 173 at BN=32 with the new token, 168 against 255 at BN=64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import COUNTER_BUFFER_MIN, _arrival_buffers, arrival_counters  # noqa: F401
from dsv3_export.kernels._common import (autotune_or_single, cdiv, check_tensor, is_interpreted, launch, next_pow2,
                                         traceable, tracing)
from dsv3_export.kernels.fp8_gemm_persistent import _ensure_allocator
from dsv3_export.kernels.mla_attention import LOG2E, _check_caches, _check_new
from dsv3_export.kernels.mla_splits import (DECODE_PROGRAMS_PER_SM, MAX_BLOCK_H, MAX_SPLITS,  # noqa: F401
                                           MIN_BLOCK_H, MIN_SPLIT_KEYS, RUNTIME_MIN_SPLITS,
                                           SPLIT_OVERHEAD_KEYS, _batch_splits, _block_h, _row_splits,
                                           choose_num_splits, runtime_num_splits, runtime_split_target)
from dsv3_export.kernels.mla_variants import DECODE_VARIANTS, TMA_DECODE_CONFIGS, VARIANT_FLAGS, tma_unsupported
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

# How decode merges its splits: "separate" (a second kernel reads the fp32 partials) or "fused" (the
# last split program of each (row, head block) to finish merges them, found with a self-cleaning
# atomic counter: one launch, and the partials are read back while still in L2). `merge=` per call
# overrides this default; the benchmark (benchmarks/kernels.py, mla) times both.
MERGE_MODES = ("separate", "fused")
DECODE_MERGE = "separate"
# The fused merge loads [BLOCK_S, BLOCK_H, MERGE_C] fp32 tiles of partials: MERGE_ELEMS elements (32
# registers per thread at 4 warps, plus their 64-bit addresses), at least MIN_MERGE_C columns
# (merge_cols). sm_90, BN=32 w4 s3 fused: 138 registers at 4096 (208 at 8192; the earlier one-split-
# at-a-time loop took 165 and chained NUM_SPLITS x C/64 dependent L2 round trips).
MERGE_ELEMS = 4096
MIN_MERGE_C = 8


def merge_cols(block_s: int, block_h: int, c: int) -> int:
    """Latent columns per step of the fused merge (a power of 2)."""
    return max(MIN_MERGE_C, min(next_pow2(c), MERGE_ELEMS // (block_s * block_h)))

# Decode is a stream over the cache: what matters is how many cache bytes each SM keeps in flight.
# A [BN, 512 + 64] bf16 tile is BN x 1152 B (36.9 KB at BN = 32). With the mma.sync score dot
# (BN < 64) the pipeline keeps num_stages - 1 tile buffers and, from 3 stages on, the next tiles
# load while the current one is computed; the wgmma score dot (BN = 64) needs one buffer more, so
# only 2 stages fit in 227 KB and its loads do not overlap its compute (one 73.7 KB tile per SM at
# a time). PREFETCH = d > 0 also asks L2 for the tile d tiles ahead (prefetch.global.L2, no
# registers or shared memory): up to d tiles in flight per program however few buffers fit. It
# only adds to the pipeline when d exceeds its own lookahead (num_stages - 1 tiles for BN < 64);
# resident prefetched bytes stay <= 29 MB of the 50 MB L2 (256 x 3 x 36.9 KB for BN=32 s3 at 2
# programs per SM; 132 x 4 x 36.9 KB and 132 x 2 x 73.7 KB = 19 MB for the 1-per-SM tiles).
# Shared memory / registers per thread (4 warps | 8 warps) at H = 16, sm_90:
#   BN=32 s3: 93 KB (2 per SM), 128 | 97 regs    BN=32 s4: 130 KB (1 per SM), 128 | 97
#   BN=16 s5: 93 KB (2 per SM), 128 | 97 regs    BN=64 s2 d=1: 168 KB (1 per SM), 222
# (the kv_new variant needs up to 53 more in its epilogue; BN=64 with kv_new: 255, 20 B spill). The autotuner
# times them all. PREFETCH sits in every config: the sm_90 compile test passes config kwargs as constexprs.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=8, num_stages=5),
    # More programs per SM to hide each tile's latency chain (score dot, cross-warp max/sum, value
    # wgmma): registers capped so that 65536 / (cap x 128 threads) programs fit, shared memory too.
    # 4 per SM: 56 KB, 128 registers (pairs with 16 splits at B=32: 512 programs = one wave of 4 x 132);
    # 3 per SM: 56 / 74 KB, 168 registers (12 splits: 384 programs = one wave of 3 x 132). No spills
    # (kv_new at 128: 144 B). choose_num_splits still sizes for 2 per SM: the benchmark's split sweep
    # times every (splits, config) pair.
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=4, num_stages=3, maxnreg=128),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=2, maxnreg=168),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=4, num_stages=4, maxnreg=168),
    triton.Config({"BLOCK_N": 64, "PREFETCH": 1}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "PREFETCH": 2}, num_warps=4, num_stages=2),
]
# The fused merge's autotune set: the 2-4 per SM configs (BN=64 and the 130 KB ones run 1 per SM, and BN=64
# takes 255 registers with the merge epilogue); each config costs ~1 s of compile per specialization.
_FUSED_KEEP = {(32, 0, 4, 3, None), (32, 3, 4, 3, None), (32, 0, 8, 3, None), (16, 0, 4, 5, None),
               (16, 0, 4, 3, 128), (32, 0, 4, 2, 168), (16, 0, 4, 4, 168)}
FUSED_DECODE_CONFIGS = [c for c in DECODE_CONFIGS if (c.kwargs["BLOCK_N"], c.kwargs["PREFETCH"], c.num_warps,
                                                       c.num_stages, c.maxnreg) in _FUSED_KEEP]

# The kernel variant a call runs unless it names one (variant=...; kernels/mla_variants.py says what each
# changes). The benchmark's mla_sweep times the others against it; none replaces it before it is measured.
DECODE_VARIANT = "pointer"


@waits_for_producer
@triton.jit
def _mla_decode_split_kernel(
    q_ptr, q_pe_ptr, kv_ptr, pe_ptr, kvn_ptr, pen_ptr, seqlens_ptr, o_part_ptr, lse_ptr, out_ptr, cnt_ptr,
    H, NUM_SPLITS, scale_log2,
    stride_qb, stride_qh, stride_qpb, stride_qph, stride_kvb, stride_kvs, stride_peb, stride_pes,
    stride_kvnb, stride_penb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_NEW: tl.constexpr, UPCAST: tl.constexpr,  # UPCAST: interpreted (fp32 operands, no inline PTX)
    FUSED: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_C: tl.constexpr,  # FUSED: merge here (out_ptr, cnt_ptr)
    SPLIT_TARGET: tl.constexpr, MIN_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr,  # > 0: the runtime split rule
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
    TMA: tl.constexpr = False,  # KV tiles through device-side tensor descriptors (variant="tma")
    EARLY: tl.constexpr = False,  # q and the new token loaded before the seqlen wait (variant "*early")
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    scale_log2 = tl.cast(scale_log2, tl.float32)  # Inductor passes Python floats as fp64 scalars
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h, mask_c, mask_r = offs_h < H, offs_c < C, offs_r < R
    b = pid_b.to(tl.int64)
    if SPLIT_TARGET > 0:  # runtime rule: NUM_SPLITS is the grid's split axis, the most a row may use
        splits = _batch_splits(tl.num_programs(0) * tl.num_programs(1), NUM_SPLITS, SPLIT_TARGET, MIN_SPLITS)
        if pid_s >= splits:  # from the grid alone, before any memory access (most programs at B=32)
            return
        seqlen = tl.load(seqlens_ptr + pid_b)  # cached keys of this row
        if EARLY:  # issued before the row check below waits for seqlen
            q, q_pe = _query_tiles(q_ptr, q_pe_ptr, b, offs_h, offs_c, offs_r, mask_h, mask_c, mask_r,
                                   stride_qb, stride_qh, stride_qpb, stride_qph)
            if HAS_NEW:  # every program loads the new token (1 KB, an L2 hit); the last split uses it
                kv_new = tl.load(kvn_ptr + b * stride_kvnb + offs_c, mask=mask_c, other=0.0)
                pe_new = tl.load(pen_ptr + b * stride_penb + offs_r, mask=mask_r, other=0.0)
        splits = _row_splits(splits, seqlen, MIN_KEYS)
        if pid_s >= splits:
            return
        chunk = tl.cdiv(seqlen, splits)  # not rounded to BLOCK_N (the reduce kernel recomputes `splits`)
    else:
        splits = NUM_SPLITS
        seqlen = tl.load(seqlens_ptr + pid_b)  # cached keys of this row
        if EARLY:
            q, q_pe = _query_tiles(q_ptr, q_pe_ptr, b, offs_h, offs_c, offs_r, mask_h, mask_c, mask_r,
                                   stride_qb, stride_qh, stride_qpb, stride_qph)
            if HAS_NEW:
                kv_new = tl.load(kvn_ptr + b * stride_kvnb + offs_c, mask=mask_c, other=0.0)
                pe_new = tl.load(pen_ptr + b * stride_penb + offs_r, mask=mask_r, other=0.0)
        chunk = tl.cdiv(tl.cdiv(seqlen, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seqlen)

    if not EARLY:
        q, q_pe = _query_tiles(q_ptr, q_pe_ptr, b, offs_h, offs_c, offs_r, mask_h, mask_c, mask_r,
                               stride_qb, stride_qh, stride_qpb, stride_qph)
    if UPCAST:
        q = q.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    if EARLY:
        if HAS_NEW:  # the new token's scores [BLOCK_H] now, from q in registers: no reload of q after the loop
            s_new = (tl.sum(q.to(tl.float32) * kv_new.to(tl.float32)[None, :], axis=1)
                     + tl.sum(q_pe.to(tl.float32) * pe_new.to(tl.float32)[None, :], axis=1)) * scale_log2
    q_t = tl.trans(q)  # [BLOCK_C, BLOCK_H]
    q_pe_t = tl.trans(q_pe)  # [BLOCK_R, BLOCK_H]

    # Keys on the dots' M dimension (scores transposed, [BLOCK_N, BLOCK_H]): see the module docstring.
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)  # out^T
    kv_base = kv_ptr + b * stride_kvb
    pe_base = pe_ptr + b * stride_peb
    if TMA:  # the row's keys as a [seqlen, C] tensor: the TMA unit zero-fills rows >= seqlen, columns >= C
        rows_b = tl.maximum(seqlen, 1)  # an empty row issues no load; its descriptor still needs a dimension
        kv_desc = tl.make_tensor_descriptor(kv_base, shape=[rows_b, C], strides=[stride_kvs, 1],
                                            block_shape=[BLOCK_N, BLOCK_C])
        pe_desc = tl.make_tensor_descriptor(pe_base, shape=[rows_b, R], strides=[stride_pes, 1],
                                            block_shape=[BLOCK_N, BLOCK_R])
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_cache = offs_n < end
        if PREFETCH > 0:
            if not UPCAST:  # PTX; the interpreter (UPCAST) has none
                # L2 prefetch of the tile PREFETCH tiles ahead (clamped to this chunk): more bytes in
                # flight per SM than the shared-memory pipeline holds. A kv row is 8 x 128 B lines.
                rows = tl.minimum(offs_n + PREFETCH * BLOCK_N, end - 1)
                rows = rows.to(tl.int64)
                lines = kv_base + rows[:, None] * stride_kvs + (tl.arange(0, 8) * (C // 8))[None, :]
                pe_lines = pe_base + rows * stride_pes
                tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [lines.to(tl.int64)],
                                          dtype=tl.int32, is_pure=False, pack=1)
                tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [pe_lines.to(tl.int64)],
                                          dtype=tl.int32, is_pure=False, pack=1)
        if TMA:  # rows in [end, seqlen) are the next split's keys (finite; their scores are masked below)
            kv = kv_desc.load([n0, 0])  # [BN, BLOCK_C]
            pe = pe_desc.load([n0, 0])  # [BN, BLOCK_R]
        else:
            offs_n64 = offs_n.to(tl.int64)
            kv = tl.load(kv_base + offs_n64[:, None] * stride_kvs + offs_c[None, :],
                         mask=in_cache[:, None] & mask_c[None, :], other=0.0)  # [BN, C]
            pe = tl.load(pe_base + offs_n64[:, None] * stride_pes + offs_r[None, :],
                         mask=in_cache[:, None] & mask_r[None, :], other=0.0)  # [BN, R]
        if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong
            kv = kv.to(tl.float32)
            pe = pe.to(tl.float32)
        s = tl.dot(kv, q_t) + tl.dot(pe, q_pe_t)  # [BN, BLOCK_H] fp32
        s = tl.where(in_cache[:, None], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: every tile has a key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(kv), p.to(kv.dtype))  # [C, BN] x [BN, BLOCK_H]
        m_i = m_new

    if HAS_NEW:
        if pid_s == splits - 1:  # the new token (key number `seqlen`) joins the last split
            if EARLY:
                kv_new32 = kv_new.to(tl.float32)  # loaded before the loop, s_new computed there
            else:
                kv_new32 = tl.load(kvn_ptr + b * stride_kvnb + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                pe_new32 = tl.load(pen_ptr + b * stride_penb + offs_r, mask=mask_r, other=0.0).to(tl.float32)
                # q again (an L2 hit), [C, BLOCK_H]: keeping the loop's copy live would cost registers in the loop
                q_c = tl.load(q_ptr + b * stride_qb + offs_h[None, :] * stride_qh + offs_c[:, None],
                              mask=mask_h[None, :] & mask_c[:, None], other=0.0).to(tl.float32)
                q_r = tl.load(q_pe_ptr + b * stride_qpb + offs_h[None, :] * stride_qph + offs_r[:, None],
                              mask=mask_h[None, :] & mask_r[:, None], other=0.0).to(tl.float32)
                s_new = (tl.sum(q_c * kv_new32[:, None], axis=0) + tl.sum(q_r * pe_new32[:, None], axis=0)) * scale_log2
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[None, :] + kv_new32[:, None] * p[None, :]
            m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[None, :]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    o_ptrs = o_part_ptr + b * stride_ob + offs_h[None, :] * stride_oh + pid_s * stride_os + offs_c[:, None]
    if FUSED:
        if splits == 1:  # the output, no partials (static when Triton specializes NUM_SPLITS = 1)
            tl.store(out_ptr + b * stride_outb + offs_h[None, :] * stride_outh + offs_c[:, None],
                     out.to(out_ptr.dtype.element_ty), mask=mask_h[None, :] & mask_c[:, None])
        else:
            tl.store(o_ptrs, out, mask=mask_h[None, :] & mask_c[:, None])
            tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + pid_s, lse, mask=mask_h)
            # Count this split; the program that completes the count is the last split of this
            # (row, head block) to finish and merges them all. bar.sync orders every thread's partial
            # stores before the one thread's acq_rel atomic (release); the second spreads its acquire
            # to the merging threads.
            tl.debug_barrier()
            cnt = cnt_ptr + pid_b * tl.num_programs(1) + pid_h
            done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if done == splits - 1:
                tl.debug_barrier()
                _merge_splits(o_part_ptr, lse_ptr, out_ptr, b, offs_h, mask_h, splits,
                              stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                              C, BLOCK_H, BLOCK_S, MERGE_C)
                # Self-cleaning: every split of this group has counted, so the counter is zero again for
                # the next launch or CUDA-graph replay, without a memset.
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(o_ptrs, out, mask=mask_h[None, :] & mask_c[:, None])
        tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + pid_s, lse, mask=mask_h)


@triton.jit
def _query_tiles(q_ptr, q_pe_ptr, b, offs_h, offs_c, offs_r, mask_h, mask_c, mask_r,
                 stride_qb, stride_qh, stride_qpb, stride_qph):
    """This row's query block: q [BLOCK_H, BLOCK_C] and q_pe [BLOCK_H, BLOCK_R], zero past H, C, R."""
    q = tl.load(q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=mask_h[:, None] & mask_c[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + b * stride_qpb + offs_h[:, None] * stride_qph + offs_r[None, :],
                   mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    return q, q_pe


@triton.jit
def _merge_splits(o_part_ptr, lse_ptr, out_ptr, b, offs_h, mask_h, NUM_SPLITS,
                  stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                  C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_C: tl.constexpr):
    """out[b, heads] = sum_s w_s o_part[b, heads, s] with w_s = 2^lse_s / sum 2^lse (0 for empty splits).

    One program merges a (row, head block) while the others are done, so its loads must not be a
    chain of round trips: each step loads every split's [BLOCK_H, MERGE_C] slice at once (a
    [BLOCK_S, BLOCK_H, MERGE_C] tile, MERGE_C sized by the launcher to ~32 fp32 registers per thread)
    and sums over the splits. Loads bypass L1 (.cg): the partials come from other SMs.
    """
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + b * stride_lb + offs_h[None, :] * stride_lh + offs_s[:, None],
                  mask=mask_s[:, None] & mask_h[None, :], other=float("-inf"), cache_modifier=".cg")  # [S, H]
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows with no key at all: weights 0, output 0
    w = tl.exp2(lse - m[None, :])  # [BLOCK_S, BLOCK_H]
    denom = tl.sum(w, axis=0)
    w = w / tl.where(denom > 0, denom, 1.0)[None, :]
    o_base = o_part_ptr + b * stride_ob + offs_s[:, None, None] * stride_os + offs_h[None, :, None] * stride_oh
    mask_sh = mask_s[:, None, None] & mask_h[None, :, None]  # [BLOCK_S, BLOCK_H, 1]
    out_base = out_ptr + b * stride_outb + offs_h[:, None] * stride_outh
    for c0 in tl.static_range(0, C, MERGE_C):
        offs_c = c0 + tl.arange(0, MERGE_C)
        o = tl.load(o_base + offs_c[None, None, :], mask=mask_sh & (offs_c < C)[None, None, :], other=0.0,
                    cache_modifier=".cg")  # [BLOCK_S, BLOCK_H, MERGE_C]
        acc = tl.sum(o * w[:, :, None], axis=0)  # [BLOCK_H, MERGE_C]
        tl.store(out_base + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_h[:, None] & (offs_c < C)[None, :])


@waits_for_producer
@triton.jit
def _mla_decode_reduce_kernel(
    o_part_ptr, lse_ptr, out_ptr, seqlens_ptr, NUM_SPLITS, HEAD_BLOCKS,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_TARGET: tl.constexpr, MIN_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    splits = NUM_SPLITS
    if SPLIT_TARGET > 0:  # the split kernel's runtime rule: only the row's first `splits` partials were written
        splits = _batch_splits(tl.num_programs(0) * HEAD_BLOCKS, NUM_SPLITS, SPLIT_TARGET, MIN_SPLITS)
        splits = _row_splits(splits, tl.load(seqlens_ptr + pid_b), MIN_KEYS)
    b = pid_b.to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    mask_s, mask_c = offs_s < splits, offs_c < C
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [BLOCK_S], 0 for empty splits
    o = tl.load(o_part_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_c[None, :],
                mask=mask_s[:, None] & mask_c[None, :], other=0.0)
    denom = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + offs_c, out.to(out_ptr.dtype.element_ty), mask=mask_c)


_INTERPRETED = is_interpreted(_mla_decode_split_kernel)
_decode_tuned = autotune_or_single(_mla_decode_split_kernel, DECODE_CONFIGS,
                                   key=["H", "C", "R", "NUM_SPLITS", "SPLIT_TARGET"])
# The fused-merge form tunes on its own (a second autotuner, its own cache), so one process can time
# both forms; HAS_NEW is in its key (the epilogues differ).
_decode_fused_tuned = autotune_or_single(_mla_decode_split_kernel, FUSED_DECODE_CONFIGS,
                                         key=["H", "C", "R", "NUM_SPLITS", "HAS_NEW", "SPLIT_TARGET"])
# The TMA variant tunes on its own too, both merge forms in one key.
_decode_tma_tuned = autotune_or_single(_mla_decode_split_kernel, TMA_DECODE_CONFIGS,
                                       key=["H", "C", "R", "NUM_SPLITS", "HAS_NEW", "FUSED", "SPLIT_TARGET"])
# The config the autotuner chose, per (H, C, R, NUM_SPLITS, dtype, HAS_NEW, merge, SPLIT_TARGET, variant);
# later eager calls launch the kernel with it directly. Autotuner.run re-keys all ~40 arguments on every call (list
# lookups, str(dtype)): host time each decode step pays before its kernels are queued.
_decode_chosen: dict[tuple, triton.Config] = {}


def decode_config(heads: int, c: int, r: int, splits: int, dtype: torch.dtype, has_new: bool = False,
                  merge: str | None = None, split_target: int = 0, variant: str | None = None):
    """The split kernel's config for this shape once the autotuner has chosen it (None before).
    split_target: 0 for a host-chosen split count; runtime_splits calls: splits=MAX_SPLITS and
    split_target=runtime_split_target(device)."""
    return _decode_chosen.get((heads, c, r, splits, dtype, has_new, merge or DECODE_MERGE, split_target,
                               variant or DECODE_VARIANT))


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               cache_seqlens: torch.Tensor, softmax_scale: float, *, kv_new: torch.Tensor | None = None,
               pe_new: torch.Tensor | None = None, num_splits: int | None = None,
               config: triton.Config | None = None, merge: str | None = None,
               runtime_splits: bool = False, variant: str | None = None) -> torch.Tensor:
    """One query per batch row -> [B, H, C].

    q_latent [B, H, C], q_pe [B, H, R]; keys: cache positions t < cache_seqlens[b] (int32 [B]),
    then, when given, the row's new token kv_new [B, C] / pe_new [B, R] (not in the cache).
    num_splits: KV splits per row (default choose_num_splits). runtime_splits=True instead lets the
    kernels pick each row's splits from the launch's batch and the row's cache length
    (runtime_num_splits): nothing on the host depends on the batch or cache length, for programs
    traced with a symbolic batch.
    merge: "separate" or "fused" (MERGE_MODES; default DECODE_MERGE): how the splits are merged.
    variant: one of DECODE_VARIANTS (default DECODE_VARIANT; VARIANT_FLAGS says what each changes): the
    "tma" ones are eager-only (benchmarks) and need 16-byte aligned caches (tma_unsupported).
    Eager fused calls share one counter buffer per device: do not run two at once on different streams.
    """
    check_tensor("mla_decode: q_latent", q_latent, ndim=3)
    bsz, heads, _ = q_latent.shape
    c, r = _check_caches("mla_decode", q_latent, q_pe, kv_cache, pe_cache, bsz)
    check_tensor("mla_decode: cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=q_latent.device,
                 contiguous=True)
    if cache_seqlens.shape[0] != bsz:
        raise ValueError(f"mla_decode: cache_seqlens has {cache_seqlens.shape[0]} entries for batch {bsz}")
    has_new = _check_new("mla_decode", kv_new, pe_new, q_latent, (bsz, c), (bsz, r))
    merge = merge or DECODE_MERGE
    if merge not in MERGE_MODES:
        raise ValueError(f"mla_decode: merge={merge!r} must be one of {MERGE_MODES}")
    fused = merge == "fused"
    variant = variant or DECODE_VARIANT
    if variant not in DECODE_VARIANTS:
        raise ValueError(f"mla_decode: variant={variant!r} must be one of {DECODE_VARIANTS}")
    flags = VARIANT_FLAGS[variant]
    tma = flags.get("TMA", False)
    if tma:
        if tracing():  # its alignment check reads data_ptr(); AOTInductor's descriptor scratch is untested here
            raise NotImplementedError(f"mla_decode(variant={variant!r}) is eager-only (benchmarks) until TMA is "
                                      "tested inside torch.export / AOTInductor; trace variant='pointer'")
        reason = tma_unsupported(kv_cache, pe_cache)
        if reason:
            raise ValueError(f"mla_decode(variant={variant!r}): {reason}")
        if not _INTERPRETED:
            _ensure_allocator()  # global scratch for the device-side descriptors
    dev = q_latent.device
    out = torch.empty((bsz, heads, c), dtype=q_latent.dtype, device=dev)
    if out.numel() == 0:
        return out
    splits, split_target = split_plan("mla_decode", bsz, heads, kv_cache.shape[1], dev, runtime_splits, num_splits)
    block_h = _block_h(heads)
    head_blocks = cdiv(heads, block_h)
    o_part, lse = split_partials(bsz, heads, splits, c, dev)
    counters = _split_counters(bsz * head_blocks, dev) if fused else cache_seqlens  # never touched unless fused
    grid = (bsz, head_blocks, splits)
    if tma:
        tuned, configs = _decode_tma_tuned, TMA_DECODE_CONFIGS
    else:
        tuned, configs = (_decode_fused_tuned, FUSED_DECODE_CONFIGS) if fused else (_decode_tuned, DECODE_CONFIGS)
    if flags.get("EARLY"):
        tuned = None  # pinned: `config`, else the list's first
    rule = dict(SPLIT_TARGET=split_target, MIN_SPLITS=RUNTIME_MIN_SPLITS, MIN_KEYS=MIN_SPLIT_KEYS)
    tune_key = (heads, c, r, splits, q_latent.dtype, has_new, merge, split_target, variant)
    eager_tuned = config is None and tuned is not None and not tracing()  # tracing needs the autotuner
    cfg = _decode_chosen.get(tune_key) if eager_tuned else config
    args, kwargs = split_kernel_args(q_latent, q_pe, kv_cache, pe_cache, kv_new, pe_new, cache_seqlens, o_part, lse,
                                     out, counters, softmax_scale, split_target, fused=fused, variant=variant)
    launch(_mla_decode_split_kernel, tuned, configs, lambda meta: grid, args, kwargs, cfg)
    chosen = getattr(tuned, "best_config", None) if eager_tuned and cfg is None else None
    if chosen is not None:
        _decode_chosen[tune_key] = chosen
    if not fused:
        so, sl = (heads * splits * c, splits * c, c), (heads * splits, splits)  # o_part, lse: contiguous
        traceable(_mla_decode_reduce_kernel)[(bsz, heads)](
            o_part, lse, out, cache_seqlens, splits, head_blocks, *so, *sl, heads * c, c, C=c, BLOCK_C=next_pow2(c),
            BLOCK_S=next_pow2(splits), **rule)
    return out


def split_plan(op: str, bsz: int, heads: int, cache_len: int, device: torch.device, runtime_splits: bool,
               num_splits: int | None) -> tuple[int, int]:
    """(split programs per row, split_target) of a decode launch: MAX_SPLITS under the runtime rule
    (runtime_split_target), else num_splits or choose_num_splits; errors name `op`."""
    if runtime_splits and num_splits is not None:
        raise ValueError(f"{op}: num_splits={num_splits} with runtime_splits=True; pass one of them")
    split_target = runtime_split_target(device) if runtime_splits else 0
    splits = MAX_SPLITS if runtime_splits else num_splits or choose_num_splits(bsz, heads, cache_len, device)
    if not 1 <= splits <= 1024:
        raise ValueError(f"{op}: num_splits={splits} must be in [1, 1024]")
    return splits, split_target


def split_partials(bsz, heads, splits: int, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split kernel's outputs: o_part fp32 [B, H, S, C] and lse fp32 [B, H, S] (B may be symbolic)."""
    return (torch.empty((bsz, heads, splits, c), dtype=torch.float32, device=device),
            torch.empty((bsz, heads, splits), dtype=torch.float32, device=device))


def split_kernel_args(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                      kv_new: torch.Tensor | None, pe_new: torch.Tensor | None, cache_seqlens: torch.Tensor,
                      o_part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, counters: torch.Tensor,
                      softmax_scale: float, split_target: int, *, fused: bool = False,
                      variant: str = "pointer") -> tuple[tuple, dict]:
    """The split kernel's arguments and constexprs (less the config's) writing o_part [B, H, S, C] and
    lse [B, H, S], in one place so that a new kernel argument cannot be left out of a launch (a traced
    launch missing one makes torch assume every input mutated: VARIANT_FLAGS). out / counters are only
    touched by the fused merge."""
    bsz, heads, c = q_latent.shape
    r, splits = q_pe.shape[-1], o_part.shape[2]
    has_new = kv_new is not None
    kvn, pen = (kv_new, pe_new) if has_new else (kv_cache, pe_cache)  # never read without HAS_NEW
    # Strides: one stride() tuple per input; the fresh contiguous buffers' strides by arithmetic
    # (each Tensor.stride(i) call is host time on every decode step).
    sq, sqp, skv, spe = q_latent.stride(), q_pe.stride(), kv_cache.stride(), pe_cache.stride()
    so = (heads * splits * c, splits * c, c)  # o_part [B, H, splits, C]
    sl = (heads * splits, splits)  # lse [B, H, splits]
    args = (q_latent, q_pe, kv_cache, pe_cache, kvn, pen, cache_seqlens, o_part, lse, out, counters, heads, splits,
            softmax_scale * LOG2E, sq[0], sq[1], sqp[0], sqp[1], skv[0], skv[1], spe[0], spe[1],
            kvn.stride(0), pen.stride(0), *so, *sl, heads * c, c)
    block_h = _block_h(heads)
    kwargs = dict(C=c, R=r, BLOCK_C=next_pow2(c), BLOCK_R=next_pow2(r), HAS_NEW=has_new,
                  UPCAST=_INTERPRETED,  # fp32 .to(fp32) is a no-op; also skips PTX
                  FUSED=fused, BLOCK_S=next_pow2(splits), MERGE_C=merge_cols(next_pow2(splits), block_h, c),
                  SPLIT_TARGET=split_target, MIN_SPLITS=RUNTIME_MIN_SPLITS, MIN_KEYS=MIN_SPLIT_KEYS,
                  BLOCK_H=block_h, **VARIANT_FLAGS[variant])
    return args, kwargs


# The fused merge's per-device int32 counters, zero between launches (the kernel resets each one it
# completes): kernels/_common.py arrival_counters, the buffer the router's split gate kernel shares
# (one stream: its launches and these never overlap). Names kept for mla_attention's re-exports.
_counter_cache = _arrival_buffers
_split_counters = arrival_counters
