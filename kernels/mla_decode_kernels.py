"""mla_decode's Triton kernels: the split kernel and the reduce kernel that merges its splits.

kernels/mla_decode.py holds their configs and autotuner and launches them (mla_decode, split_kernel_args).

Decode (flash-decoding): because all heads share the cache row, one program holds a block of
BLOCK_H heads and reads each KV tile once. The sequence of batch row b is cut into NUM_SPLITS
chunks of ceil(len_b / NUM_SPLITS) tokens (rounded to BLOCK_N) computed from the device-side
cache_seqlens, so ragged batches need no host sync; each program runs an online softmax (base 2)
over its chunk and writes a normalized partial output and its log2-sum-exp; a second kernel merges
the splits. Empty chunks write lse = -inf, weight 0.
A traced decode program cannot pick NUM_SPLITS on the host (the batch and cache length are
symbolic), and a fixed count leaves B=1 with 8 programs on 132 SMs. runtime_splits=True launches
MAX_SPLITS split programs per (row, head block) and both kernels compute the count a row uses from
the grid's batch (tl.num_programs) and the row's cache length (RUNTIME_MIN_SPLITS' comment): the
surplus programs return before touching memory, so no shape or argument holds a min/max of the
batch. Its chunks are cdiv(len, splits) keys, not rounded to BLOCK_N, so the reduce kernel (which
has no BLOCK_N) recomputes the same count and merges only the partials that were written.
The value dot puts the keys, not the heads, on its M dimension ("swap AB", as decode kernels do
when the query block is small): out^T += kv^T [C, BN] . p^T [BN, BLOCK_H]; on sm_90 it is wgmma
reading the KV tile straight from the shared-memory buffer the cp.async pipeline filled, with the
fp32 accumulator [C, BLOCK_H] spread over the warpgroup (64 registers per thread at 4 warps). The
score dot keeps the heads on M: scores = q [BLOCK_H, C] . kv^T [C, BN] (mma.sync, q read from
shared memory). Triton lays a dot that feeds another dot out with all warps on its longer dimension,
so with the keys on M (scores^T [BN=32, 16]) 4 warps tiled 2 row blocks of 16: every score MMA
ran twice; with the heads on M each warp takes BN / num_warps keys, and half the MMA and
shared-memory reads remain (sm_90 SASS, BN=32 w4: 36 instead of 72 HMMA, 54 instead of 72 LDSM per warp and tile).
The heads-as-M form for both dots (M = 16) ran everything as mma.sync with q held in registers
(164 registers/thread at 4 warps).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dsv3_export.kernels.l2_prefetch import prefetch_l2, prefetch_l2_bulk
from dsv3_export.kernels.mla_splits import _batch_splits, _clamped_load, _row_splits
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.mla_query import rotate_pairs


# variant "lazy": the softmax's running max (base 2) is raised only when a tile's exceeds it by more than this, so most
# tiles skip rescaling the [C, BLOCK_H] accumulator (64 multiplies per thread) and the denominators; the weights then
# stay at most 2**LAZY_LOG2 = 256, well inside bf16, fp16 and fp32 (FlashAttention-4's conditional rescaling). The
# test (a max over the heads, read back by every thread) is paid on every tile.
LAZY_LOG2 = tl.constexpr(8.0)


@waits_for_producer
@triton.jit
def _mla_decode_split_kernel(
    q_ptr, q_pe_ptr, kv_ptr, pe_ptr, kvn_ptr, pen_ptr, seqlens_ptr, o_part_ptr, lse_ptr, cos_ptr, sin_ptr, pos_ptr,
    H, NUM_SPLITS, SEQ_CAP, scale_log2,
    stride_qb, stride_qh, stride_qpb, stride_qph, stride_kvb, stride_kvs, stride_peb, stride_pes,
    stride_kvnb, stride_penb, stride_rope, ROPE_ROWS,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_NEW: tl.constexpr, UPCAST: tl.constexpr,  # UPCAST: interpreted (fp32 operands, no inline PTX)
    SPLIT_TARGET: tl.constexpr, MIN_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr,  # > 0: the runtime split rule
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
    EARLY: tl.constexpr,  # q and the new token loaded before the seqlen wait (variant "early")
    LAZY: tl.constexpr,  # the running max moves only when a tile's exceeds it by > LAZY_LOG2 (variant "lazy")
    ROPE_Q: tl.constexpr,  # q_pe_ptr holds q_pe before RoPE, rotated here by the rope tables' row pos_ptr[b]
    PREFETCH_BULK: tl.constexpr,  # > 0: every PREFETCH_BULK tiles, the next PREFETCH_BULK from 2 ahead asked of L2
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
        seqlen = _clamped_load(seqlens_ptr, pid_b, SEQ_CAP)  # cached keys of this row
        if EARLY:  # issued before the row check below waits for seqlen
            q, q_pe = _query_tiles(q_ptr, q_pe_ptr, b, offs_h, offs_c, offs_r, mask_h, mask_c, mask_r,
                                   stride_qb, stride_qh, stride_qpb, stride_qph, cos_ptr, sin_ptr, pos_ptr,
                                   stride_rope, ROPE_ROWS, ROPE_Q)
            if HAS_NEW:  # every program loads the new token (1 KB, an L2 hit); the last split uses it
                kv_new = tl.load(kvn_ptr + b * stride_kvnb + offs_c, mask=mask_c, other=0.0)
                pe_new = tl.load(pen_ptr + b * stride_penb + offs_r, mask=mask_r, other=0.0)
        splits = _row_splits(splits, seqlen, MIN_KEYS)
        if pid_s >= splits:
            return
        chunk = tl.cdiv(seqlen, splits)  # not rounded to BLOCK_N (the reduce kernel recomputes `splits`)
    else:
        splits = NUM_SPLITS
        seqlen = _clamped_load(seqlens_ptr, pid_b, SEQ_CAP)  # cached keys of this row
        if EARLY:
            q, q_pe = _query_tiles(q_ptr, q_pe_ptr, b, offs_h, offs_c, offs_r, mask_h, mask_c, mask_r,
                                   stride_qb, stride_qh, stride_qpb, stride_qph, cos_ptr, sin_ptr, pos_ptr,
                                   stride_rope, ROPE_ROWS, ROPE_Q)
            if HAS_NEW:
                kv_new = tl.load(kvn_ptr + b * stride_kvnb + offs_c, mask=mask_c, other=0.0)
                pe_new = tl.load(pen_ptr + b * stride_penb + offs_r, mask=mask_r, other=0.0)
        chunk = tl.cdiv(tl.cdiv(seqlen, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seqlen)

    if not EARLY:
        q, q_pe = _query_tiles(q_ptr, q_pe_ptr, b, offs_h, offs_c, offs_r, mask_h, mask_c, mask_r,
                               stride_qb, stride_qh, stride_qpb, stride_qph, cos_ptr, sin_ptr, pos_ptr,
                               stride_rope, ROPE_ROWS, ROPE_Q)
    if UPCAST:
        q = q.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    if EARLY:
        if HAS_NEW:  # the new token's scores [BLOCK_H] now, from q in registers: no reload of q after the loop
            s_new = (tl.sum(q.to(tl.float32) * kv_new.to(tl.float32)[None, :], axis=1)
                     + tl.sum(q_pe.to(tl.float32) * pe_new.to(tl.float32)[None, :], axis=1)) * scale_log2

    # Heads on the score dot's M, keys on the value dot's M: see the module docstring.
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    # The softmax denominator per (head, key slot), summed over the keys after the loop: no cross-warp sum
    # (shuffles, shared-memory round trip, two barriers) per tile; only the fp32 summation order changes.
    l_acc = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)  # out^T
    kv_base = kv_ptr + b * stride_kvb
    pe_base = pe_ptr + b * stride_peb
    offs_bn = tl.arange(0, BLOCK_N)
    elem: tl.constexpr = kv_ptr.dtype.element_ty.primitive_bitwidth // 8
    # The bulk prefetch's ranges must start 16-byte aligned and span multiples of 16 bytes: this row's caches aligned,
    # rows of whole 16-byte units. Checked once here; a cache that fails it runs without the prefetch.
    BULK: tl.constexpr = (PREFETCH_BULK > 0) and (not UPCAST) and ((C * elem) % 16 == 0) and ((R * elem) % 16 == 0)
    bulk_aligned = False
    interleaved = False
    if BULK:
        bulk_aligned = ((((kv_base.to(tl.int64) | pe_base.to(tl.int64)) & 15) == 0)
                        & ((stride_kvs * elem) % 16 == 0) & ((stride_pes * elem) % 16 == 0))
        interleaved = (pe_base.to(tl.int64) == kv_base.to(tl.int64) + C * elem) & (stride_pes == stride_kvs)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_bn
        in_cache = offs_n < end
        # Rows past `end` re-read the chunk's last key (end - 1 >= n0: every tile has a key) instead of a
        # masked zero fill: their scores are -inf below, so p = 0 multiplies a finite cached row (exact zeros).
        # Offsets from the tile's first row in int32, that row as one 64-bit scalar.
        kv_rows = tl.minimum(offs_bn, end - 1 - n0)
        tile_kv = kv_base + tl.cast(n0, tl.int64) * stride_kvs
        tile_pe = pe_base + tl.cast(n0, tl.int64) * stride_pes
        if PREFETCH > 0:
            if not UPCAST:  # PTX; the interpreter (UPCAST) has none
                # L2 prefetch of the tile PREFETCH tiles ahead (clamped to this chunk): more bytes in
                # flight per SM than the shared-memory pipeline holds. A kv row is 8 x 128 B lines.
                rows = tl.minimum(offs_n + PREFETCH * BLOCK_N, end - 1)
                rows = rows.to(tl.int64)
                lines = kv_base + rows[:, None] * stride_kvs + (tl.arange(0, 8) * (C // 8))[None, :]
                pe_lines = pe_base + rows * stride_pes
                prefetch_l2(lines)
                prefetch_l2(pe_lines)
        if BULK:  # one bulk prefetch per range of PREFETCH_BULK tiles, rows [ahead, last] of this chunk
            ahead = n0 + 2 * BLOCK_N
            if bulk_aligned & (ahead < end) & ((n0 - start) % (PREFETCH_BULK * BLOCK_N) == 0):
                later = tl.minimum(ahead + PREFETCH_BULK * BLOCK_N, end) - 1 - ahead  # rows after the range's first
                row0 = tl.cast(ahead, tl.int64)
                if interleaved:  # [latent | rope] rows of one cache: one range holds both
                    prefetch_l2_bulk(kv_base + row0 * stride_kvs, (later * stride_kvs + C + R) * elem)
                else:
                    prefetch_l2_bulk(kv_base + row0 * stride_kvs, (later * stride_kvs + C) * elem)
                    prefetch_l2_bulk(pe_base + row0 * stride_pes, (later * stride_pes + R) * elem)
        kv = tl.load(tile_kv + (kv_rows[:, None] * stride_kvs + offs_c[None, :]), mask=mask_c[None, :], other=0.0)
        pe = tl.load(tile_pe + (kv_rows[:, None] * stride_pes + offs_r[None, :]), mask=mask_r[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong
            kv = kv.to(tl.float32)
            pe = pe.to(tl.float32)
        s = tl.dot(q, tl.trans(kv)) + tl.dot(q_pe, tl.trans(pe))  # [BLOCK_H, BN] fp32
        s = tl.where(in_cache[None, :], s * scale_log2, float("-inf"))
        if LAZY:  # rescale acc and l only when some head's max grew by > LAZY_LOG2 (always on the first tile)
            m_tile = tl.max(s, axis=1)  # finite: every tile has a key
            if tl.max(m_tile - m_i, axis=0) > LAZY_LOG2:
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.exp2(m_i - m_new)
                l_acc = l_acc * alpha[:, None]
                acc = acc * alpha[None, :]
                m_i = m_new
            p = tl.exp2(s - m_i[:, None])  # <= 2**LAZY_LOG2
            l_acc = l_acc + p
            acc = tl.dot(tl.trans(kv), tl.trans(p.to(kv.dtype)), acc)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has a key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_acc = l_acc * alpha[:, None] + p
            acc = acc * alpha[None, :] + tl.dot(tl.trans(kv), tl.trans(p.to(kv.dtype)))  # [C, BN] x [BN, BLOCK_H]
            m_i = m_new

    l_i = tl.sum(l_acc, axis=1)
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
                # q_pe reloaded too (with ROPE_Q rotated again). Taking the loop's q_pe instead (sum over axis 1 of
                # [BLOCK_H, BLOCK_R]) made the kernel slower on the H200: 230 against 216 us per 27-layer 16b batch-1
                # step (session 21), though it saves two dependent loads on the last split's path.
                q_r = _q_pe_tile(q_pe_ptr, b, offs_h, offs_r, mask_h, mask_r, stride_qpb, stride_qph, cos_ptr, sin_ptr,
                                 pos_ptr, stride_rope, ROPE_ROWS, ROPE_Q, True).to(tl.float32)  # [BLOCK_R, BLOCK_H]
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
    tl.store(o_ptrs, out, mask=mask_h[None, :] & mask_c[:, None])
    tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + pid_s, lse, mask=mask_h)


@triton.jit
def _query_tiles(q_ptr, q_pe_ptr, b, offs_h, offs_c, offs_r, mask_h, mask_c, mask_r,
                 stride_qb, stride_qh, stride_qpb, stride_qph, cos_ptr, sin_ptr, pos_ptr, stride_rope, ROPE_ROWS,
                 ROPE_Q: tl.constexpr):
    """This row's query block: q [BLOCK_H, BLOCK_C] and q_pe [BLOCK_H, BLOCK_R], zero past H, C, R."""
    q = tl.load(q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=mask_h[:, None] & mask_c[None, :], other=0.0)
    q_pe = _q_pe_tile(q_pe_ptr, b, offs_h, offs_r, mask_h, mask_r, stride_qpb, stride_qph, cos_ptr, sin_ptr, pos_ptr,
                      stride_rope, ROPE_ROWS, ROPE_Q, False)
    return q, q_pe


@triton.jit
def _q_pe_tile(q_pe_ptr, b, offs_h, offs_r, mask_h, mask_r, stride_qpb, stride_qph, cos_ptr, sin_ptr, pos_ptr,
               stride_rope, ROPE_ROWS, ROPE_Q: tl.constexpr, R_FIRST: tl.constexpr):
    """Row b's q_pe, [BLOCK_H, BLOCK_R] (R_FIRST: [BLOCK_R, BLOCK_H]), zero past H and R. ROPE_Q: q_pe_ptr holds it
    before RoPE, rotated here as reference/layers.py apply_rotary_emb does (pair (2i, 2i + 1) by the rope tables' row
    pos_ptr[b], column i, in fp32, rounded to q_pe's dtype): the rope kernel Inductor ran before the attention (one
    launch per layer) is not needed. Each element is computed from itself and its pair partner (offset r ^ 1), so
    the tile has the plain load's layout (the score sums in the same order as without ROPE_Q)."""
    if R_FIRST:
        offs = b * stride_qpb + offs_h[None, :] * stride_qph
        mask = mask_h[None, :] & mask_r[:, None]
        r, mask_rr = offs_r[:, None], mask_r[:, None]
    else:
        offs = b * stride_qpb + offs_h[:, None] * stride_qph
        mask = mask_h[:, None] & mask_r[None, :]
        r, mask_rr = offs_r[None, :], mask_r[None, :]
    x = tl.load(q_pe_ptr + offs + r, mask=mask, other=0.0)
    if ROPE_Q:
        row = _clamped_load(pos_ptr, b, ROPE_ROWS - 1).to(tl.int64) * stride_rope
        partner = tl.load(q_pe_ptr + offs + (r ^ 1), mask=mask, other=0.0)
        c = tl.load(cos_ptr + row + r // 2, mask=mask_rr, other=0.0)
        s = tl.load(sin_ptr + row + r // 2, mask=mask_rr, other=0.0)
        # the rounding to bf16 in integers (the interpreter's cast truncates); kernels/mla_query.py shares the math
        y = rotate_pairs(x, partner, c, s, r, q_pe_ptr.dtype.element_ty == tl.bfloat16)
        x = y.to(q_pe_ptr.dtype.element_ty)
    return x


@waits_for_producer
@triton.jit
def _mla_decode_reduce_kernel(
    o_part_ptr, lse_ptr, seqlens_ptr, SEQ_CAP, NUM_SPLITS, HEAD_BLOCKS,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, out_ptr, stride_outb, stride_outh,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_TARGET: tl.constexpr, MIN_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    out = _merged_splits(o_part_ptr, lse_ptr, seqlens_ptr, SEQ_CAP, pid_b, h, tl.num_programs(0) * HEAD_BLOCKS,
                         NUM_SPLITS,
                         stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                         C, BLOCK_C, BLOCK_S, SPLIT_TARGET, MIN_SPLITS, MIN_KEYS)
    offs_c = tl.arange(0, BLOCK_C)
    b = pid_b.to(tl.int64)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + offs_c, out.to(out_ptr.dtype.element_ty), mask=offs_c < C)


@triton.jit
def _merged_splits(
    o_part_ptr, lse_ptr, seqlens_ptr, SEQ_CAP, pid_b, h, split_programs, NUM_SPLITS,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_TARGET: tl.constexpr, MIN_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr,
):
    """Row pid_b's head h merged over its splits: fp32 [BLOCK_C], zero past C. One helper for the reduce kernel
    and kernels/mla_merge_uv.py, so that both merge bit for bit alike. split_programs: the split kernel's
    (row, head block) programs, the runtime rule's input (its grid's batch x HEAD_BLOCKS)."""
    splits = NUM_SPLITS
    if SPLIT_TARGET > 0:  # the split kernel's runtime rule: only the row's first `splits` partials were written
        splits = _batch_splits(split_programs, NUM_SPLITS, SPLIT_TARGET, MIN_SPLITS)
        splits = _row_splits(splits, _clamped_load(seqlens_ptr, pid_b, SEQ_CAP), MIN_KEYS)
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
    return tl.sum(o * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
