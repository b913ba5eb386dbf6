"""FP8 e4m3 blockwise quantization kernels: activation quant (1x128) and weight dequant (128x128).

Layouts (DeepSeek's):
  act_quant       x [M, K] bf16/fp16/fp32 -> q fp8 e4m3fn [M, K], s fp32 [M, ceil(K/128)]
                  s[m, j] = max(amax(|x[m, 128j:128j+128]|), AMAX_FLOOR) / 448 and
                  q = clamp(x / s, -448, 448) rounded to e4m3 (IEEE division x / s, like the
                  oracle). The rounding to e4m3 is done in fp32 arithmetic before the (then exact)
                  cast, so q and s are bit-identical to dsv3_export.reference.fp8.act_quant run on
                  the same device as x.
                  "On the same device" matters for s: the oracle's `amax / 448.0` divides by a
                  Python scalar, which ATen computes as a true division on the CPU but as
                  amax * fp32(1/448) on CUDA (div_true_kernel_cuda: a CPU-scalar divisor becomes a
                  reciprocal multiply). The two differ by one ulp for about half of all amax
                  values, which made every GPU act_quant "not bit-exact" in the first H200 run.
                  Two kernels share one body: _act_quant_kernel has the CUDA form (callers that
                  launch it directly, like engines/torch_triton.py, target the GPU) and
                  _act_quant_ieee_kernel the CPU form; the launcher picks by x's device.
  weight_dequant  w fp8 [N, K], s fp32 [ceil(N/128), ceil(K/128)] -> w * s (broadcast per block).
The last block row/column may be ragged (K=300, N=10944): every load and store is masked.

Algorithm: one program per [BLOCK_M, 128] tile (act_quant) or [BLOCK_N, BLOCK_K] tile (dequant);
each activation row-block's amax is a row reduction of the tile, so no second pass over memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels import _common
from dsv3_export.kernels._common import (FP8_DTYPE, QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv,
                                         check_tensor, launch)
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.reference import fp8 as fp8_ref

# Kernel constants must be tl.constexpr globals for the compiler.
FP8_E4M3_MAX = tl.constexpr(_common.FP8_E4M3_MAX)
AMAX_FLOOR = tl.constexpr(_common.AMAX_FLOOR)
# fp32(1 / 448): what ATen multiplies by on CUDA for `tensor / 448.0` (see the module docstring).
INV_FP8_E4M3_MAX = tl.constexpr(1.0 / _common.FP8_E4M3_MAX)
# e4m3: 3 mantissa bits, smallest normal exponent -6; 1.5 * 2^23 forces fp32 rounding to integers.
FP8_E4M3_MANTISSA_BITS = tl.constexpr(3)
FP8_E4M3_MIN_NORMAL_EXP = tl.constexpr(-6)
RNE_MAGIC = tl.constexpr(12582912.0)
SIGN_BIT = tl.constexpr(-(2**31))  # 0x80000000 as int32

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

ACT_QUANT_CONFIGS = [
    triton.Config({"BLOCK_M": 8}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 1}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=1),
]
# The configs the autotuner picks among (ACT_QUANT_CONFIGS: every config the kernel supports, each tested). Not
# BLOCK_M 32: AOTInductor tunes the decode program once, at batch 64, where the three time alike (~10 us, within
# the noise), and at batch 1 a BLOCK_M 32 pick is slow: session 21's two 16b builds whose act_quant of h (26 calls
# per step) got it spent 99-103 us per batch-1 step in act_quant, the two that got BLOCK_M 8 or 1 spent 42.
ACT_QUANT_TUNED_CONFIGS = ACT_QUANT_CONFIGS[:2]
DEQUANT_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=1),
]


@triton.jit
def _round_to_e4m3(q):
    """Round fp32 q (|q| <= 448) to the nearest e4m3 value (ties to even), staying in fp32.

    The e4m3 spacing is 2^(max(exponent, -6) - 3); adding and subtracting 1.5 * 2^23 rounds
    q / spacing to an integer with the FPU's round-to-nearest-even. The final cast to fp8 is then
    exact everywhere: on the GPU this changes nothing, and it sidesteps the CPU interpreter's
    fp32 -> fp8 conversion, which gets ~2.5% of values wrong (TOOLCHAIN.md).
    """
    bits = q.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    spacing_exp = tl.maximum(exponent, FP8_E4M3_MIN_NORMAL_EXP) - FP8_E4M3_MANTISSA_BITS
    spacing = ((spacing_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_spacing = ((127 - spacing_exp) << 23).to(tl.float32, bitcast=True)
    steps = (q * inv_spacing + RNE_MAGIC) - RNE_MAGIC
    rounded = (steps * spacing).to(tl.int32, bitcast=True)
    # Keep q's sign when it rounds to zero (-0.0, as torch's cast gives).
    return (rounded | (bits & SIGN_BIT)).to(tl.float32, bitcast=True)


@triton.jit
def quantize_rows(x, SCALE_RECIPROCAL: tl.constexpr):
    """fp32 x [BM, 128] (masked entries 0) -> (q on the e4m3 grid, fp32 [BM, 128]; s fp32 [BM]).

    The one copy of act_quant's arithmetic: the act_quant kernels and kernels/fp8_gemv.py (x
    quantized in registers) call it, so their q and s are the same bits.
    """
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)  # [BM]
    if SCALE_RECIPROCAL:  # torch on CUDA: amax * fp32(1/448)
        s = amax * INV_FP8_E4M3_MAX
    else:  # torch on the CPU: IEEE amax / 448
        s = tl.math.div_rn(amax, FP8_E4M3_MAX)
    q = tl.math.div_rn(x, s[:, None])
    return _round_to_e4m3(tl.minimum(tl.maximum(q, -FP8_E4M3_MAX), FP8_E4M3_MAX)), s


@triton.jit
def _act_quant_body(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = quantize_rows(x, SCALE_RECIPROCAL)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + pid_k * stride_sk, s, mask=offs_m < M)


@waits_for_producer
@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_qm, stride_sm, stride_sk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """s = amax * fp32(1/448): torch's oracle as computed on CUDA."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    _act_quant_body(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk, BLOCK_M, BLOCK_K, True)


@waits_for_producer
@triton.jit
def _act_quant_ieee_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_qm, stride_sm, stride_sk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """s = amax / 448 (IEEE): torch's oracle as computed on the CPU."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    _act_quant_body(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk, BLOCK_M, BLOCK_K, False)


@waits_for_producer
@triton.jit
def _weight_dequant_kernel(
    w_ptr, s_ptr, y_ptr,
    N, K,
    stride_wn, stride_sn, stride_yn,
    SCALE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    s_ptrs = s_ptr + (offs_n // SCALE_BLOCK)[:, None] * stride_sn + (offs_k // SCALE_BLOCK)[None, :]
    s = tl.load(s_ptrs, mask=mask, other=0.0)
    tl.store(y_ptr + offs_n[:, None] * stride_yn + offs_k[None, :], (w * s).to(y_ptr.dtype.element_ty), mask=mask)


_act_quant_tuned = autotune_or_single(_act_quant_kernel, ACT_QUANT_TUNED_CONFIGS, key=["K"])
_act_quant_ieee_tuned = autotune_or_single(_act_quant_ieee_kernel, ACT_QUANT_TUNED_CONFIGS, key=["K"])
# Eager act_quant of ACT_QUANT_LARGE_M rows or more tunes apart, among every config. Why: the key above is K alone
# (keyed on M itself it would tune again at every new row count; a bucket would need an argument of its own in the
# kernel's signature, which the packages, tuning each program once, do not need), so in one process the first call
# per K fixed the tile for all M: benchmarks/kernels.py's moe section first quantizes at
# one token, and at 4096 tokens its act_quant of h [24576, 1408] then ran at 0.32 TB/s (session 33, not yet
# re-measured with this split).
ACT_QUANT_LARGE_M = 1024
_act_quant_large_m_tuned = {
    True: autotune_or_single(_act_quant_kernel, ACT_QUANT_CONFIGS, key=["K"]),
    False: autotune_or_single(_act_quant_ieee_kernel, ACT_QUANT_CONFIGS, key=["K"]),
}
_weight_dequant_tuned = autotune_or_single(_weight_dequant_kernel, DEQUANT_CONFIGS, key=["N", "K"])


def outer_scale_storage(rows, blocks, device: torch.device) -> torch.Tensor:
    """An uninitialized fp32 [rows, blocks] of outer-dim-major strides (1, round_up(rows, 4)): each K block's scales
    contiguous and 16-byte aligned, as TMA (fp8_gemm_gluon's warp-specialized kernel) and blockwise
    torch._scaled_mm read them (rows may be symbolic)."""
    return torch.empty_strided((rows, blocks), (1, cdiv(rows, 4) * 4), dtype=torch.float32, device=device)


def act_quant_outputs(rows, cols, device: torch.device, outer_scales: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant's outputs for a [rows, cols] input, allocated: q fp8 e4m3fn [rows, cols] and s fp32
    [rows, ceil(cols/128)]; also what the kernels that quantize their own output write (rows, cols may
    be symbolic). outer_scales: s in outer_scale_storage's layout."""
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=device)
    blocks = cdiv(cols, QUANT_BLOCK)
    if not outer_scales:
        return q, torch.empty((rows, blocks), dtype=torch.float32, device=device)
    return q, outer_scale_storage(rows, blocks, device)


def act_quant(x: torch.Tensor, block_size: int = QUANT_BLOCK, *, config: triton.Config | None = None,
              scale_reciprocal: bool | None = None, outer_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q fp8 e4m3fn [M, K], s fp32 [M, ceil(K/128)]). `config` forces one tuning config;
    outer_scales: s outer-dim-major (act_quant_outputs), the same values.

    scale_reciprocal: s = amax * fp32(1/448) (True) or amax / 448 (False); default: as torch
    computes the oracle on x's device (True on CUDA), so the result is bit-identical to it.
    """
    check_tensor("act_quant: x", x, dtypes=ACT_DTYPES, ndim=2)
    if block_size != QUANT_BLOCK:
        raise ValueError(f"act_quant: block_size={block_size} unsupported; the kernels use {QUANT_BLOCK}")
    if x.stride(1) != 1:
        raise ValueError(f"act_quant: x must have unit stride along K, got strides {x.stride()}")
    m, k = x.shape
    q, s = act_quant_outputs(m, k, x.device, outer_scales)
    if m == 0 or k == 0:
        return q, s
    reciprocal = x.is_cuda if scale_reciprocal is None else scale_reciprocal
    spec = act_quant_spec(x, q, s, reciprocal)
    if spec.tuned is not None and type(m) is int and m >= ACT_QUANT_LARGE_M:  # eager and large: its own tuning
        spec = spec._replace(tuned=_act_quant_large_m_tuned[reciprocal], configs=ACT_QUANT_CONFIGS)
    launch(*spec, config)
    return q, s


def act_quant_spec(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, scale_reciprocal: bool) -> LaunchSpec:
    """act_quant of x [M, K] (unit stride on K) into q [M, K], s [M, ceil(K/128)] (of any strides); the kernel with
    the scale rounding asked for (amax * fp32(1/448), or IEEE amax / 448)."""
    m, k = x.shape
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    kernel, tuned = ((_act_quant_kernel, _act_quant_tuned) if scale_reciprocal
                     else (_act_quant_ieee_kernel, _act_quant_ieee_tuned))
    return LaunchSpec(kernel, tuned, ACT_QUANT_TUNED_CONFIGS, grid,
                      (x, q, s, m, k, x.stride(0), q.stride(0), *s.stride()),
                      dict(BLOCK_K=QUANT_BLOCK))


def weight_dequant(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   block_size: int = QUANT_BLOCK, *, config: triton.Config | None = None) -> torch.Tensor:
    """w fp8 [N, K] + s fp32 [ceil(N/128), ceil(K/128)] -> [N, K] in `dtype`."""
    check_tensor("weight_dequant: w", w, dtypes=(FP8_DTYPE,), ndim=2)
    check_tensor("weight_dequant: s", s, dtypes=(torch.float32,), ndim=2, device=w.device)
    if dtype not in OUT_DTYPES:
        raise TypeError(f"weight_dequant: dtype {dtype} not supported; expected one of {OUT_DTYPES}")
    if block_size != QUANT_BLOCK:
        raise ValueError(f"weight_dequant: block_size={block_size} unsupported; the kernels use {QUANT_BLOCK}")
    n, k = w.shape
    expected = (cdiv(n, block_size), cdiv(k, block_size))
    if tuple(s.shape) != expected:
        raise ValueError(f"weight_dequant: weight {tuple(w.shape)} needs scale shape {expected}, got {tuple(s.shape)}")
    if w.stride(1) != 1 or s.stride(1) != 1:
        raise ValueError(f"weight_dequant: w and s need unit stride along K, got {w.stride()} and {s.stride()}")
    y = torch.empty((n, k), dtype=dtype, device=w.device)
    if n == 0 or k == 0:
        return y
    grid = lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    launch(_weight_dequant_kernel, _weight_dequant_tuned, DEQUANT_CONFIGS, grid,
           (w, s, y, n, k, w.stride(0), s.stride(0), y.stride(0)), dict(SCALE_BLOCK=block_size), config)
    return y


def act_quant_ref(x: torch.Tensor, block_size: int = QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-torch oracle (dsv3_export.reference.fp8.act_quant)."""
    return fp8_ref.act_quant(x, block_size)


def weight_dequant_ref(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                       block_size: int = QUANT_BLOCK) -> torch.Tensor:
    """The pure-torch oracle (dsv3_export.reference.fp8.weight_dequant)."""
    return fp8_ref.weight_dequant(w, s, dtype, block_size)
