"""Graph cleanups that measurably shrink our exported programs (node counts in passes/README.md).

    remove_noop_casts        to(x, dtype) / _to_copy / type_as whose output has x's dtype, device
                             and shape -> x. The reference model casts defensively (RMSNorm,
                             rotary, Linear.dense_weight, `.float()` logits): in an fp32 program
                             nearly every cast is a no-op, and each one hides the weight behind a
                             node from the passes and backends that look for linear(x, weight).
    remove_tensor_asserts    _assert_tensor_metadata(x, dtype, device, layout) that x's meta
                             already proves -> nothing. torch.export emits one per `.to()`; they
                             are side-effecting, so dead-code elimination alone keeps them.
    remove_unused_constants  parameter / buffer / constant placeholders with no users -> dropped
                             from the graph, the signature and the weights. The MLA modules'
                             own KV-cache buffers ride along into every program (8 GB of zeros
                             for the 16b preset at max_batch 8 and 16k positions) though the step
                             reads only the explicit cache. User inputs are never removed.

Each pass rebuilds the program (which dead-code-eliminates) and reports how many nodes it
removed. Patterns not listed here were measured to change nothing on our programs.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dsv3_export.passes.base import PassConfig, PassResult
from dsv3_export.passes.graph_utils import copy_graph, rebuild_program

aten = torch.ops.aten
CAST_OPS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default)
CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def _same_tensor_meta(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _noop_cast_source(node: Node) -> Node | None:
    """The input a cast node returns unchanged, or None if it changes something."""
    if node.op != "call_function" or node.target not in CAST_OPS or not isinstance(node.args[0], Node):
        return None
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    src = node.args[0]
    return src if _same_tensor_meta(node.meta.get("val"), src.meta.get("val")) else None


def remove_noop_casts(program: ExportedProgram, config: PassConfig) -> PassResult:
    graph = copy_graph(program)
    removed = 0
    for node in list(graph.nodes):
        src = _noop_cast_source(node)
        if src is None:
            continue
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        removed += 1
    if not removed:
        return PassResult(program, 0, ["no cast is a no-op"])
    return PassResult(rebuild_program(program, graph), removed, [f"{removed} no-op casts removed"])


def _assert_is_proven(node: Node) -> bool:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if not isinstance(val, torch.Tensor):
        return False
    expected = {"dtype": val.dtype, "device": val.device, "layout": val.layout}
    checks = {k: v for k, v in node.kwargs.items() if v is not None}
    return set(checks) <= set(expected) and all(checks[k] == expected[k] for k in checks) and len(node.args) == 1


def remove_tensor_asserts(program: ExportedProgram, config: PassConfig) -> PassResult:
    graph = copy_graph(program)
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == aten._assert_tensor_metadata.default \
                and _assert_is_proven(node):
            graph.erase_node(node)
            removed += 1
    if not removed:
        return PassResult(program, 0, ["no provable _assert_tensor_metadata"])
    return PassResult(rebuild_program(program, graph), removed, [f"{removed} proven metadata asserts removed"])


def remove_unused_constants(program: ExportedProgram, config: PassConfig) -> PassResult:
    graph = copy_graph(program)
    nodes = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    keep, dropped = [], []
    for spec in program.graph_signature.input_specs:
        node = nodes.get(spec.arg.name)
        if spec.kind in CONSTANT_KINDS and node is not None and not node.users:
            graph.erase_node(node)
            dropped.append(spec.target)
        else:
            keep.append(spec)
    if not dropped:
        return PassResult(program, 0, ["every weight and buffer is used"])
    still_used = {s.target for s in keep}
    state_dict = {k: v for k, v in program.state_dict.items() if k in still_used or k not in dropped}
    constants = {k: v for k, v in program.constants.items() if k in still_used or k not in dropped}
    signature = ExportGraphSignature(input_specs=keep, output_specs=list(program.graph_signature.output_specs))
    result = rebuild_program(program, graph, signature=signature, state_dict=state_dict, constants=constants)
    return PassResult(result, len(dropped), [f"unused inputs dropped: {', '.join(dropped)}"])
