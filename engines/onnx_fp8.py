"""ONNX lowering of dsv3::fp8_linear, and the fp8 helpers the MoE lowering shares.

Weights stay FLOAT8E4M3FN initializers in model.onnx.data; the graph dequantizes them as the
reference does (fp8 value times its block's fp32 scale, then the compute dtype) with
DequantizeLinear blocked along K: ORT's kernels reject the raw 2-D block scale, so the scales are
repeated over the rows of each block at build time (bit-exact with torch, TOOLCHAIN.md), then
CastLike to the compute dtype. The same graph on both targets; what differs is the session:

  cpu:  ORT does not constant-fold DequantizeLinear by default, so the weights stay fp8 in
        memory and are dequantized where they are used.
  cuda: the loader's session options (engines/ort_session.py) let ORT fold every
        DequantizeLinear + Cast at session creation: fp8 on disk, bf16 in GPU memory, the bf16
        engine's graph at run time (no blockwise-fp8 GEMM contrib op exists for dense layers).

Why DequantizeLinear and not Cast + Mul by the expanded scales (the first CUDA lowering): ORT
holds every intermediate its constant-folding pass creates until the pass ends. Measured at
session creation on the 16b shapes with n_layers=2 (one MoE layer), bf16 graph, size limit
raised: peak RSS 17.0 GiB with Cast + Mul (fp32 Cast, Expand, Mul outputs and the bf16 copies)
against 4.8 GiB with DequantizeLinear + Cast, which adds 3.4 GiB per further MoE layer (its fp8,
fp32 and bf16 expert weights): ~90 GiB for the 16b model's 26 MoE layers instead of ~400.

act_quant=True quantizes the activation 1x128 in the graph (amax / 448 per block, Cast to
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


def row_scales(op, scale, n: int):
    """fp32 [..., ceil(N/128), ceil(K/128)] block scales -> [..., N, ceil(K/128)]: each block's scale
    repeated over its 128 rows, the scale layout of DequantizeLinear blocked along K (folded at build)."""
    *lead, nbn, nbk = scale.shape
    s = op.Unsqueeze(scale, _ints(op, -2))  # [..., nbn, 1, nbk]
    s = op.Expand(s, _ints(op, *([1] * len(lead)), 1, FP8_BLOCK, 1))  # [..., nbn, 128, nbk]
    s = op.Reshape(s, _ints(op, *lead, nbn * FP8_BLOCK, nbk))
    return op.Slice(s, _ints(op, 0), _ints(op, n), _ints(op, -2))  # [..., N, nbk]


def dequant_rows(op, weight, rows, like, rank: int):
    """fp8 [..., N, K] and row scales [..., N, ceil(K/128)] -> [..., N, K] in like's dtype.

    rank: the weight's rank (a computed weight's shape is unknown to the tracer)."""
    w = op.DequantizeLinear(weight, rows, axis=rank - 1, block_size=FP8_BLOCK)  # [..., N, K] fp32
    return op.CastLike(w, like)


def dequant_weight(op, weight, scale, like):
    """fp8 [..., N, K] and fp32 [..., ceil(N/128), ceil(K/128)] -> weight in like's dtype (see the
    module docstring for where ORT folds it)."""
    return dequant_rows(op, weight, row_scales(op, scale, weight.shape[-2]), like, len(weight.shape))


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


def _fp8_linear(x, weight, scale, act_quant: bool):
    from onnxscript import opset21 as op

    w = dequant_weight(op, weight, scale, x)  # [N, K]
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


def describe_dequant(target: Target) -> str:
    return ("DequantizeLinear blocked (fp8 kept in memory)" if target.device == "cpu"
            else "DequantizeLinear blocked, folded to bf16 by ORT at session creation (loader's session options)")


def _describe(target: Target) -> str:
    dequant = describe_dequant(target)
    return f"standard ONNX: fp8 initializer, {dequant}, MatMul; act_quant: 1x128 fake-quant through FLOAT8E4M3FN"


LOWERINGS = (
    Lowering(op="dsv3::fp8_linear", supports=lambda node, target: static_weight_reason(node, (1, 2)),
             translate=lambda target: _fp8_linear, describe=_describe),  # one graph; the session decides the folding
)
