"""FP8 blockwise-scaled GEMM for decode (M <= 64) on weights that need no split of K.

Same product, layouts and scales as kernels/fp8_gemm.py (a fp8 [M, K] with a_s [M, ceil(K/128)], b fp8 [N, K]
with b_s [ceil(N/128), ceil(K/128)], c [M, N]), W8A8 only. fp8_gemm hands it the decode calls whose weight has
enough N tiles to fill the SMs (split_k 1: at the 16b shapes the dense MLP's w1 and w3); the weight read is the
cost (22.4 MB for w1/w3, a few MFLOP).

Two tile orientations, one kernel (SWAP_AB):
- M <= SWAP_MAX_M (16): the operands swapped, C^T = B @ A^T. Hopper's wgmma takes its A operand in tiles of 64
  rows and its B operand 8-256 columns wide, so the weight rows go in A's 64 and the tokens in B's 16: the fp8
  weight tile is the wgmma operand as read, and the accumulator [BLOCK_N, 16] is only as wide as the tokens
  (kernels/fp8_gemm.py's 16-row tiles fall back to mma.sync, which has no fp8 form on sm_90 and widens every
  weight byte to f16 first; its 64-row tile pads M=16 to 64). DeepGEMM and TensorRT-LLM swap AB for small M too.
- 16 < M <= 64: the direct [64, BLOCK_N] tile (tokens as wgmma's M). Swapped, a 64-token tile ran 1.3x slower
  on the H200 (benchmarks/RESULTS.md, session 31).

What differs from kernels/fp8_gemm.py's K loop, and why (H200, session 31, benchmarks/fp8_decode_probe.py):
- The scales are loaded one K block ahead. They are not dot operands, so Triton's pipeliner leaves their loads
  in place, and every step waited for them after its wgmma (in the swapped accumulator's layout each thread
  loads BLOCK_M / 4 of them): 12.8 -> 12.2 us for the swapped tile at M=16.
- The weight's loads carry no predicate when N is a multiple of BLOCK_N and K of 128 (EVEN_N, EVEN_K), the
  token rows' loads only the row mask.
- No autotuner: one pinned config (a package gates one of the two launches off at its tuning batch, where an
  autotuner would time an empty grid; the tile kernel's decode autotuner also picked configs at 0.66x (M=64) and
  0.85x (M=32) of cuBLAS in some runs).
Each 128-wide K step's fp8 x fp8 -> fp32 dot is scaled by a_s[m, kb] * b_s[n // 128, kb] and added in CUDA-core
fp32 (never accumulated across K blocks in the tensor core: fp8_gemm.py says why). Ragged M, N and K are masked
(zero fill). A TMA descriptor for the weight was faster still (1.03-1.11x of cuBLAS at M = 16-32) but cannot enter
an AOTInductor package with torch 2.11 (its mutation analysis finds no descriptor metadata), so it is not offered.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import (FP8_DTYPE, QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv,
                                         check_blockwise_gemm, launch)
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_M = 64  # fp8_gemm.DECODE_MAX_M
SWAP_MAX_M = 16  # the swapped tile's token count; above it the direct 64-row tile
# The two tiles (the call's constexprs) and their pinned config (H200, session 31, w1/w3 N=10944 K=2048, CUDA graphs
# against blockwise _scaled_mm in alternation, median of 3-5 rounds): swapped 64 x 16 on 4 warps, 5 stages: 1.11-1.12x
# at M=1, 1.06-1.10x at M=16 (s4 1.05-1.09x, s6 the same as s5, 128 weight rows 1.01-1.05x); direct 64 x 64, 5 stages:
# 1.02-1.03x at M=64, 1.04x at M=32 (s4 1.02-1.04x, s6 0.995-1.05x).
# The tile is a call argument, not a Config entry: Inductor keys the user kernels it compiles into a package on the
# kernel and its call arguments, not on the autotuner's configs (torch/_inductor/codegen/wrapper.py
# define_user_defined_triton_kernel), so two launches that differ only in their configs' constexprs ran the first's
# compiled tile for both (session 31: the direct launch ran the swapped tile, rows 16-63 of every 64 unwritten).
SWAP_TILE = {"SWAP_AB": True, "BLOCK_M": 16}
DIRECT_TILE = {"SWAP_AB": False, "BLOCK_M": 64}
CONFIG = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=5)


@waits_for_producer
@triton.jit
def _fp8_gemm_decode_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr,
    M, N, K,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    a_rows = a_ptr + offs_m[:, None] * stride_am
    b_rows = b_ptr + offs_n[:, None] * stride_bn
    a_s_rows = a_s_ptr + offs_m * stride_asm
    b_s_row = b_s_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn  # BLOCK_N divides 128: one scale row
    k_blocks = tl.cdiv(K, BLOCK_K)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_s_next = tl.load(a_s_rows, mask=mask_m, other=0.0)
    b_s_next = tl.load(b_s_row)
    for kb in range(0, k_blocks):
        scale = a_s_next * b_s_next  # [BM]: this step's, loaded during the previous one
        kb_next = tl.minimum(kb + 1, k_blocks - 1)  # the last step reloads its own (unused)
        a_s_next = tl.load(a_s_rows + kb_next, mask=mask_m, other=0.0)
        b_s_next = tl.load(b_s_row + kb_next)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K and EVEN_N:
            w = tl.load(b_rows + offs_k[None, :])  # [BN, BK]
        else:
            w = tl.load(b_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
        if EVEN_K:
            x = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None], other=0.0)  # [BM, BK]
        else:
            x = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        if SWAP_AB:
            acc += tl.dot(w, tl.trans(x)) * scale[None, :]  # [BN, BM]
        else:
            acc += tl.dot(x, tl.trans(w)) * scale[:, None]  # [BM, BN]
    if SWAP_AB:
        c_ptrs = c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])
    else:
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The pinned config as a one-config autotuner: how a launch through wrap_triton (engines/torch_launch.py) gets its warps
# and stages compiled in (a bare kernel gets Inductor's defaults); one config is never timed.
_PINNED = autotune_or_single(_fp8_gemm_decode_kernel, [CONFIG], key=[])


def swap_gate(m):
    """1 when M rows (symbolic or not) take the swapped tile, else 0; floor divisions only, so no guard on a traced M
    and a plain C++ expression in an AOTInductor wrapper (as kernels/fp8_gemv.py gemv_gate). M = 0 (a Python int; a
    traced batch is at least 1): 0, the direct tile, whose grid then has no rows."""
    if isinstance(m, int) and m == 0:
        return 0
    return 1 // ((m + SWAP_MAX_M - 1) // SWAP_MAX_M)


def fp8_gemm_decode_spec(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, c: torch.Tensor,
                         tile: dict, config: triton.Config = CONFIG) -> LaunchSpec:
    """The launch into c [M, N] of `tile` (SWAP_TILE or DIRECT_TILE, or another {SWAP_AB, BLOCK_M}) at `config`
    (CONFIG, pinned, or a benchmark's {BLOCK_N} Config, launched as it is); inputs checked by the caller, M may be
    symbolic."""
    m, k = a.shape
    n = b.shape[0]
    block_n = config.kwargs["BLOCK_N"]
    args = (a, a_s, b, b_s, c, m, n, k, a.stride(0), a_s.stride(0), b.stride(0), b_s.stride(0), c.stride(0))
    kwargs = dict(tile, BLOCK_K=QUANT_BLOCK, EVEN_K=k % QUANT_BLOCK == 0, EVEN_N=n % block_n == 0)
    grid = lambda meta: (cdiv(n, block_n), cdiv(m, tile["BLOCK_M"]))  # noqa: E731
    return LaunchSpec(_fp8_gemm_decode_kernel, _PINNED if config is CONFIG else None, [config], grid, args, kwargs)


def tile_for(m: int) -> dict:
    """The tile for an eager call of m rows."""
    return SWAP_TILE if m <= SWAP_MAX_M else DIRECT_TILE


def fp8_gemm_decode(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16, *, tile: dict | None = None,
                    config: triton.Config | None = None) -> torch.Tensor:
    """a fp8 [M <= 64, K] with a_s, b fp8 [N, K] with b_s -> [M, N] in out_dtype (fp8_gemm's contract, W8A8).
    tile: SWAP_TILE / DIRECT_TILE (default: tile_for(M)); config: CONFIG (default) or a benchmark's {BLOCK_N}."""
    m, n, k = check_blockwise_gemm("fp8_gemm_decode", a, a_s, b, b_s, out_dtype, OUT_DTYPES, (FP8_DTYPE,))
    if m > MAX_M:
        raise ValueError(f"fp8_gemm_decode: M={m} > {MAX_M}; larger M runs fp8_gemm's prefill tiles")
    config = config or CONFIG
    if QUANT_BLOCK % config.kwargs["BLOCK_N"]:
        raise ValueError(f"fp8_gemm_decode: BLOCK_N={config.kwargs['BLOCK_N']} must divide 128 (one scale row)")
    return decode_checked(a, a_s, b, b_s, out_dtype, tile, config)


def decode_checked(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype,
                   tile: dict | None = None, config: triton.Config = CONFIG) -> torch.Tensor:
    """fp8_gemm_decode on operands its caller has checked (fp8_gemm: one set of checks per decode step)."""
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0 or k == 0:
        return c.zero_()
    launch(*fp8_gemm_decode_spec(a, a_s, b, b_s, c, tile or tile_for(m), config), None)
    return c
