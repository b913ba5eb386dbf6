"""Probe variant B of kernels/mla_absorb.py head_gemm (a copy, kernel and launcher changed): a CUDA-core
form for a few rows. A program owns head h and a BLOCK_N slice of N, loads its whole [K, BLOCK_N] weight
tile once (BLOCK_K = next_pow2(K) >= K, one load, every byte in flight at once, no shared-memory
staging, no MMA padding of the one decode row to 16), then for each of its ROWS rows of x computes
out[m, h, n] = sum_k fp32(x[m, h, k]) * fp32(W[h, k, n]) with tl.sum (products exact in fp32, only the
summation order differs from the tensor-core kernel). Masks only where K or N is not a multiple of the
tile (EVEN_K / EVEN_N) and on the row bound."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import cdiv, launch, next_pow2
from dsv3_export.kernels.mla_absorb import check_head_gemm
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

CONFIGS = {  # ROWS: rows of x per program (grid z = cdiv(M, ROWS))
    "N32 R1 w4": triton.Config({"BLOCK_N": 32, "ROWS": 1}, num_warps=4),
    "N16 R1 w4": triton.Config({"BLOCK_N": 16, "ROWS": 1}, num_warps=4),
    "N8 R1 w4": triton.Config({"BLOCK_N": 8, "ROWS": 1}, num_warps=4),
    "N32 R8 w4": triton.Config({"BLOCK_N": 32, "ROWS": 8}, num_warps=4),
    "N16 R8 w4": triton.Config({"BLOCK_N": 16, "ROWS": 8}, num_warps=4),
}


@waits_for_producer
@triton.jit
def _head_gemm_kernel(
    x_ptr, w_ptr, out_ptr,
    M, K, N, M_BUCKET,
    stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn, stride_om, stride_oh, stride_on,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    wait_for_producer()
    head = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    w_ptrs = w_ptr + head * stride_wh + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BK, BN]
    if EVEN_K and EVEN_N:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    w = w.to(tl.float32)
    x_row = x_ptr + head * stride_xh + offs_k * stride_xk  # [BK]
    o_row = out_ptr + head * stride_oh + offs_n * stride_on  # [BN]
    m0 = tl.program_id(2) * ROWS
    for r in range(ROWS):
        m = m0 + r
        mm = m.to(tl.int64)
        ok_k = (offs_k * 0 + m) < M  # the row bound as a [BK] mask
        ok_n = (offs_n * 0 + m) < M
        if EVEN_K:
            xv = tl.load(x_row + mm * stride_xm, mask=ok_k, other=0.0)
        else:
            xv = tl.load(x_row + mm * stride_xm, mask=ok_k & mask_k, other=0.0)
        acc = tl.sum(xv.to(tl.float32)[:, None] * w, axis=0)  # [BN] fp32
        if EVEN_N:
            tl.store(o_row + mm * stride_om, acc.to(out_ptr.dtype.element_ty), mask=ok_n)
        else:
            tl.store(o_row + mm * stride_om, acc.to(out_ptr.dtype.element_ty), mask=ok_n & mask_n)


def head_gemm(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None,
              config: triton.Config | None = None) -> torch.Tensor:
    check_head_gemm(x, w, out)
    m, h, k = x.shape
    n = w.shape[2]
    if out is None:
        out = torch.empty((m, h, n), dtype=x.dtype, device=x.device)
    cfg = config or next(iter(CONFIGS.values()))
    bk = max(16, next_pow2(k))
    grid = lambda meta: (h, cdiv(n, meta["BLOCK_N"]), cdiv(m, meta["ROWS"]))  # noqa: E731
    kw = dict(BLOCK_K=bk, EVEN_K=k == bk, EVEN_N=n % cfg.kwargs["BLOCK_N"] == 0)
    if m and h and n:
        launch(_head_gemm_kernel, None, [cfg], grid,
               (x, w, out, m, k, n, 64, *x.stride(), *w.stride(), *out.stride()), kw, cfg)
    return out
