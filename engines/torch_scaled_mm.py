"""W8A8 fp8 Linear through torch._scaled_mm's blockwise form (cuBLAS on Hopper) for the prefill program.

dsv3::fp8_linear's product (1x128 activation scales x 128x128 weight scales, fp32 accumulation per K block) is
cuBLAS's "1D and 128x128 2D block scaling" mode (CUDA 12.9+, sm_90), which torch._scaled_mm runs when given 2-D
scales: scale_a [M, kb] and scale_b [kb, ceil(N/128)], kb = ceil(K/128). What torch 2.11 + cuBLAS on the H200
accept and compute right (benchmarks/cublas_prefill_probe.py, session 30):
  scale_a  outer-dim-major, strides exactly (1, M); other leading dimensions are refused by torch
  M        a multiple of 4 (cuBLAS refuses M = 1 or 5 with CUBLAS_STATUS_NOT_SUPPORTED)
  scale_b  strides exactly (1, kb), and cuBLAS reads it right only when kb is a multiple of 4 (it reads the rows
           round_up(kb, 4) apart: w2's K=10944, kb=86, gave mean rel. errors of ~400); torch refuses padded strides
  N        a multiple of 16 (torch refuses others)
So this path takes weights whose K is a multiple of 512 and N of 16 (at the 16b shapes: the attention's fused
wq+wkv_a, 3648 x 2048, wo and the dense layer's w1 and w3; not its w2, K=10944), and pads M: act_quant writes its
fp8 rows and scales into buffers of round_up(M, 16) rows (the rows past M are left unwritten: each output row
depends only on its own input row and scale, and those rows are cut off), its scales are transposed by one small
copy, and the product's first M rows are returned.
"""

from __future__ import annotations

import functools

import torch

from dsv3_export.engines import torch_launch
from dsv3_export.kernels._common import QUANT_BLOCK, cdiv

M_MULTIPLE = 16  # rows of the activation buffers: cuBLAS needs a multiple of 4; 16 is what the H200 runs checked
K_MULTIPLE = 4 * QUANT_BLOCK  # K whose 128-column blocks come in fours: scale_b's rows as cuBLAS reads them
N_MULTIPLE = 16  # torch._scaled_mm refuses other N ("mat2 shape (1024x200) must be divisible by 16")


def cublas_suits(n: int, k: int) -> bool:
    """Whether a [N, K] fp8 weight can take this path (K a multiple of 512, N of 16)."""
    return k > 0 and n > 0 and k % K_MULTIPLE == 0 and n % N_MULTIPLE == 0


def act_quant_padded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q fp8 [M', K], scale_a fp32 [M', kb] with strides (1, M')), M' = round_up(M, 16), by our
    act_quant kernel over the M rows of x (M may be symbolic); rows M.. of both are unwritten."""
    q, s = torch_launch.act_quant_launch(x, rows=cdiv(x.shape[0], M_MULTIPLE) * M_MULTIPLE)
    return q, s.t().contiguous().t()


def scaled_mm_blockwise(q: torch.Tensor, scale_a: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """q fp8 [M', K] (M' a multiple of 4) with scale_a [M', kb] (strides (1, M')) times w fp8 [N, K] with w_s
    [ceil(N/128), kb] (a weight cublas_suits takes) -> [M', N] in out_dtype, by cuBLAS."""
    return torch._scaled_mm(q, w.t(), scale_a=scale_a, scale_b=w_s.t(), out_dtype=out_dtype)


def fp8_linear_cublas(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """x bf16 [M, K] -> [M, N] in bf16: act_quant (ours) then blockwise torch._scaled_mm. Raises ValueError for
    what cuBLAS would refuse or misread (checked on the static weight shapes: nothing at run time)."""
    n, k = w.shape
    if x.dtype != torch.bfloat16:
        raise ValueError(f"fp8_linear_cublas: x must be bf16 (the dtype measured), got {x.dtype}")
    if not cublas_suits(n, k):
        raise ValueError(f"fp8_linear_cublas: weight [{n}, {k}] needs K a multiple of {K_MULTIPLE} and N of "
                         f"{N_MULTIPLE} (cuBLAS misreads the scales or refuses the product otherwise)")
    if tuple(w_s.shape) != (cdiv(n, QUANT_BLOCK), k // QUANT_BLOCK) or not w_s.is_contiguous():
        raise ValueError(f"fp8_linear_cublas: weight [{n}, {k}] needs contiguous scales "
                         f"[{cdiv(n, QUANT_BLOCK)}, {k // QUANT_BLOCK}], got {tuple(w_s.shape)} {w_s.stride()}")
    q, scale_a = act_quant_padded(x)
    y = scaled_mm_blockwise(q, scale_a, w, w_s, x.dtype)  # [M', N]
    # Its first M rows. Not y[:M]: exporting a module that calls this directly (torch 2.13) guarded M <=
    # round_up(M, 16), which it could not prove for a symbolic M.
    return y.as_strided((x.shape[0], n), (n, 1))


@functools.lru_cache(maxsize=None)
def blockwise_check(device_index: int) -> str | None:
    """None when fp8_linear_cublas computes a small product right on CUDA device `device_index`; otherwise why not
    (cuBLAS 12.9+ on sm_90 has the blockwise mode; torch refuses it elsewhere, or, as torch 2.11 lets through, a
    cuBLAS may misread the scales). Run once per device when a prefill program is lowered with
    DSV3_TORCH_PREFILL_GEMM=auto."""
    from dsv3_export.ops.fp8 import fp8_matmul
    from dsv3_export.reference.fp8 import weight_quant

    device = torch.device("cuda", device_index)
    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    if capability < (9, 0):
        return f"{name} is sm_{capability[0]}{capability[1]}: cuBLAS's blockwise fp8 mode needs sm_90"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(5, 1024, device=device, dtype=torch.bfloat16, generator=g)  # 5 rows: the padded path
    w, w_s = weight_quant(torch.randn(208, 1024, device=device, generator=g) / 32)  # 2 scale rows, one ragged
    try:
        got = fp8_linear_cublas(x, w, w_s).float()
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - whatever torch, cuBLAS or the kernel's compile raises: a reason
        first_line = str(e).partition("\n")[0]
        return f"blockwise torch._scaled_mm failed on {name}: {type(e).__name__}: {first_line}"
    want = fp8_matmul(x, w, w_s, True).float()
    err = ((got - want).abs().mean() / want.abs().mean()).item()
    if not err < 5e-3:  # bf16 rounding is ~1.4e-3; a misread scale gives ~1
        return f"blockwise torch._scaled_mm is wrong on {name} (mean rel. error {err:.3g})"
    return None
