"""Causal prefill of absorbed MLA over the latent cache: S_q new queries per batch row -> [B, S_q, H, C].

The shared picture (layouts, the absorbed-MLA math, which keys a row sees, dtypes) is in
kernels/mla_attention.py, which also holds the input checks and mla_prefill_ref.

Prefill: rows (query i, head h) are flattened to r = i * H + h (they share the keys), a program
takes BLOCK_Q rows, loops over keys up to the block's last absolute position start_pos + i and
masks t > start_pos + i per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import autotune_or_single, cdiv, check_tensor, is_interpreted, launch, next_pow2
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.mla_attention import LOG2E, _check_caches, _check_new

# The [BLOCK_Q, 512] fp32 accumulator dominates registers: BLOCK_Q = 128 spills kilobytes on sm_90.
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_Q": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_Q": 32, "BLOCK_N": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_Q": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_Q": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2),
]


@triton.jit
def _load_keys(kv_ptrs, pe_ptrs, kvn_ptrs, pen_ptrs, in_cache, in_new, mask_c, mask_r, HAS_NEW: tl.constexpr):
    """[BN, C] and [BN, R] key tiles from the cache and/or the new tokens (disjoint masks)."""
    kv = tl.load(kv_ptrs, mask=in_cache[:, None] & mask_c[None, :], other=0.0)
    pe = tl.load(pe_ptrs, mask=in_cache[:, None] & mask_r[None, :], other=0.0)
    if HAS_NEW:  # disjoint masks with zero fill: the sum is a select, exact
        kv += tl.load(kvn_ptrs, mask=in_new[:, None] & mask_c[None, :], other=0.0)
        pe += tl.load(pen_ptrs, mask=in_new[:, None] & mask_r[None, :], other=0.0)
    return kv, pe


@triton.jit
def _attend_tile(q, q_pe, kv, pe, valid, m_i, l_i, acc, scale_log2, UPCAST: tl.constexpr):
    """One online-softmax step (base 2) over a BLOCK_N tile of keys; `valid` [rows, BLOCK_N] masks scores."""
    if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong
        kv = kv.to(tl.float32)
        pe = pe.to(tl.float32)
    s = tl.dot(q, tl.trans(kv)) + tl.dot(q_pe, tl.trans(pe))  # [rows, BN] fp32
    s = tl.where(valid, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep exp2 finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
    return m_new, l_i, acc


@waits_for_producer
@triton.jit
def _mla_prefill_kernel(
    q_ptr, q_pe_ptr, kv_ptr, pe_ptr, kvn_ptr, pen_ptr, start_ptr, out_ptr,
    H, ROWS, scale_log2,
    stride_qb, stride_qr, stride_qpb, stride_qpr, stride_kvb, stride_kvs, stride_peb, stride_pes,
    stride_kvnb, stride_kvns, stride_penb, stride_pens, stride_outb, stride_outr,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_NEW: tl.constexpr, UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    scale_log2 = tl.cast(scale_log2, tl.float32)  # Inductor passes Python floats as fp64 scalars
    b = tl.program_id(0).to(tl.int64)
    pid_q = tl.program_id(1)
    start = tl.load(start_ptr + b)  # absolute position of this row's first query
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # flattened (query, head) rows
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_q, mask_c, mask_r = offs_q < ROWS, offs_c < C, offs_r < R
    pos = start + offs_q // H  # absolute position of each row's query
    q = tl.load(q_ptr + b * stride_qb + offs_q[:, None] * stride_qr + offs_c[None, :],
                mask=mask_q[:, None] & mask_c[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + b * stride_qpb + offs_q[:, None] * stride_qpr + offs_r[None, :],
                   mask=mask_q[:, None] & mask_r[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    last_row = tl.minimum((pid_q + 1) * BLOCK_Q, ROWS) - 1
    hi = start + last_row // H + 1  # keys this block can see
    cache_end = start if HAS_NEW else hi  # keys below cache_end come from the cache
    m_i = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_cache = offs_n < cache_end
        in_new = (offs_n >= cache_end) & (offs_n < hi)
        offs_n64 = offs_n.to(tl.int64)
        kv_ptrs = kv_ptr + b * stride_kvb + offs_n64[:, None] * stride_kvs + offs_c[None, :]
        pe_ptrs = pe_ptr + b * stride_peb + offs_n64[:, None] * stride_pes + offs_r[None, :]
        kvn_ptrs = kvn_ptr + b * stride_kvnb + (offs_n64 - start)[:, None] * stride_kvns + offs_c[None, :]
        pen_ptrs = pen_ptr + b * stride_penb + (offs_n64 - start)[:, None] * stride_pens + offs_r[None, :]
        kv, pe = _load_keys(kv_ptrs, pe_ptrs, kvn_ptrs, pen_ptrs, in_cache, in_new, mask_c, mask_r, HAS_NEW)
        valid = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] < hi) & mask_q[:, None]
        m_i, l_i, acc = _attend_tile(q, q_pe, kv, pe, valid, m_i, l_i, acc, scale_log2, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * stride_outb + offs_q[:, None] * stride_outr + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_c[None, :])


_prefill_tuned = autotune_or_single(_mla_prefill_kernel, PREFILL_CONFIGS, key=["H", "C", "R"])


def mla_prefill(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                start_pos: int | torch.Tensor, softmax_scale: float, *, kv_new: torch.Tensor | None = None,
                pe_new: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """Causal attention of S_q new queries per row -> [B, S_q, H, C].

    q_latent [B, S_q, H, C], q_pe [B, S_q, H, R]; query i of row b is at position start_b + i
    (start_pos: an int, or int32 [B] for ragged rows) and sees keys t <= start_b + i. Without
    kv_new all those keys are read from the cache; with kv_new [B, S_q, C] / pe_new [B, S_q, R]
    positions t >= start_b are the new tokens (key start_b + u is new token u), and the cache is
    read only below start_b.
    """
    check_tensor("mla_prefill: q_latent", q_latent, ndim=4)
    bsz, s_q, heads, _ = q_latent.shape
    c, r = _check_caches("mla_prefill", q_latent, q_pe, kv_cache, pe_cache, bsz)
    has_new = _check_new("mla_prefill", kv_new, pe_new, q_latent, (bsz, s_q, c), (bsz, s_q, r))
    dev = q_latent.device
    if isinstance(start_pos, torch.Tensor):
        check_tensor("mla_prefill: start_pos", start_pos, dtypes=(torch.int32,), ndim=1, device=dev, contiguous=True)
        if start_pos.shape[0] != bsz:
            raise ValueError(f"mla_prefill: start_pos has {start_pos.shape[0]} entries for batch {bsz}")
        starts = start_pos  # bounds are the caller's contract: checking them would sync the host
    else:
        last = start_pos if has_new else start_pos + s_q
        if start_pos < 0 or last > kv_cache.shape[1]:
            raise ValueError(f"mla_prefill: cached positions [0, {last}) outside the cache's "
                             f"{kv_cache.shape[1]} positions")
        starts = torch.full((bsz,), start_pos, dtype=torch.int32, device=dev)
    out = torch.empty((bsz, s_q, heads, c), dtype=q_latent.dtype, device=dev)
    if out.numel() == 0:
        return out
    rows = s_q * heads
    q = q_latent.reshape(bsz, rows, c)  # [B, S_q*H, C], row r = (i, h) = (r // H, r % H)
    qp = q_pe.reshape(bsz, rows, r)  # [B, S_q*H, R]
    o = out.view(bsz, rows, c)
    kvn, pen = (kv_new, pe_new) if has_new else (kv_cache, pe_cache)  # never read without HAS_NEW
    grid = lambda meta: (bsz, cdiv(rows, meta["BLOCK_Q"]))  # noqa: E731
    launch(_mla_prefill_kernel, _prefill_tuned, PREFILL_CONFIGS, grid,
           (q, qp, kv_cache, pe_cache, kvn, pen, starts, o, heads, rows, softmax_scale * LOG2E,
            q.stride(0), q.stride(1), qp.stride(0), qp.stride(1), kv_cache.stride(0), kv_cache.stride(1),
            pe_cache.stride(0), pe_cache.stride(1), kvn.stride(0), kvn.stride(1), pen.stride(0), pen.stride(1),
            o.stride(0), o.stride(1)),
           dict(C=c, R=r, BLOCK_C=next_pow2(c), BLOCK_R=next_pow2(r), HAS_NEW=has_new,
                UPCAST=is_interpreted(_mla_prefill_kernel) and q_latent.dtype != torch.float32), config)
    return out
