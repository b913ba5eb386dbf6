"""FP8 blockwise-scaled GEMM: C = (A * a_s) @ (B * b_s)^T, as in DeepSeek-V3's fp8 Linear.

Layouts:
  a   fp8 e4m3fn [M, K] (activations), a_s fp32 [M, ceil(K/128)]        (one scale per 1x128)
  b   fp8 e4m3fn [N, K] (weight, nn.Linear layout), b_s fp32 [ceil(N/128), ceil(K/128)] (128x128)
  c   [M, N] in out_dtype (bf16 by default)
Weight-only (W8A16, dsv3::fp8_linear(act_quant=False)): a is bf16/fp16 and a_s is None; the fp8
tile is widened to a's dtype in registers (exact) and each K block's partial is scaled by b_s
only. (The torch reference rounds dequant(w) to bf16 first; the kernel does not: it is the more
accurate of the two, within one bf16 rounding of w per element.)

Algorithm (tutorial-03 tiling with per-K-block scales): a program owns a [BLOCK_M, BLOCK_N] tile
of C and walks K in steps of exactly 128 (the scale block), so each step's fp8 x fp8 -> fp32 dot
is multiplied by a_s[m, kb] (a column vector) times b_s[n // 128, kb] (a row vector) before it is
added to the fp32 accumulator. Tiles are visited in GROUP_M super-rows for L2 reuse. M, N and K
may be ragged: loads are masked with zero fill and stores are masked. The dot never accumulates
across K blocks inside the tensor core (e.g. by rescaling the accumulator by s[k-1] / s[k] and
passing it to tl.dot): Hopper's fp8 wgmma accumulation keeps ~14 bits (DeepSeek-V3 report, ~2%
max error at K=4096), so every 128-wide partial is added in CUDA-core fp32, as DeepGEMM does.

Tensor cores (sm_90, checked on the PTX by tests/kernels/test_compile_sm90.py): tiles of 64+ rows
compile to wgmma with e4m3 operands and an fp32 accumulator; the 16/32-row decode tiles to
mma.sync after an exact e4m3 -> f16 widening (Triton has no fp8 mma.sync on sm_90; decode is
weight-read bound). W8A16 widens the fp8 tile to bf16 (exact) for a bf16 wgmma / mma.sync. No
operand is ever upcast to fp32 on the GPU: UPCAST is set only under the CPU interpreter, whose
bf16 dot is wrong.

Split-K (decode): M <= DECODE_MAX_M = 64 reads 2-22 MB of fp8 weight for a few MFLOP, so the
cost is the weight read, and that needs many CTAs with loads in flight. When the N tiles alone
leave SMs idle (N=2048: 32 tiles of 64 on 132 SMs) the K loop is split over SPLIT_K programs that
store fp32 partial tiles into a [SPLIT_K, M, N] workspace; one small kernel sums them in split
order (deterministic, unlike atomics) and casts to out_dtype. The launcher chooses SPLIT_K.

The fp8 a arrives quantized (fp8_linear: a separate act_quant launch, kernels/fp8_quant.py). A form
that quantized its A tiles inside the K loop (one launch, the same bits) took ~22 us per GEMM against
~6 us for act_quant (~2.5 us) + GEMM on the H200 (session 5, 16b decode shapes) and was removed in
session 14 (benchmarks/RESULTS.md).

Scales: a tile of BLOCK_N <= 128 columns lies in one 128-row block of the weight (tiles are
BLOCK_N-aligned and BLOCK_N divides 128), so b_s is one scalar per K step, folded into the [BM]
row scales before the [BM, BN] multiply; only 256-wide tiles load a per-column b_s vector.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import (FP8_DTYPE, QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv,
                                         check_blockwise_gemm, check_tensor, is_interpreted, launch, next_pow2,
                                         num_sms)
from dsv3_export.kernels.fp8_gemm_decode import decode_checked
from dsv3_export.kernels.fp8_gemm_persistent import fp8_gemm_tma_persistent
from dsv3_export.kernels.fp8_quant import act_quant as act_quant_kernel
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.reference import fp8 as fp8_ref

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# fp8_gemm(variant=...): "default" is this file's kernel; "tma_persistent" the Hopper prefill
# candidate in fp8_gemm_persistent.py: faster at M=4096 on the H200 (session 8: 64x128 on 2 CTAs per SM
# 0.77x / 0.63x of blockwise _scaled_mm at w1/w3 / w2 against this kernel's 0.64x / 0.47x), but eager-only
# (its device-side descriptors are untested inside AOTInductor), so the packages' prefill keeps "default".
# "gluon": kernels/fp8_gemm_gluon.py, Hopper only, eager-only (host-side descriptors), no CPU interpreter; the
# fastest at the 16b prefill shapes on the H200 (session 28, its warp-specialized form: 0.99x / 0.92x of blockwise
# _scaled_mm at w1/w3 / w2).
# "tile": this file's kernel at every M, also where "default" hands decode calls to kernels/fp8_gemm_decode.py (W8A8
# at M <= 64 on weights that need no split of K: 1.02-1.12x of blockwise _scaled_mm at w1/w3 on the H200, session 31,
# against this kernel's 0.67-0.99x autotuned).
VARIANTS = ("default", "tile", "tma_persistent", "gluon")
DENSE_DTYPES = (torch.bfloat16, torch.float16)
# Largest split of the K loop; more adds reduction traffic without adding useful parallelism.
MAX_SPLIT_K = 16

# Decode (small M) wants narrow N tiles to spread the weight read over many SMs; prefill wants
# big tiles for tensor-core reuse. Two tuned entry points instead of one list with a prune hook,
# because torch.library.wrap_triton (AOTInductor) does not support prune_configs_by.
# Numbers below: shared memory / registers per thread of the fp8 x fp8 kernel from ptxas on sm_90
# (python -m tests.kernels._sm90_compile --all-configs --ptxas-v); CTAs at the 16b shapes.
#
# Decode, M <= 64: 22 MB of weight for w1/w3 (N=10944, K=2048) and w2 (N=2048, K=10944), 5.3 us
# at 4.2 TB/s. w1/w3: 171 N tiles of 64 (342 of 32), no split; w2: 32 N tiles x split 9 = 288
# CTAs (576 at BLOCK_N 32). A 16x64 s4 CTA keeps 3 x 8 KB of weight in flight in 30 KB of shared
# memory (72 registers), so several CTAs share an SM; its K step is ~180 instructions per thread
# (64 e4m3 -> f16 converts, 16 mma.sync): far below the memory time, the weight read is the cost.
DECODE_CONFIGS = [  # M <= 64 streams the weight: many CTAs, deep cp.async pipelines, mma.sync tiles
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 8}, num_warps=2, num_stages=6),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),  # wgmma
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),  # wgmma
]
# Prefill (M=4096) is compute bound: wgmma tiles from BLOCK_M = 64. Every K step's dot starts from
# zero and its fp32 partial is scaled into the fp32 accumulator (DeepGEMM's promotion: the fp8
# tensor-core accumulation is imprecise over long K), so the partial and the accumulator are both
# live: a 128x128 tile on 8 warps holds 2 x 64 fp32 registers per thread (190 in all) and one CTA
# per SM; the wgmma waits while its partial is promoted (64 FFMA) and the next stage's cp.async is
# issued (~120 instructions per thread after the wait, ~200 per step). 128x256 / 256x128 would
# need 2 x 128 and spill (128x256 as two 128-column dots per K step spills too, checked).
# 64x128 on 4 warps lets two (173 registers, 96 KB) or three (maxnreg=168, 72 KB) CTAs share an
# SM, so one CTA's promotion overlaps another's wgmma, for 1.33x the L2 -> SM bytes per flop.
# M=4096: N=10944 is 32 x 86 = 2752 tiles of 128x128 (20.8 waves at one CTA per SM), N=2048 is
# 512 tiles (3.9 waves of 86 K steps); at 64x128 5504 / 1024 tiles, 396 resident at 3 per SM.
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),  # 128 KB
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),  # 96 KB
    # 168 registers (16 B spill) and 72 KB of shared memory: three CTAs per SM instead of two.
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=3, maxnreg=168),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),  # 96 KB
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),  # 97 KB, 202 regs
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),  # 121 KB, 230 regs
]
# Every distinct config once (the tests run each; the two lists share 64x128 w4 s4).
FP8_GEMM_CONFIGS = list({str(c): c for c in DECODE_CONFIGS + PREFILL_CONFIGS}.values())
# M at or below this uses the decode tiles (and may split K).
DECODE_MAX_M = 64
# Split K until the weight's N tiles (at BLOCK_N = 64) times the split give this many CTAs per SM:
# the weight read needs every SM busy with a few loads in flight.
DECODE_CTAS_PER_SM = 2
SPLIT_K_SUM_BLOCK = 256  # M=1, N=2048: 8 programs instead of 2
SPLIT_K_SUM_CONFIGS = [triton.Config({}, num_warps=4)]  # built once: a Config per call costs host time


@waits_for_producer
@triton.jit
def _fp8_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cs, stride_cm,
    K_BLOCKS_PER_SPLIT, SPLIT_K,  # SPLIT_K: unused in the body, a runtime arg only to key the autotuner
    A_FP8: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- tile ids, grouped along M for L2 reuse of B tiles
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = a_ptr + offs_m[:, None] * stride_am
    b_cols = b_ptr + offs_n[None, :] * stride_bn
    a_s_rows = a_s_ptr + offs_m * stride_asm
    if BLOCK_N <= BLOCK_K:  # the tile lies in one 128-column scale block: one b_s per K step
        b_s_cols = b_s_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn
    else:
        b_s_cols = b_s_ptr + (offs_n // BLOCK_K) * stride_bsn

    k_blocks = tl.cdiv(K, BLOCK_K)
    kb_start = pid_k * K_BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + K_BLOCKS_PER_SPLIT, k_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        if BLOCK_N <= BLOCK_K:
            b_s = tl.load(b_s_cols + kb)  # scalar
        else:
            b_s = tl.load(b_s_cols + kb, mask=mask_n, other=0.0)[None, :]  # [1, BN]
        if A_FP8:
            a_s = tl.load(a_s_rows + kb, mask=mask_m, other=0.0)
            if BLOCK_N <= BLOCK_K:  # fold the scalar into the row scales: BM multiplies, not BM * BN
                acc += tl.dot(a, b) * (a_s * b_s)[:, None]
            else:
                acc += tl.dot(a, b) * a_s[:, None] * b_s
        else:  # weight-only: e4m3 -> bf16/fp16 is exact, the block scale multiplies the fp32 partial
            if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            else:
                b = b.to(a.dtype)
            acc += tl.dot(a, b) * b_s

    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@waits_for_producer
@triton.jit
def _split_k_sum_kernel(ws_ptr, c_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """c[i] = sum over s of ws[s, i] (fp32, in split order: deterministic), stored in c's dtype.
    One launch for the split-K reduction and the output cast ([S, M, N] and [M, N] contiguous).

    SPLIT_K is a constexpr so that the loop unrolls and every split's load is issued before the
    first add: with a runtime trip count each load waited for the previous add, one L2 round trip
    per split (Nsight Compute, H200, M=1: 3.4-5.5 us for 2-4 programs summing 4-8 splits)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


_INTERPRETED = is_interpreted(_fp8_gemm_kernel)
_TUNE_KEY = ["M_BUCKET", "N", "K", "SPLIT_K", "A_FP8"]
_fp8_gemm_decode_tuned = autotune_or_single(_fp8_gemm_kernel, DECODE_CONFIGS, key=_TUNE_KEY)
_fp8_gemm_prefill_tuned = autotune_or_single(_fp8_gemm_kernel, PREFILL_CONFIGS, key=_TUNE_KEY)


@functools.lru_cache(maxsize=4096)
def _choose_split_k(m: int, n: int, k_blocks: int, device: torch.device) -> int:
    """Decode is a weight read: split K until the N tiles (at BLOCK_N = 64) times the split give
    DECODE_CTAS_PER_SM CTAs per SM. The M tiles do not count: they re-read the same weight tile
    from L2, so they add no HBM parallelism. Keep at least 2 K blocks per split (one block per
    program is all prologue) and at most MAX_SPLIT_K."""
    if m > DECODE_MAX_M:
        return 1
    n_tiles = cdiv(n, 64)
    target = DECODE_CTAS_PER_SM * num_sms(device)
    if n_tiles >= num_sms(device):
        return 1
    # The partials (written and read back, S * M * N * 8 bytes) stay under half the weight's bytes.
    traffic_cap = (k_blocks * 128) // (16 * max(m, 1))
    split = min(cdiv(target, n_tiles), MAX_SPLIT_K, k_blocks // 2, traffic_cap)
    return max(1, split)


def rounded_split(split: int, k_blocks: int) -> tuple[int, int]:
    """(split, K blocks per split) as the launchers run a requested split of K: no split left empty."""
    per_split = cdiv(k_blocks, split)
    return cdiv(k_blocks, per_split), per_split


def takes_decode_kernel(a_fp8: bool, split: int) -> bool:
    """Whether a decode call runs kernels/fp8_gemm_decode.py instead of the tile kernel: W8A8 with K not split (it
    has no split-K; where the tile kernel splits K, its partials spread a narrow weight over the SMs)."""
    return a_fp8 and split == 1


def config_label(config: triton.Config | None) -> str:
    """'BLOCK_M=16 BLOCK_N=64 GROUP_M=8 w4 s4': a tuning config in one short line (benchmarks)."""
    if config is None:
        return "-"
    kw = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    regs = f" maxnreg={config.maxnreg}" if config.maxnreg else ""
    return f"{kw} w{config.num_warps} s{config.num_stages}{regs}"


def tuned_config(shape_class: str) -> triton.Config | None:
    """The config the autotuner used for the last 'decode' / 'prefill' launch (None when interpreted
    or not yet launched)."""
    tuned = _fp8_gemm_decode_tuned if shape_class == "decode" else _fp8_gemm_prefill_tuned
    return getattr(tuned, "best_config", None)


def fp8_gemm_spec(a: torch.Tensor, a_s: torch.Tensor | None, b: torch.Tensor, b_s: torch.Tensor, c: torch.Tensor,
                  m_bucket: int, per_split: int, split: int, decode: bool) -> LaunchSpec:
    """The GEMM's launch into c ([M, N], or [split, M, N] fp32 partials when split > 1); inputs checked
    by the caller. a_s None: weight-only. m_bucket: the autotune key's M (a power of 2)."""
    m, k = a.shape
    n = b.shape[0]
    a_fp8 = a_s is not None
    a_s_arg = a_s if a_fp8 else b_s  # weight-only: never read
    args = (a, a_s_arg, b, b_s, c, m, n, k, m_bucket, a.stride(0), a_s_arg.stride(0) if a_fp8 else 0, b.stride(0),
            b_s.stride(0), 0 if split == 1 else c.stride(0), n, per_split, split)
    kwargs = dict(A_FP8=a_fp8, UPCAST=_INTERPRETED and not a_fp8, BLOCK_K=QUANT_BLOCK)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    tuned, configs = (_fp8_gemm_decode_tuned, DECODE_CONFIGS) if decode else (_fp8_gemm_prefill_tuned, PREFILL_CONFIGS)
    return LaunchSpec(_fp8_gemm_kernel, tuned, configs, grid, args, kwargs)


def split_k_sum_spec(ws: torch.Tensor, out: torch.Tensor) -> LaunchSpec:
    """The split-K reduction's launch: out [M, N] = ws [S, M, N] (fp32 partials) summed in split order,
    cast to out's dtype; both contiguous (the caller allocates them). M may be symbolic (traced)."""
    split, m, n = ws.shape
    grid = lambda meta: (cdiv(m * n, SPLIT_K_SUM_BLOCK),)  # noqa: E731
    return LaunchSpec(_split_k_sum_kernel, None, SPLIT_K_SUM_CONFIGS, grid, (ws, out, m * n),
                      dict(SPLIT_K=split, BLOCK=SPLIT_K_SUM_BLOCK))


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor | None, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, *, split_k: int | None = None,
             shape_class: str | None = None, config: triton.Config | None = None,
             variant: str = "default") -> torch.Tensor:
    """a [M, K], b fp8 [N, K], b_s fp32 [ceil(N/128), ceil(K/128)] -> [M, N] in out_dtype.

    a fp8 with a_s fp32 [M, ceil(K/128)] (W8A8), or a bf16/fp16 with a_s=None (weight-only W8A16:
    the fp8 weight is widened in registers, never written back dequantized).
    shape_class "decode" / "prefill" picks the tile set (default: from M <= 64); split_k
    overrides the split heuristic. Both let a traced caller with a symbolic M avoid guards on M.
    variant "gluon" runs kernels/fp8_gemm_gluon.py (sm_90 GPUs, eager, the same operand rules as TMA's, a_s of any
    strides: outer-dim-major from act_quant(..., outer_scales=True) saves its warp-specialized kernel a copy).
    variant "tma_persistent" runs the Hopper prefill candidate (kernels/fp8_gemm_persistent.py:
    TMA loads, persistent CTAs; fp8 a only, no split-K, 16-byte aligned rows) on any M; config
    then names one of its TMA_PERSISTENT_CONFIGS. "default" is the kernel above, except that W8A8 decode calls
    whose K is not split and that pin no config run kernels/fp8_gemm_decode.py; "tile" is the kernel above always.
    """
    if variant not in VARIANTS:
        raise ValueError(f"fp8_gemm: variant={variant!r} must be one of {VARIANTS}")
    # the Gluon kernels read a_s through both strides: the warp-specialized one wants it outer-dim-major
    # (act_quant(..., outer_scales=True)) and copies it so otherwise
    m, n, k = check_blockwise_gemm("fp8_gemm", a, a_s, b, b_s, out_dtype, OUT_DTYPES, (FP8_DTYPE,) + DENSE_DTYPES,
                                   a_s_any_strides=variant == "gluon")
    dev = a.device
    a_fp8 = a.dtype == FP8_DTYPE
    k_blocks = cdiv(k, QUANT_BLOCK)
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=dev)
    if variant in ("tma_persistent", "gluon"):
        if not a_fp8:
            raise ValueError(f"fp8_gemm: variant={variant!r} needs fp8 a with a_s (W8A8); "
                             "the weight-only path runs on variant='default'")
        if split_k not in (None, 1):
            raise ValueError(f"fp8_gemm: variant={variant!r} does not split K (split_k={split_k})")
        if variant == "gluon":
            if config is not None:
                raise ValueError("fp8_gemm: variant='gluon' takes no triton.Config (fp8_gemm_gluon's arguments "
                                 "pick its tile)")
            from dsv3_export.kernels.fp8_gemm_gluon import fp8_gemm_gluon  # imports Gluon only when asked for

            return fp8_gemm_gluon(a, a_s, b, b_s, out_dtype)
        return fp8_gemm_tma_persistent(a, a_s, b, b_s, out_dtype, config)
    if shape_class not in (None, "decode", "prefill"):
        raise ValueError(f"fp8_gemm: shape_class={shape_class!r} must be 'decode', 'prefill' or None")
    decode = shape_class == "decode" if shape_class else m <= DECODE_MAX_M
    if split_k is None:
        split_k = _choose_split_k(m, n, k_blocks, dev) if decode else 1
    split = split_k
    if not 1 <= split <= k_blocks:
        raise ValueError(f"fp8_gemm: split_k={split} must be in [1, ceil(K/128)={k_blocks}]")
    split, per_split = rounded_split(split, k_blocks)
    if variant == "default" and decode and m <= DECODE_MAX_M and config is None and takes_decode_kernel(a_fp8, split):
        return decode_checked(a, a_s, b, b_s, out_dtype)
    if split == 1:
        c = torch.empty((m, n), dtype=out_dtype, device=dev)
    else:
        c = torch.empty((split, m, n), dtype=torch.float32, device=dev)  # [S, M, N] partials
    launch(*fp8_gemm_spec(a, a_s, b, b_s, c, min(next_pow2(m), 4096), per_split, split, decode), config)
    if split > 1:  # the deterministic split-K reduction, cast to out_dtype in the same pass
        out = torch.empty((m, n), dtype=out_dtype, device=dev)
        launch(*split_k_sum_spec(c, out), None)
        return out
    return c


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out_dtype: torch.dtype | None = None,
               *, act_quant: bool = True, shape_class: str | None = None) -> torch.Tensor:
    """y = x @ dequant(w, w_s)^T: x [..., K] -> [..., N].

    act_quant=True: x is quantized 1x128 on the fly (W8A8, dsv3::fp8_linear(act_quant=True)).
    act_quant=False: weight-only (W8A16) for bf16/fp16 x. shape_class: see fp8_gemm.
    """
    check_tensor("fp8_linear: x", x, dtypes=(torch.bfloat16, torch.float16, torch.float32))
    if x.dim() == 0:
        raise ValueError("fp8_linear: x must have at least 1 dim [..., K]")
    if not act_quant and x.dtype not in DENSE_DTYPES:
        raise TypeError(f"fp8_linear: the weight-only path needs bf16/fp16 x, got {x.dtype}")
    k = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # [M, K] (not -1: ambiguous at K = 0)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if act_quant:
        q, s = act_quant_kernel(x2)
        y = fp8_gemm(q, s, w, w_s, out_dtype=out_dtype or x.dtype, shape_class=shape_class)  # [M, N]
    else:
        y = fp8_gemm(x2, None, w, w_s, out_dtype=out_dtype or x.dtype, shape_class=shape_class)  # [M, N]
    return y.view(*x.shape[:-1], w.shape[0])


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor | None, b: torch.Tensor, b_s: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize both operands in fp32 and multiply: the same quantized inputs as the kernel."""
    a_f = fp8_ref.act_dequant(a, a_s, torch.float32) if a_s is not None else a.float()
    b_f = fp8_ref.weight_dequant(b, b_s, torch.float32)
    return (a_f @ b_f.T).to(out_dtype)


def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out_dtype: torch.dtype | None = None,
                   *, act_quant: bool = True) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if act_quant:
        y = fp8_gemm_ref(*fp8_ref.act_quant(x2), w, w_s, out_dtype=out_dtype or x.dtype)
    else:
        y = fp8_gemm_ref(x2, None, w, w_s, out_dtype=out_dtype or x.dtype)
    return y.view(*x.shape[:-1], w.shape[0])
