"""Per-head GEMM for MLA's absorbed projections: out[m, h, n] = sum_k x[m, h, k] * W[h, k, n].

Why a kernel: absorbed MLA multiplies each head's query by W_UK (q_latent = q_nope @ W_UK[h],
[.., dn] x [dn, c]) and each head's attention output by W_UV (o = lat @ W_UV[h]^T, [.., c] x [c, dv]).
As einsums Inductor lowers each to a permute copy of the activation, a cuBLAS bmm and another copy:
three launches (~9 us per layer for both in the 16b batch-1 decode profile on the H200, 2 MB of bf16
weight each). This kernel reads the activation and the weight through their strides, so each
projection is one launch and writes the contiguous [M, H, N] the next op reads.

Layouts (any strides, nothing copied):
  x    [M, H, K]  bf16/fp16 (fp32 only under the CPU interpreter: on the GPU an fp32 tl.dot is TF32);
                  in the engine q_nope[:, 0] (a strided slice of the q projection) or the attention's
                  latent output [b, h, c]
  W    [H, K, N]  a view of wkv_b.view(h, dn + dv, c): W_UK = w[:, :dn] (K = dn, N = c, N contiguous)
                  or W_UV = w[:, dn:].transpose(1, 2) (K = c, N = dv, K contiguous)
  out  [M, H, N]  x.dtype, fp32 accumulation, a new contiguous tensor (or the caller's `out`)

Algorithm: a program owns head h, a BLOCK_N slice of N and a BLOCK_M slice of M (grid (H, N tiles,
M tiles)) and walks K in BLOCK_K steps with tl.dot (BLOCK_M >= 16, the dot's minimum); rows, columns
and K are masked with zero fill. Decode (M <= 64) is a weight read (2 MB per projection at the 16b
shapes, ~0.5 us at 4.2 TB/s): narrow N tiles give H x N/BLOCK_N CTAs (16 x 512/32 = 256 for W_UK)
to spread it over the SMs. Prefill (M in the thousands) keeps cuBLAS in the engine; the 64-row
configs are there so the launcher is correct at any M, not to beat cuBLAS.

sm_90 (ptxas, tests/kernels/_sm90_compile.py; unit strides specialized as a launch specializes
them): every config compiles to bf16 mma.sync (16/32-row tiles) or wgmma (64-row tiles) fed by
cp.async pipelines, 37-126 registers per thread, no spills, 12-72 KB of shared memory.

Autotune key: M_BUCKET (a power of 2, a runtime argument only to key the tuner, as in fp8_gemm.py),
never M itself: M is symbolic when a program is traced, and the key must not specialize it.
Under TRITON_INTERPRET=1 bf16/fp16 operands are upcast to fp32 before the dot (UPCAST: the
interpreter's bf16 dot is wrong); on the GPU they never are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import LaunchSpec, autotune_or_single, cdiv, check_tensor, is_interpreted, launch, \
    next_pow2
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DOT_DTYPES = (torch.bfloat16, torch.float16)  # what the engine passes (fp32 dots would be TF32 on the GPU)
DECODE_MAX_M = 64  # M at or below: the decode bucket (a power of 2 >= 16); above: PREFILL_M_BUCKET
PREFILL_M_BUCKET = 4096

# Decode: BLOCK_M 16 (batch <= 16 in one M tile), narrow N tiles for many CTAs; 32/64-row tiles for
# bigger batches and prefill. The first config is the interpreter's (one launch, no autotune).
HEAD_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=2, num_stages=5),
    # W_UV (N = 128, K = 512): 16-column tiles give H x 8 = 128 CTAs, each streaming 16 KB of weight
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]


@triton.jit
def _head_gemm_tile(
    x_ptr, w_ptr, head, offs_m, offs_n, mask_m, mask_n, K,
    stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The fp32 [BLOCK_M, BLOCK_N] tile of head `head`: x's rows times W's columns, K in BLOCK_K steps."""
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    x_ptrs = x_ptr + head * stride_xh + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    w_ptrs = w_ptr + head * stride_wh + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@waits_for_producer
@triton.jit
def _head_gemm_kernel(
    x_ptr, w_ptr, out_ptr,
    M, K, N, M_BUCKET,  # M_BUCKET: unused in the body, a runtime arg only to key the autotuner
    stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn, stride_om, stride_oh, stride_on,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    _head_gemm_column_tile(x_ptr, w_ptr, out_ptr, tl.program_id(0).to(tl.int64), offs_m, offs_m < M,
                           tl.program_id(1), K, N, stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn,
                           stride_om, stride_oh, stride_on, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _head_gemm_column_tile(
    x_ptr, w_ptr, out_ptr, head, offs_m, mask_m, tile, K, N,
    stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn, stride_om, stride_oh, stride_on,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Column tile `tile` of head `head` for the rows offs_m: _head_gemm_tile's K loop, stored in out's dtype (one
    program of _head_gemm_kernel; kernels/mla_query.py's GEMM programs)."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = _head_gemm_tile(x_ptr, w_ptr, head, offs_m, offs_n, mask_m, mask_n, K,
                          stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn,
                          UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    rows = offs_m.to(tl.int64)
    out_ptrs = out_ptr + head * stride_oh + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_INTERPRETED = is_interpreted(_head_gemm_kernel)
_head_gemm_tuned = autotune_or_single(_head_gemm_kernel, HEAD_GEMM_CONFIGS, key=["M_BUCKET", "K", "N"])


def m_bucket(m: int) -> int:
    """The autotune key's M: the next power of 2 >= 16 up to DECODE_MAX_M, else PREFILL_M_BUCKET."""
    return max(16, next_pow2(m)) if m <= DECODE_MAX_M else PREFILL_M_BUCKET


def head_gemm_spec(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bucket: int) -> LaunchSpec:
    """The launch for x [M, H, K], w [H, K, N] into out [M, H, N] (any strides; checked by the caller).
    bucket: the autotune key's M (m_bucket(M), or a constant when M is traced)."""
    m, h, k = x.shape
    n = w.shape[2]
    grid = lambda meta: (h, cdiv(n, meta["BLOCK_N"]), cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    args = (x, w, out, m, k, n, bucket, *x.stride(), *w.stride(), *out.stride())
    kwargs = dict(UPCAST=_INTERPRETED and x.dtype != torch.float32)
    return LaunchSpec(_head_gemm_kernel, _head_gemm_tuned, HEAD_GEMM_CONFIGS, grid, args, kwargs)


# The GEMV form (head_gemv): one batch row per program, CUDA-core FMAs. For W_UV at batch <= 2 (the decode
# program gates it like kernels/fp8_gemv.py): on the H200 (session 16, hg_variant_probe, CUDA graphs of 32
# calls, cold L2) 2.77 us per call at B=1 against 3.69 for head_gemm's best tile, 4.9 at B=8 (slower than the
# tiles above B=2). One config, not autotuned: the decode program is tuned at batch 64, where its grid is empty.
HEAD_GEMV_CONFIGS = [triton.Config({"BLOCK_N": 8}, num_warps=4, num_stages=1)]
HEAD_GEMV_MAX_K = 1024  # the program holds a [BLOCK_N, next_pow2(K)] weight tile in registers


@waits_for_producer
@triton.jit
def _head_gemv_kernel(
    x_ptr, w_ptr, out_ptr, N,
    stride_xm, stride_xh, stride_xk, stride_wh, stride_wn, stride_om, stride_oh, stride_on,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[m, h, n] for one row m (program axis 2), head h (axis 0) and BLOCK_N columns (axis 1): the
    weight's [BLOCK_N, K] rows (K contiguous, as W_UV's are) times x's row, summed in fp32. K is a
    constexpr (the weight's static shape): the K mask folds away where K == BLOCK_K."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    head = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(2).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask_n = offs_n < N
    x = tl.load(x_ptr + row * stride_xm + head * stride_xh + offs_k * stride_xk, mask=mask_k, other=0.0)
    w = _head_gemv_weights(w_ptr, head, offs_n, offs_k, mask_n, mask_k, stride_wh, stride_wn)
    acc = _head_gemv_product(w, x)  # [BLOCK_N]
    tl.store(out_ptr + row * stride_om + head * stride_oh + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask_n)


@triton.jit
def _head_gemv_weights(w_ptr, head, offs_n, offs_k, mask_n, mask_k, stride_wh, stride_wn):
    """Head `head`'s weight rows [BLOCK_N, BLOCK_K] (K contiguous), zero past N and K."""
    return tl.load(w_ptr + head * stride_wh + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                   mask=mask_n[:, None] & mask_k[None, :], other=0.0)


@triton.jit
def _head_gemv_product(w, x):
    """w [BLOCK_N, BLOCK_K] times the row x [BLOCK_K], summed in fp32 -> [BLOCK_N]: one helper for head_gemv
    and kernels/mla_merge_uv.py, so that both sum bit for bit alike."""
    return tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)


_head_gemv_single = autotune_or_single(_head_gemv_kernel, HEAD_GEMV_CONFIGS, key=[])


def head_gemv_suits(w: torch.Tensor) -> bool:
    """Whether head_gemv takes w [H, K, N]: K contiguous (W_UV^T's view) and at most HEAD_GEMV_MAX_K."""
    return w.stride(1) == 1 and w.shape[1] <= HEAD_GEMV_MAX_K


def head_gemv_spec(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> LaunchSpec:
    """head_gemv's launch for x [M, H, K], w [H, K, N] with K contiguous (head_gemv_suits) into out
    [M, H, N]; checked by the caller. M may be symbolic (traced)."""
    m, h, k = x.shape
    n = w.shape[2]
    grid = lambda meta: (h, cdiv(n, meta["BLOCK_N"]), m)  # noqa: E731
    args = (x, w, out, n, *x.stride(), w.stride(0), w.stride(2), *out.stride())
    return LaunchSpec(_head_gemv_kernel, _head_gemv_single, HEAD_GEMV_CONFIGS, grid, args,
                      dict(K=k, BLOCK_K=next_pow2(k)))


def head_gemv(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None,
              config: triton.Config | None = None) -> torch.Tensor:
    """head_gemm's product by CUDA-core FMAs, one row per program: meant for M <= 2 and W_UV's layout
    (w [H, K, N] with K contiguous, K <= HEAD_GEMV_MAX_K)."""
    check_head_gemm(x, w, out)
    if not head_gemv_suits(w):
        raise ValueError(f"head_gemv: w {tuple(w.shape)} needs K contiguous (strides {w.stride()}) and K <= "
                         f"{HEAD_GEMV_MAX_K}")
    return _launch_into(x, w, out, lambda o: head_gemv_spec(x, w, o), config)


def _launch_into(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None, spec_of, config) -> torch.Tensor:
    """The eager launchers' common tail: out [M, H, N] allocated unless given, spec_of(out) launched unless
    a dimension is empty."""
    m, h, _ = x.shape
    n = w.shape[2]
    if out is None:
        out = torch.empty((m, h, n), dtype=x.dtype, device=x.device)
    if m and h and n:
        launch(*spec_of(out), config)
    return out


def check_head_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> None:
    """Raise a ValueError/TypeError naming the tensor when (x, w, out) is not what the kernel takes."""
    check_tensor("head_gemm: x", x, dtypes=DTYPES, ndim=3)
    check_tensor("head_gemm: w", w, dtypes=(x.dtype,), ndim=3, device=x.device)
    m, h, k = x.shape
    hw, kw, n = w.shape
    if (hw, kw) != (h, k):
        raise ValueError(f"head_gemm: w is [H={hw}, K={kw}, N={n}] but x is [M={m}, H={h}, K={k}]; H and K must match")
    if out is not None:
        check_tensor("head_gemm: out", out, dtypes=(x.dtype,), ndim=3, device=x.device)
        if tuple(out.shape) != (m, h, n):
            raise ValueError(f"head_gemm: out must be [M, H, N] = {(m, h, n)}, got {tuple(out.shape)}")


def head_gemm(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None,
              config: triton.Config | None = None) -> torch.Tensor:
    """x [M, H, K] @ w [H, K, N] per head -> [M, H, N] in x.dtype (fp32 accumulation), any strides.
    out: write there instead of a new contiguous tensor. config: one of HEAD_GEMM_CONFIGS (tests)."""
    check_head_gemm(x, w, out)
    return _launch_into(x, w, out, lambda o: head_gemm_spec(x, w, o, m_bucket(x.shape[0])), config)


def head_gemm_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The einsum in fp32, rounded to x.dtype."""
    return torch.einsum("mhk,hkn->mhn", x.float(), w.float()).to(x.dtype)
