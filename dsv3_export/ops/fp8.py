"""dsv3::fp8_linear: y = x W^T with W stored as fp8 e4m3 + one fp32 scale per 128x128 block.

    dsv3::fp8_linear(x [..., K], weight fp8 [N, K], scale fp32 [ceil(N/128), ceil(K/128)],
                     act_quant: bool) -> [..., N] in x.dtype

act_quant=False (weight-only): F.linear(x, dequant(W) in x.dtype): exactly what the reference
Linear does with an fp8 checkpoint, so rewriting an fp8 model's dequant subgraph into this op
changes no bit.
act_quant=True: x is quantized 1x128 (dynamic, per token and 128-wide K block) and the product is
computed the way the fp8 GEMM kernel computes it (kernels/fp8_gemm.py, DeepSeek's kernel.py):
for each 128-wide K block, an fp8 x fp8 dot accumulated in fp32 (products of e4m3 values are
exact in fp32) times a_s[m, kb] * b_s[n // 128, kb], summed over blocks in fp32.

The CPU body below is the reference math (pure torch); a CUDA kernel is registered for the same
op with register_kernel, so the signature stays tensor-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3_export.reference.fp8 import FP8_DTYPE, act_quant, cdiv, weight_dequant

# Edge of a weight scale block and length of an activation scale block. The ops have no
# block-size argument: every DeepSeek fp8 checkpoint and kernel uses 128.
FP8_BLOCK = 128


def check_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    """Clear errors for a malformed fp8 weight / scale pair (2-D, or stacked 3-D for experts)."""
    torch._check(weight.dtype == FP8_DTYPE, lambda: f"{what}: weight must be {FP8_DTYPE}, got {weight.dtype}")
    torch._check(scale.dtype == torch.float32, lambda: f"{what}: scale must be float32, got {scale.dtype}")
    torch._check(weight.dim() == scale.dim(),
                 lambda: f"{what}: weight {tuple(weight.shape)} and scale {tuple(scale.shape)} differ in rank")
    n, k = weight.shape[-2:]
    expected = (*weight.shape[:-2], cdiv(n, FP8_BLOCK), cdiv(k, FP8_BLOCK))
    torch._check(tuple(scale.shape) == expected,
                 lambda: f"{what}: weight {tuple(weight.shape)} needs scale {expected}, got {tuple(scale.shape)}")


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant_x: bool) -> torch.Tensor:
    """x [M, K] @ dequant(weight [N, K], scale)^T -> [M, N] in x.dtype (see the module docstring)."""
    if not act_quant_x:
        return F.linear(x, weight_dequant(weight, scale, x.dtype, FP8_BLOCK))
    m, k = x.shape
    n = weight.shape[0]
    xq, xs = act_quant(x, FP8_BLOCK)  # [M, K] fp8, [M, kb] fp32
    xq, wq = xq.to(torch.float32), weight.to(torch.float32)  # exact: e4m3 values are fp32 values
    w_rows = scale.to(torch.float32).repeat_interleave(FP8_BLOCK, dim=0)[:n]  # [N, kb]
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    for kb in range(cdiv(k, FP8_BLOCK)):
        cols = slice(kb * FP8_BLOCK, min(k, (kb + 1) * FP8_BLOCK))
        dot = xq[:, cols] @ wq[:, cols].T  # [M, N] fp32 accumulate of one K block
        out += dot * xs[:, kb, None] * w_rows[None, :, kb]
    return out.to(x.dtype)


@torch.library.custom_op("dsv3::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool) -> torch.Tensor:
    check_fp8_weight(weight, scale, "dsv3::fp8_linear")
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"dsv3::fp8_linear: x [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)}")
    lead = x.shape[:-1]
    y = fp8_matmul(x.reshape(-1, x.shape[-1]), weight, scale, act_quant)  # [M, N]
    return y.view(*lead, weight.shape[0])


@fp8_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool) -> torch.Tensor:
    check_fp8_weight(weight, scale, "dsv3::fp8_linear")
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"dsv3::fp8_linear: x [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)}")
    return x.new_empty(*x.shape[:-1], weight.shape[0])
