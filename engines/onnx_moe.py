"""ONNX lowering of dsv3::moe_experts and dsv3::moe_experts_fp8 (the routed experts).

CPU (standard ONNX): dense over experts, static shapes, no data-dependent control flow:

    routing = ScatterElements(zeros [T, E], topk_ids, topk_weights)     [T, E], zero off the top-k
    h       = x @ w13_flat^T                                            [T, E * 2I]  one Gemm
    a       = silu(h[..., :I]) * h[..., I:] * routing[..., None]        [T, E, I]
    y       = a_flat @ w2_cat^T                                         [T, D]       one Gemm

It computes every expert for every token (E / k times the FLOPs of a sparse MoE) but as two
large GEMMs; standard ONNX has no grouped GEMM, and a Loop over experts with NonZero/Gather is
slower for the small token counts of decode. The weighting commutes with w2 (it is linear).

CUDA (com.microsoft.MoE, grouped CUTLASS GEMMs over the routed tokens only). MoE routes by
itself from `router_probs` (softmax over experts, then top-k), while our op receives the routing
already made (any scoring: softmax, sigmoid, group-limited, biased, scaled). We feed
router_probs = log(routing): exp(log w) = w on the top-k and 0 elsewhere, so MoE picks exactly
our experts with weights w_i / sum_j w_j (whether it normalizes or not), and multiplying the
output by sum_j w_j restores w_i. w13's [w1; w3] rows are interleaved (swiglu_fusion=1, the
layout ORT's kernels read) at build time by constant folding. fp8 experts on CUDA are
interleaved the same way while still fp8 (weight and row scales, folded at build), then
dequantized by DequantizeLinear + Cast, which ORT folds into bf16 initializers when the session
is created (onnx_fp8.py says why this form), and go through the same MoE op.
"""

from __future__ import annotations

from dsv3_export.engines.base import Target
from dsv3_export.engines.onnx_fp8 import (FP8_BLOCK, dequant_rows, dequant_weight, describe_dequant, fake_quant_act,
                                           row_scales, static_weight_reason)
from dsv3_export.engines.onnx_ops import Lowering

_FLOAT = 1


def _ints(op, *values: int):
    return op.Constant(value_ints=list(values))


def _routing(op, x, topk_weights, topk_ids, n_experts: int):
    """Dense [T, E] routing weights in topk_weights' dtype, zero off the top-k."""
    shape = op.Concat(op.Shape(x, end=1), _ints(op, n_experts), axis=0)
    zeros = op.CastLike(op.ConstantOfShape(shape), topk_weights)  # [T, E]
    return op.ScatterElements(zeros, topk_ids, topk_weights, axis=1)


def _dense_experts(op, x, topk_weights, topk_ids, w13, w2, shape: tuple[int, int, int], act_quant: bool):
    e, two_i, d = shape  # w13's [E, 2I, D], static (w13 may be computed, with no shape recorded)
    i = two_i // 2
    routing = _routing(op, x, op.CastLike(topk_weights, x), topk_ids, e)  # [T, E]
    xq = fake_quant_act(op, x, d) if act_quant else x
    h = op.Gemm(xq, op.Reshape(w13, _ints(op, e * two_i, d)), transB=1)  # [T, E * 2I]
    h = op.Reshape(h, _ints(op, -1, e, 2, i))  # [T, E, 2, I]
    gate, up = op.Split(h, axis=2, num_outputs=2)  # [T, E, 1, I] each
    a = op.Squeeze(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), _ints(op, 2))  # [T, E, I]
    if act_quant:
        a = fake_quant_act(op, a, i)  # per (token, expert) 1x128 blocks along I, as the kernel does
    a = op.Mul(a, op.Unsqueeze(routing, _ints(op, -1)))  # [T, E, I]
    w2_cat = op.Reshape(op.Transpose(w2, perm=[1, 0, 2]), _ints(op, d, e * i))  # [D, E * I]
    return op.Gemm(op.Reshape(a, _ints(op, -1, e * i)), w2_cat, transB=1)  # [T, D]


def _interleave_gate_up(op, w, e: int, i: int, width: int):
    """[E, 2I, width] rows [w1; w3] -> [E, 2I, width] rows g0, u0, g1, u1, ... (swiglu_fusion=1).

    width: D for a weight, ceil(D/128) for its row scales (the rows move with their scales)."""
    w = op.Reshape(w, _ints(op, e, 2, i, width))  # [E, 2, I, width]
    return op.Reshape(op.Transpose(w, perm=[0, 2, 1, 3]), _ints(op, e, 2 * i, width))  # [E, 2I, width]


def _contrib_moe(op, x, topk_weights, topk_ids, w13, w2, shape: tuple[int, int, int], interleaved: bool = False):
    """interleaved: w13's rows are already in MoE's swiglu order (_interleave_gate_up)."""
    e, two_i, d = shape  # w13's [E, 2I, D]
    i = two_i // 2
    k = topk_ids.shape[-1]
    weights = op.Cast(topk_weights, to=_FLOAT)  # [T, k] fp32
    routing = _routing(op, x, weights, topk_ids, e)  # [T, E] fp32
    # log 0 = -inf: never chosen. Shifted by the row's largest log (softmax ignores the shift) so the
    # values are small where bf16 (router_probs has x's type) has the most precision.
    log_w = op.Log(routing)
    router_logits = op.CastLike(op.Sub(log_w, op.ReduceMax(log_w, _ints(op, -1), keepdims=1)), x)  # [T, E]
    fc1 = w13 if interleaved else _interleave_gate_up(op, w13, e, i, d)  # [E, 2I, D], rows g0, u0, g1, u1, ...
    y = _ms_moe(x, router_logits, fc1, None, w2, k=k, activation_type="swiglu", swiglu_fusion=1,
               normalize_routing_weights=0, activation_alpha=1.0, activation_beta=0.0)  # [T, D]
    total = op.ReduceSum(weights, _ints(op, -1), keepdims=1)  # [T, 1]
    return op.Mul(y, op.CastLike(total, x))


def _moe_schema():
    """onnx.defs.OpSchema of com.microsoft.MoE (ORT's contrib op), registered once.

    onnxscript's tracer needs a schema to build a node, and ONNX ships none for contrib ops. The
    inputs, attributes and types follow ORT's registered schema (onnxruntime >= 1.30)."""
    import onnx
    from onnx.defs import OpSchema

    try:
        return onnx.defs.get_schema("MoE", 1, "com.microsoft")
    except onnx.defs.SchemaError:
        pass
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter(name, "T", param_option=optional if name.endswith("bias") or "fc3" in name
                                       else OpSchema.FormalParameterOption.Single)
              for name in ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights",
                           "fc2_experts_bias", "fc3_experts_weights", "fc3_experts_bias")]
    attr = OpSchema.AttrType
    attributes = [OpSchema.Attribute(name, kind, required=False) for name, kind in (
        ("k", attr.INT), ("activation_type", attr.STRING), ("normalize_routing_weights", attr.INT),
        ("swiglu_fusion", attr.INT), ("activation_alpha", attr.FLOAT), ("activation_beta", attr.FLOAT),
        ("use_sparse_mixer", attr.INT), ("swiglu_limit", attr.FLOAT))]
    schema = OpSchema("MoE", "com.microsoft", 1, inputs=inputs, outputs=[OpSchema.FormalParameter("output", "T")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                      attributes=attributes)
    onnx.defs.register_schema(schema)
    return schema


def _ms_moe(*inputs, **attributes):
    """A com.microsoft.MoE node through onnxscript's tracer (see _moe_schema)."""
    from onnxscript import values

    return values.Op(values.Opset("com.microsoft", 1), "MoE", _moe_schema())(*inputs, **attributes)


def _moe_experts(target: Target):
    def moe_experts(x, topk_weights, topk_ids, w13, w2):
        from onnxscript import opset21 as op

        shape = tuple(w13.shape)
        if target.device == "cuda":
            return _contrib_moe(op, x, topk_weights, topk_ids, w13, w2, shape)
        return _dense_experts(op, x, topk_weights, topk_ids, w13, w2, shape, act_quant=False)

    return moe_experts


def _moe_experts_fp8(target: Target):
    def moe_experts_fp8(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, act_quant: bool):
        from onnxscript import opset21 as op

        shape = e, two_i, d = tuple(w13.shape)
        w2_d = dequant_weight(op, w2, w2_scale, x)  # [E, D, I] in x's dtype
        if target.device == "cuda":
            # Interleaved in fp8 (folded at build) so ORT's session-time folding of the dequant
            # writes the final bf16 layout directly, with no bf16 Transpose copy to hold.
            i, nbk = two_i // 2, -(-d // FP8_BLOCK)
            rows = _interleave_gate_up(op, row_scales(op, w13_scale, two_i), e, i, nbk)  # [E, 2I, nbk]
            w13_d = dequant_rows(op, _interleave_gate_up(op, w13, e, i, d), rows, x, rank=3)  # [E, 2I, D], swiglu order
            return _contrib_moe(op, x, topk_weights, topk_ids, w13_d, w2_d, shape, interleaved=True)
        w13_d = dequant_weight(op, w13, w13_scale, x)  # [E, 2I, D]
        return _dense_experts(op, x, topk_weights, topk_ids, w13_d, w2_d, shape, act_quant)

    return moe_experts_fp8


def _fp8_supports(node, target: Target) -> str | None:
    reason = static_weight_reason(node, (3, 4, 5, 6))
    if reason is None and target.device == "cuda" and node.args[7]:
        return ("act_quant=True: com.microsoft.MoE computes in bf16 (weight-only fp8); "
                "build with fp8_activations off for onnxruntime/cuda")
    return reason


LOWERINGS = (
    Lowering(op="dsv3::moe_experts", supports=lambda node, target: static_weight_reason(node, (3, 4)),
             translate=_moe_experts,
             describe=lambda target: ("com.microsoft.MoE (router_probs = log routing, swiglu interleaved)"
                                      if target.device == "cuda" else "standard ONNX: dense routing, two Gemms")),
    Lowering(op="dsv3::moe_experts_fp8", supports=_fp8_supports, translate=_moe_experts_fp8,
             describe=lambda target: (f"fp8 {describe_dequant(target)}, w13 interleaved while fp8 "
                                      "-> com.microsoft.MoE" if target.device == "cuda"
                                      else "standard ONNX: DequantizeLinear blocked, dense routing, two Gemms")),
)
