"""FP8 blockwise GEMM for Hopper prefill: persistent CTAs, TMA tensor-descriptor loads and stores.

A candidate next to fp8_gemm's default prefill kernel (kernels/fp8_gemm.py), selected with
fp8_gemm(..., variant="tma_persistent"); same layouts, same math, same precision:
  a fp8 e4m3fn [M, K], a_s fp32 [M, ceil(K/128)]; b fp8 e4m3fn [N, K], b_s fp32 [ceil(N/128), ceil(K/128)]
  c [M, N] in out_dtype. Every 128-wide K block's fp8 wgmma partial starts from zero and is
  promoted into the fp32 accumulator as partial * a_s[m, kb] * b_s[n // 128, kb] (DeepGEMM style:
  never accumulate across K blocks inside the tensor core, whose fp8 accumulation keeps ~14 bits).

Why it beats the default kernel at M=4096 (H200, session 5: 0.63-0.79x blockwise cuBLAS against the
default's 0.48-0.66x; still short of par):
- TMA (tl.make_tensor_descriptor) moves a 128x128 fp8 tile with one instruction from one thread
  and zero-fills out-of-bounds rows/columns itself: no per-thread address arithmetic, masks or
  cp.async issue in the K loop, so the issue slots between two wgmmas go to the promotion FFMAs.
  (Registers are not what it saves: 128x128 on 8 warps is ~180 per thread either way, no spill.)
- Persistent CTAs (grid = SMs x CTAS_PER_SM, a tl.range tile loop in GROUP_M order): no launch
  tail per tile, and with FLATTEN (tl.range(flatten=True); every config but one sweep candidate)
  the software pipeliner runs the next tile's TMA loads while this tile's epilogue (cast, TMA
  store) executes.
- No warp specialization: a 128x128 w4 config with tl.range(warp_specialize=True) (Hopper autoWS,
  a producer warpgroup for the TMA loads, two consumers) was the fastest on the H200 (0.91x cuBLAS
  at w1/w3 M=4096, session 5) but WRONG there: mean rel. error 0.11 at both 16b shapes, triton
  3.6, while the same kernel without it is right (1.4e-3). Likely cause (not proven: the CPU
  interpreter ignores warp specialization, so no test here can see it): triton-lang/triton#8311,
  open, wrong results from warp_specialize=True when the loop mixes pointer tl.loads with
  descriptor loads, which is this loop's shape (a_s, b_s are pointer loads beside the a, b TMA
  loads). Nor is the form that issue suggests (session 26, removed in session 27): every load of
  the K loop through a descriptor, the scales too (a_s as [K blocks, M], b_s spread per column to
  [K blocks, N]), 128x128 WS: on the H200 (triton 3.6) its output was NaN at both 16b prefill
  shapes and it took 0.48 ms against 0.20-0.24 for the 64x128 forms (benchmarks/RESULTS.md).
TMA needs 16-byte aligned row strides: K % 16 == 0 for a and b, N * itemsize % 16 == 0 for c
(the 16b shapes: K 2048 / 10944, N 10944 / 2048 all qualify); the launcher refuses the rest with
a message. W8A8 only (a fp8): W8A16 would widen b in registers, which TMA -> wgmma bypasses.

Device-side descriptors need global scratch (128 B each, written by the kernel): the launcher
installs a torch allocator with triton.set_allocator when none is set. AOTInductor allocates that
scratch itself for user Triton kernels with device-side TMA (pytorch PR #155896, torch >= 2.8),
but that is not tested here: the variant is for eager use and benchmarks until it is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import (QUANT_BLOCK, autotune_or_single, cdiv, is_interpreted, launch, next_pow2,
                                         num_sms, tracing)
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

# TMA: the global address and every stride but the last must be multiples of 16 bytes.
TMA_ALIGN = 16
# Smem per 128x128 tile pair per stage: 16 KB of a + 16 KB of b; the bf16 epilogue tile is 32 KB.
# CTAS_PER_SM is how many CTAs the launcher keeps resident per SM (the grid): it must agree with
# the registers and shared memory. ptxas on sm_90, triton 3.6 and 3.9 alike, bf16 c (fp32 c adds
# 32 / 16 KB of epilogue tile, and then 64x128 no longer fits twice per SM: correct, but the
# second CTA waits). Numbers from python -m tests.kernels._sm90_compile --all-configs --ptxas-v:
#   128x128 w8 s4:        256 threads, 177-182 registers, 0 spill, 160 KB  -> 1 CTA / SM
#   64x128  w4 s4:        128 threads, 177-182 registers, 0 spill, 112 KB -> 2 CTAs / SM
TMA_PERSISTENT_CONFIGS = [
    # 4 stages x 32 KB + 32 KB epilogue = 160 KB, one CTA per SM; the pipeliner overlaps tiles.
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "CTAS_PER_SM": 1, "SCALE_PREFETCH": False,
                   "FLATTEN": True},
                  num_warps=8, num_stages=4),
    # 64x128 on one warpgroup, two CTAs per SM: one CTA's promotion FFMAs overlap the other's wgmma.
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "CTAS_PER_SM": 2, "SCALE_PREFETCH": False,
                   "FLATTEN": True},
                  num_warps=4, num_stages=4),
]


def _candidate(block_m: int, ctas_per_sm: int, stages: int, prefetch: bool, maxnreg: int | None = None,
               flatten: bool = True):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": 128, "GROUP_M": 8, "CTAS_PER_SM": ctas_per_sm,
                          "SCALE_PREFETCH": prefetch, "FLATTEN": flatten},
                         num_warps=block_m // 16, num_stages=stages, maxnreg=maxnreg)


# The prefill sweep (benchmarks/kernels.py section fp8_prefill pins each one; autotuning above is
# unchanged: on the H200, session 8, none beat the existing 64x128 x2 s4 at w2 (0.63x of blockwise
# _scaled_mm) and the scale prefetch gained 1% at w1/w3 (0.77x), lost 4% at w2; 3 CTAs per SM and
# 128x128 were slower). Why these, from the sm_90 PTX / SASS of the loop
# (triton 3.9, 64x128): a K step is 4 QGMMA, then WARPGROUP.DEPBAR 0 (the wait), 64 FFMA of
# promotion, 4 BAR.SYNC around the TMA re-issue and ~100 other instructions. A dot whose fp32
# partial is read in the same step is never left in flight (deferring the promotion by one step,
# or two dots per step, compiled to the same wait 0 with 250+ registers), so a warpgroup's tensor
# core idles through all of that; only ANOTHER independent warpgroup on the SM fills the gap. The
# two warpgroups of a 128x128 w8 CTA do not: the bar.syncs keep them in lockstep. So the levers
# are (1) a shorter gap, (2) more independent CTAs per SM:
# - SCALE_PREFETCH: a_s / b_s for K block kb + 1 are loaded during step kb (the pipeliner stages
#   only the dot-fed TMA loads; the scales were plain ld.global issued just before the wgmma and
#   waited on right after it, an L2 round trip per step). Registers: 182 -> 171 (bf16 c, both tiles).
# - 64x128 on three CTAs per SM: 2 stages (64 KB shared each), maxnreg 168 (161 used, no spill).
# - 128x128 with 5 stages (192 KB; 224 KB with an fp32 c): deeper TMA prefetch for the one-CTA form.
# - FLATTEN=False: the tile loop and the K loop stay nested; the K loop then carries no per-step
#   tile-boundary logic (the flattened loop re-selects a zeroed accumulator and tests for the
#   epilogue every step), at the cost of a pipeline refill per tile that the other CTAs cover.
# Tried and not offered (ptxas, sm_90): 128x256 w8 and 64x256 w4 (255 registers, 220-244 B spilled:
# a 64x256 partial and accumulator are 256 registers per thread); a 128x128 tile on ONE warpgroup
# as two 64-row dots per step (255 registers, 268-388 B spilled: both dots are issued before either
# promotion; a tl.debug_barrier between them turned the software pipelining off). Split-K for w2
# (N=2048, K=10944): 512 tiles of 128x128 are 3.9 waves of 132 (3% tail), while a split of 2 writes
# and re-reads two 32 MB fp32 partials (~30 us at 4.2 TB/s against a ~150 us GEMM). A
# warp-specialized loop: wrong on the H200 (see the module docstring).
PREFILL_CANDIDATES = {
    "64x128 x2 s4": TMA_PERSISTENT_CONFIGS[1],
    "64x128 x2 s4 pf": _candidate(64, 2, 4, True),
    "64x128 x3 s2 pf": _candidate(64, 3, 2, True, maxnreg=168),
    "64x128 x3 s2 pf nest": _candidate(64, 3, 2, True, maxnreg=168, flatten=False),
    "128x128 x1 s4": TMA_PERSISTENT_CONFIGS[0],
    "128x128 x1 s4 pf": _candidate(128, 1, 4, True),
    "128x128 x1 s5 pf": _candidate(128, 1, 5, True),
}


@waits_for_producer
@triton.jit
def _fp8_gemm_tma_persistent_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: unused in the body, a runtime arg only to key the autotuner
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    CTAS_PER_SM: tl.constexpr, SCALE_PREFETCH: tl.constexpr, FLATTEN: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    tl.static_assert(BLOCK_N <= BLOCK_K, "a tile must lie in one 128-row block of b_s (one scale per K step)")
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_blocks = tl.cdiv(K, BLOCK_K)
    group_size = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        # -- tile ids, grouped along M for L2 reuse of b tiles (as the default kernel)
        first_m = (tile // group_size) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group_size) % group_m
        pid_n = (tile % group_size) // group_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        a_s_rows = a_s_ptr + offs_m * stride_asm
        b_s_row = b_s_ptr + (off_n // BLOCK_K) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SCALE_PREFETCH:  # the scales of K block kb + 1 are in flight while step kb runs
            s_next = tl.load(a_s_rows, mask=offs_m < M, other=0.0) * tl.load(b_s_row)  # [BM]
            for kb in range(k_blocks):
                a = a_desc.load([off_m, kb * BLOCK_K])  # [BM, BK], zero-filled past M and K
                b = b_desc.load([off_n, kb * BLOCK_K])  # [BN, BK], zero-filled past N and K
                s = s_next
                kn = tl.minimum(kb + 1, k_blocks - 1)  # the last step re-reads its own (unused) scales
                s_next = tl.load(a_s_rows + kn, mask=offs_m < M, other=0.0) * tl.load(b_s_row + kn)  # [BM]
                acc += tl.dot(a, b.T) * s[:, None]  # promotion: fresh partial, fp32 FFMA
        else:
            for kb in range(k_blocks):
                a = a_desc.load([off_m, kb * BLOCK_K])  # [BM, BK], zero-filled past M and K
                b = b_desc.load([off_n, kb * BLOCK_K])  # [BN, BK], zero-filled past N and K
                a_s = tl.load(a_s_rows + kb, mask=offs_m < M, other=0.0)  # [BM]
                b_s = tl.load(b_s_row + kb)  # scalar: the tile lies in one 128-row scale block
                acc += tl.dot(a, b.T) * (a_s * b_s)[:, None]  # promotion: fresh partial, fp32 FFMA
        c_desc.store([off_m, off_n], acc.to(c_ptr.dtype.element_ty))  # clipped at M and N by the TMA unit


_INTERPRETED = is_interpreted(_fp8_gemm_tma_persistent_kernel)
_tma_persistent_tuned = autotune_or_single(_fp8_gemm_tma_persistent_kernel, TMA_PERSISTENT_CONFIGS,
                                           key=["M_BUCKET", "N", "K"])


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for device-side tensor descriptors (triton.set_allocator protocol)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Install _scratch unless the caller already set an allocator (theirs wins: last writer wins
    in triton's ContextVar, so never overwrite one)."""
    from triton.runtime import _allocation  # private, but the only way to read the current allocator

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def tma_unsupported(a: torch.Tensor, b: torch.Tensor, c_dtype: torch.dtype, n: int) -> str | None:
    """Why the TMA variant cannot take these operands, or None: TMA wants 16-byte aligned base
    addresses and row strides (a, b: K fp8 bytes per row; c: N * itemsize)."""
    c_row = n * c_dtype.itemsize
    for name, t in (("a", a), ("b", b)):
        if t.data_ptr() % TMA_ALIGN or (t.stride(0) * t.element_size()) % TMA_ALIGN:
            return (f"{name} needs a 16-byte aligned base and row stride for TMA; got row stride "
                    f"{t.stride(0) * t.element_size()} B (K={a.shape[1]} must be a multiple of 16)")
    if c_row % TMA_ALIGN:
        return f"c rows are {c_row} B (N={n} x {c_dtype}); TMA needs a multiple of 16"
    return None


def tuned_config() -> triton.Config | None:
    """The config the autotuner used for the last launch (None when interpreted or not launched)."""
    return getattr(_tma_persistent_tuned, "best_config", None)


def fp8_gemm_tma_persistent(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                            out_dtype: torch.dtype, config: triton.Config | None = None,
                            programs: int | None = None) -> torch.Tensor:
    """Launch on operands fp8_gemm has already checked (shapes, dtypes, unit last stride).
    programs caps the persistent grid (tests: several tiles per program on tiny shapes)."""
    if tracing():  # the alignment check reads data_ptr(), which fake tensors do not have
        raise NotImplementedError("fp8_gemm(variant='tma_persistent') is eager-only (benchmarks) until it is "
                                  "tested inside torch.export / AOTInductor; trace variant='default'")
    m, k = a.shape
    n = b.shape[0]
    reason = tma_unsupported(a, b, out_dtype, n)
    if reason:
        raise ValueError(f"fp8_gemm(variant='tma_persistent'): {reason}")
    if not _INTERPRETED:
        _ensure_allocator()
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    slots = num_sms(a.device)
    cap = programs or 1 << 30
    grid = lambda meta: (min(cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                             slots * meta["CTAS_PER_SM"], cap),)
    launch(_fp8_gemm_tma_persistent_kernel, _tma_persistent_tuned, TMA_PERSISTENT_CONFIGS, grid,
           (a, a_s, b, b_s, c, m, n, k, min(next_pow2(m), 4096),
            a.stride(0), a_s.stride(0), b.stride(0), b_s.stride(0), c.stride(0)),
           dict(BLOCK_K=QUANT_BLOCK), config)
    return c
