"""Probe variant A of kernels/mla_absorb.py head_gemm (a copy, only the kernel and launcher changed):
the dot swapped, out^T[n, m] = sum_k W^T[h, n, k] x^T[h, k, m], so the weight's BLOCK_N columns sit on
the MMA's M side and the batch rows (1 at decode, padded to BLOCK_M >= 16) on its N side; K and N
masks dropped when K % BLOCK_K == 0 / N % BLOCK_N == 0 (EVEN_K / EVEN_N, the 16b shapes).
Same fp32 accumulation over K in BLOCK_K steps as the original (MMA-internal order may differ)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import cdiv, launch
from dsv3_export.kernels.mla_absorb import check_head_gemm
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

CONFIGS = {  # BLOCK_N is now the MMA's M (>= 16), BLOCK_M its N
    "N32 K128 w2": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=2, num_stages=2),
    "N64 K64 w4": triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    "N16 K128 w1": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128}, num_warps=1, num_stages=4),
    "N32 K64 w2": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=2, num_stages=3),
}


@waits_for_producer
@triton.jit
def _head_gemm_kernel(
    x_ptr, w_ptr, out_ptr,
    M, K, N, M_BUCKET,
    stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn, stride_om, stride_oh, stride_on,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    wait_for_producer()
    head = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    xt_ptrs = x_ptr + head * stride_xh + offs_k[:, None] * stride_xk + rows[None, :] * stride_xm  # [BK, BM]
    wt_ptrs = w_ptr + head * stride_wh + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BN, BK]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            b = tl.load(xt_ptrs, mask=mask_m[None, :], other=0.0)
            if EVEN_N:
                a = tl.load(wt_ptrs)
            else:
                a = tl.load(wt_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = offs_k < K - k0
            b = tl.load(xt_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
            a = tl.load(wt_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b)
        xt_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + head * stride_oh + rows[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def head_gemm(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None,
              config: triton.Config | None = None) -> torch.Tensor:
    check_head_gemm(x, w, out)
    m, h, k = x.shape
    n = w.shape[2]
    if out is None:
        out = torch.empty((m, h, n), dtype=x.dtype, device=x.device)
    cfg = config or next(iter(CONFIGS.values()))
    kernel = _head_gemm_kernel
    interp = type(kernel).__name__ == "InterpretedFunction"
    grid = lambda meta: (h, cdiv(n, meta["BLOCK_N"]), cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    kw = dict(UPCAST=interp and x.dtype != torch.float32, EVEN_K=k % cfg.kwargs["BLOCK_K"] == 0,
              EVEN_N=n % cfg.kwargs["BLOCK_N"] == 0)
    if m and h and n:
        launch(kernel, None, [cfg], grid, (x, w, out, m, k, n, 64, *x.stride(), *w.stride(), *out.stride()), kw, cfg)
    return out
