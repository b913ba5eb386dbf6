"""ONNX lowering of dsv3::fp8_linear, and the fp8 helpers the MoE lowering shares.

Weights stay FLOAT8E4M3FN initializers in model.onnx.data; the graph dequantizes them as the
reference does (fp8 value times its block's fp32 scale, then the compute dtype). On the CPU with
DequantizeLinear blocked along K (ORT's CPU provider rejects the raw 2-D block scale, so the
scales are repeated over the rows of each block at build time; bit-exact with torch), which ORT
keeps as is: fp8 weights stay fp8 in memory. On CUDA with Cast + Mul by the expanded scales:
ORT folds that into a bf16 initializer when the session is created, so a CUDA fp8 engine is
fp8 on disk and bf16 in GPU memory (no blockwise-fp8 GEMM contrib op exists for dense layers,
and whether the CUDA provider has a blocked fp8 DequantizeLinear is unchecked). act_quant=True quantizes the activation 1x128 in the graph (amax / 448 per block, Cast to
FLOAT8E4M3FN with saturation, back to float): the product of the dequantized operands equals the
kernel's per-block fp8 dot products times both scales, up to fp32 summation order.

Standard ONNX on both targets (ORT has no block-scaled fp8 GEMM contrib op for dense layers).
"""

from __future__ import annotations

import torch

from dsv3_export.engines.base import Target
from dsv3_export.engines.onnx_ops import Lowering

FP8_BLOCK = 128
FP8_E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12  # reference/fp8.py: an all-zero block gets a finite scale
_FLOAT, _FLOAT8E4M3FN = 1, 17  # TensorProto.DataType


def _ints(op, *values: int):
    return op.Constant(value_ints=list(values))


def dequant_weight(op, weight, scale, like, keep_fp8: bool = True):
    """fp8 [..., N, K] and fp32 [..., ceil(N/128), ceil(K/128)] -> weight in like's dtype.

    keep_fp8: DequantizeLinear (opset 21, blocked along K, scales repeated over N's blocks at
    build time): ONNX Runtime does not constant-fold it, so the weight stays fp8 in memory and is
    dequantized where it is used. Otherwise Cast + Mul by the fully expanded scales, which ORT
    folds into a dense initializer when the session is created (fp8 on disk only).
    """
    *lead, n, k = weight.shape
    *_, nbn, nbk = scale.shape
    lead_ones = [1] * len(lead)
    if keep_fp8:
        s = op.Unsqueeze(scale, _ints(op, -2))  # [..., nbn, 1, nbk]
        s = op.Expand(s, _ints(op, *lead_ones, 1, FP8_BLOCK, 1))  # [..., nbn, 128, nbk]
        s = op.Reshape(s, _ints(op, *lead, nbn * FP8_BLOCK, nbk))
        s = op.Slice(s, _ints(op, 0), _ints(op, n), _ints(op, -2))  # [..., N, nbk]: folded at build
        w = op.DequantizeLinear(weight, s, axis=len(lead) + 1, block_size=FP8_BLOCK)  # [..., N, K] fp32
        return op.CastLike(w, like)
    s = op.Unsqueeze(scale, _ints(op, -1, -3))  # [..., nbn, 1, nbk, 1]
    s = op.Expand(s, _ints(op, *lead_ones, 1, FP8_BLOCK, 1, FP8_BLOCK))  # [..., nbn, 128, nbk, 128]
    s = op.Reshape(s, _ints(op, *lead, nbn * FP8_BLOCK, nbk * FP8_BLOCK))
    s = op.Slice(s, _ints(op, 0, 0), _ints(op, n, k), _ints(op, -2, -1))  # [..., N, K]
    return op.CastLike(op.Mul(op.Cast(weight, to=_FLOAT), s), like)


def fake_quant_act(op, x, k: int | None = None):
    """x [..., K] -> dequant(act_quant(x)) in x's dtype: 1x128 blocks, scale = amax / 448.

    k: the static last dim, for a computed x whose shape the tracer does not know."""
    k = k if k is not None else x.shape[-1]
    nb = -(-k // FP8_BLOCK)
    xf = op.Cast(x, to=_FLOAT)
    padded = op.Pad(xf, _ints(op, 0, nb * FP8_BLOCK - k), axes=_ints(op, -1))  # [..., nb * 128]
    lead = op.Shape(x, end=-1)
    blocks = op.Reshape(padded, op.Concat(lead, _ints(op, nb, FP8_BLOCK), axis=0))  # [..., nb, 128]
    amax = op.ReduceMax(op.Abs(blocks), _ints(op, -1), keepdims=1)  # [..., nb, 1]
    scale = op.Div(op.Max(amax, op.Constant(value_float=AMAX_FLOOR)), op.Constant(value_float=FP8_E4M3_MAX))
    q = op.Clip(op.Div(blocks, scale), op.Constant(value_float=-FP8_E4M3_MAX), op.Constant(value_float=FP8_E4M3_MAX))
    q = op.Cast(op.Cast(q, to=_FLOAT8E4M3FN), to=_FLOAT)  # round to e4m3 (nearest even), exact back to fp32
    deq = op.Reshape(op.Mul(q, scale), op.Concat(lead, _ints(op, nb * FP8_BLOCK), axis=0))  # [..., nb * 128]
    deq = op.Slice(deq, _ints(op, 0), _ints(op, k), _ints(op, -1))  # [..., K]
    return op.CastLike(deq, x)


def _fp8_linear_for(target: Target):
    def fp8_linear(x, weight, scale, act_quant: bool):
        return _fp8_linear(x, weight, scale, act_quant, keep_fp8=target.device == "cpu")

    return fp8_linear


def _fp8_linear(x, weight, scale, act_quant: bool, keep_fp8: bool):
    from onnxscript import opset21 as op

    w = dequant_weight(op, weight, scale, x, keep_fp8)  # [N, K]
    if act_quant:
        x = fake_quant_act(op, x)
    return op.MatMul(x, op.Transpose(w, perm=[1, 0]))  # [..., N]


def static_weight_reason(node: torch.fx.Node, indices: tuple[int, ...]) -> str | None:
    """None when the args at `indices` are tensors of static shape (weights), else why not."""
    for i in indices:
        arg = node.args[i]
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if val is None or any(not isinstance(d, int) for d in val.shape):
            return f"argument {i} ({arg}) must be a weight of static shape"
    return None


def _describe(target: Target) -> str:
    dequant = ("DequantizeLinear blocked (fp8 kept in memory)" if target.device == "cpu"
               else "Cast + Mul (ORT folds it to bf16 at session creation)")
    return f"standard ONNX: fp8 initializer, {dequant}, MatMul; act_quant: 1x128 fake-quant through FLOAT8E4M3FN"


LOWERINGS = (
    Lowering(op="dsv3::fp8_linear", supports=lambda node, target: static_weight_reason(node, (1, 2)),
             translate=_fp8_linear_for, describe=_describe),
)
