"""ONNX lowering of dsv3::mla_attention (absorbed MLA over [latent cache | new positions]).

Standard ONNX on both targets; every product is a batched MatMul without broadcasting:

    q      = [q_nope @ W_UK | q_pe]                   [b, h*s, c + r]  (W_UK batched over heads)
    scores = q @ [cache | new]^T * scale              [b, h*s, T + s]  masked: t < start_pos, causal
    p      = Softmax(scores) in fp32
    out    = (p @ [cache | new])[..., :c] @ W_UV^T    [b, s, h, dv]    (W_UV batched over heads)

Heads are folded into the rows of the cache products (M = h*s) so that each batch row's cache is
read once per layer by one GEMM; a [b, h, s, .] x [b, 1, ., T] broadcast would read it once per
head (16x the cache traffic at decode). Nothing slices or copies the cache.

Why no contrib attention op on CUDA: GroupQueryAttention / MultiHeadAttention want K and V of
equal head size (flash kernels <= 256) and own a per-layer BNSH cache that they copy or append
to; the absorbed latent cache is one 576-wide MQA head whose first 512 values are also V, read by
all heads, and lives in one [b, L, T, 576] buffer the runtime writes. Using V = K (576 wide) and
slicing the output would fit memory-efficient attention only, at the price of a cache copy per
layer and step. The MatMul form reads the cache once per layer and is what ORT can fuse.
"""

from __future__ import annotations

import torch

from dsv3_export.engines.base import Target
from dsv3_export.engines.onnx_ops import Lowering


def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"dsv3::mla_attention lowering needs a static {what}, got {dim!r}")
    return dim


def _mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale: float):
    from onnxscript import opset21 as op

    h, dn = _static(q_nope.shape[2], "head count"), _static(q_nope.shape[3], "qk_nope_head_dim")
    r = _static(q_pe.shape[3], "qk_rope_head_dim")
    c = _static(wkv_b.shape[1], "kv_lora_rank")
    dv = _static(wkv_b.shape[0], "wkv_b rows") // h - dn

    def ints(*v):
        return op.Constant(value_ints=list(v))

    b_dim, s_dim = op.Shape(q_nope, start=0, end=1), op.Shape(q_nope, start=1, end=2)  # [1] each
    w = op.Reshape(wkv_b, ints(h, dn + dv, c))  # [h, dn + dv, c]
    w_uk = op.Slice(w, ints(0), ints(dn), ints(1))  # [h, dn, c]
    w_uv_t = op.Transpose(op.Slice(w, ints(dn), ints(dn + dv), ints(1)), perm=[0, 2, 1])  # [h, c, dv]
    # Heads in the batch of W_UK / W_UV products, (b, s) in the batch of the cache products.
    q_nope = op.Reshape(op.Transpose(q_nope, perm=[2, 0, 1, 3]), ints(h, -1, dn))  # [h, b*s, dn]
    q_latent = op.Reshape(op.MatMul(q_nope, w_uk), op.Concat(ints(h), b_dim, s_dim, ints(c), axis=0))  # [h, b, s, c]
    q = op.Concat(op.Transpose(q_latent, perm=[1, 0, 2, 3]), op.Transpose(q_pe, perm=[0, 2, 1, 3]), axis=-1)
    q = op.Reshape(q, op.Concat(b_dim, ints(-1, c + r), axis=0))  # [b, h*s, c + r]
    scale = op.CastLike(op.Constant(value_float=softmax_scale), q)
    # One strided-batched GEMM per batch row over all heads (M = h*s): the cache is read once per
    # layer, not once per head; ORT fuses the Transpose into the MatMul (FusedMatMul, transB).
    scores_past = op.Mul(op.MatMul(q, op.Transpose(kv_cache, perm=[0, 2, 1])), scale)  # [b, h*s, T]
    scores_new = op.Mul(op.MatMul(q, op.Transpose(kv_new, perm=[0, 2, 1])), scale)  # [b, h*s, s]
    bhs = op.Concat(b_dim, ints(h), s_dim, ints(-1), axis=0)
    scores_past, scores_new = op.Reshape(scores_past, bhs), op.Reshape(scores_new, bhs)  # [b, h, s, T|s]

    t_len = op.Shape(kv_cache, start=1, end=2)  # [1]
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    t = op.Range(zero, op.Squeeze(t_len), one)  # [T]
    past_visible = op.Less(op.Unsqueeze(t, ints(0)), op.Unsqueeze(start_pos, ints(1)))  # [b, T]
    past_visible = op.Unsqueeze(past_visible, ints(1, 2))  # [b, 1, 1, T]
    square = op.Concat(s_dim, s_dim, axis=0)
    new_visible = op.Cast(op.Trilu(op.ConstantOfShape(square, value=_one_int64()), upper=0), to=9)  # [s, s] bool
    neg_inf = op.Constant(value_float=float("-inf"))
    scores_past = op.Where(past_visible, op.Cast(scores_past, to=1), neg_inf)  # fp32 from here
    scores_new = op.Where(new_visible, op.Cast(scores_new, to=1), neg_inf)
    probs = op.CastLike(op.Softmax(op.Concat(scores_past, scores_new, axis=-1), axis=-1), q)  # [b, h, s, T + s]
    bhs_flat = op.Concat(b_dim, ints(-1), op.Add(t_len, s_dim), axis=0)
    probs = op.Reshape(probs, bhs_flat)  # [b, h*s, T + s]
    p_past = op.Slice(probs, ints(0), t_len, ints(2))  # [b, h*s, T]
    p_new = op.Slice(probs, t_len, op.Add(t_len, s_dim), ints(2))  # [b, h*s, s]
    # Products over the full cache width (no copy of the cache's latent part), then the first c.
    out = op.Add(op.MatMul(p_past, kv_cache), op.MatMul(p_new, kv_new))  # [b, h*s, c + r]
    out = op.Slice(out, ints(0), ints(c), ints(2))  # [b, h*s, c]
    out = op.Reshape(out, op.Concat(b_dim, ints(h), s_dim, ints(c), axis=0))  # [b, h, s, c]
    out = op.Reshape(op.Transpose(out, perm=[1, 0, 2, 3]), ints(h, -1, c))  # [h, b*s, c]
    out = op.Reshape(op.MatMul(out, w_uv_t), op.Concat(ints(h), b_dim, s_dim, ints(dv), axis=0))  # [h, b, s, dv]
    return op.Transpose(out, perm=[1, 2, 0, 3])  # [b, s, h, dv]


def _one_int64():
    import onnx_ir as ir

    return ir.tensor([1], dtype=ir.DataType.INT64)


def _supports(node: torch.fx.Node, target: Target) -> str | None:
    wkv_b = node.args[5]
    val = wkv_b.meta.get("val") if isinstance(wkv_b, torch.fx.Node) else None
    if val is None or any(not isinstance(d, int) for d in val.shape):
        return "wkv_b must have a static shape (it is a weight)"
    return None


LOWERINGS = (
    Lowering(op="dsv3::mla_attention", supports=_supports, translate=lambda target: _mla_attention,
             describe=lambda target: "standard ONNX (MatMul over the latent cache, fp32 Softmax)"),
)
