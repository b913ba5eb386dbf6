"""Which Linear a node is, and where its weight comes from: a dense parameter or an fp8 dequant.

Shared by rewrite_moe_grouped_gemm and quantize_fp8_blockwise. Both must see through what
torch.export records for the reference Linear (layers.py):

    dense:  linear(x, to(p_w, dtype))                              p_w  [N, K] float
    fp8:    linear(x, to(mul(to(p_w, f32),                         p_w  [N, K] float8_e4m3fn
                             slice(slice(repeat_interleave(repeat_interleave(to(p_s), b, 0), b, 1),
                                         0, 0, N), 1, 0, K)), dtype))
                                                                   p_s  [ceil(N/b), ceil(K/b)] f32
and, after run_decompositions, mm(x, t(W)) / addmm(bias, x, t(W)) in place of linear(x, W).
Every op on the weight path is checked (dims, repeats, slice bounds), so a look-alike that is
not blockwise dequantization is not taken for one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState
from dsv3_export.reference.fp8 import FP8_DTYPE, cdiv

aten = torch.ops.aten
# Value-preserving ops between a parameter and its use (dtype casts, no-op views).
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default, aten.alias.default,
         aten.detach.default, aten.clone.default}
TRANSPOSES = {aten.t.default, aten.permute.default, aten.transpose.int}


@dataclass(frozen=True)
class LinearSite:
    """y = x W^T (+ bias) at `node`; weight is the graph value W [N, K] (nn.Linear layout)."""

    node: Node
    x: Node
    weight: Node
    bias: Node | None


@dataclass(frozen=True)
class DenseWeight:
    param: Node  # placeholder of the [N, K] parameter
    chain: tuple[Node, ...]  # nodes between the placeholder and the use (casts)


@dataclass(frozen=True)
class Fp8Weight:
    weight: Node  # placeholder, float8_e4m3fn [N, K]
    scale: Node  # placeholder, float32 [ceil(N/b), ceil(K/b)]
    block_size: int
    chain: tuple[Node, ...]  # the dequant subgraph


def _val(node: Node):
    return node.meta.get("val")


def _is_transpose_2d(node: Node) -> bool:
    if node.target is aten.t.default:
        return True
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return sorted(a % 2 for a in node.args[1:3]) == [0, 1]


def match_linear(node: Node) -> LinearSite | None:
    """linear(x, W[, b]), mm(x, t(W)) or addmm(b, x, t(W)) with alpha = beta = 1; else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return LinearSite(node, x, w, bias)
    if node.target in (aten.mm.default, aten.addmm.default):
        if node.target is aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            return None
        bias, x, wt = (None, *node.args[:2]) if node.target is aten.mm.default else node.args[:3]
        if is_call(wt, *TRANSPOSES) and _is_transpose_2d(wt):
            return LinearSite(node, x, wt.args[0], bias)
    return None


def strip_casts(node: Node) -> tuple[Node, list[Node]]:
    """Follow value-preserving casts upward; returns (source node, the casts passed)."""
    chain = []
    while is_call(node, *CASTS) and isinstance(node.args[0], Node):
        chain.append(node)
        node = node.args[0]
    return node, chain


def resolve_weight(state: ProgramState, value: Node) -> DenseWeight | Fp8Weight | None:
    """The parameter(s) behind a Linear's weight value, or None if it is not one (e.g. activations)."""
    src, chain = strip_casts(value)
    if src.op == "placeholder":
        return DenseWeight(src, tuple(chain)) if state.target_of(src) is not None else None
    if not is_call(src, aten.mul.Tensor) or len(src.args) != 2:
        return None
    for q_side, s_side in (src.args, src.args[::-1]):
        if not isinstance(q_side, Node) or not isinstance(s_side, Node):
            continue
        q, q_chain = strip_casts(q_side)
        if q.op != "placeholder" or state.target_of(q) is None or _val(q).dtype != FP8_DTYPE:
            continue
        found = _match_scale_expansion(state, s_side, tuple(_val(q).shape))
        if found is not None:
            scale, block, s_chain = found
            return Fp8Weight(q, scale, block, (*chain, src, *q_chain, *s_chain))
    return None


def _match_scale_expansion(state: ProgramState, node: Node,
                           shape: tuple[int, int]) -> tuple[Node, int, list[Node]] | None:
    """Match slice*(repeat_interleave(repeat_interleave(cast*(p_s), b, 0), b, 1)) -> (p_s, b, nodes)."""
    n, k = shape
    chain, repeats = [], {}
    while True:
        if is_call(node, *CASTS):
            pass
        elif is_call(node, aten.slice.Tensor):
            dim = node.args[1]
            start = node.args[2] if len(node.args) > 2 else 0
            step = node.args[4] if len(node.args) > 4 else 1
            if dim not in (0, 1) or start not in (0, None) or step != 1:
                return None
        elif is_call(node, aten.repeat_interleave.self_int):
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
            if dim not in (0, 1) or dim in repeats or not isinstance(node.args[1], int):
                return None
            repeats[dim] = node.args[1]
        else:
            break
        chain.append(node)
        node = node.args[0]
    if node.op != "placeholder" or state.target_of(node) is None or set(repeats) != {0, 1}:
        return None
    block = repeats[0]
    if repeats[1] != block or _val(node).dtype != torch.float32:
        return None
    if tuple(_val(node).shape) != (cdiv(n, block), cdiv(k, block)) or tuple(_val(chain[0]).shape) != (n, k):
        return None
    return node, block, chain
