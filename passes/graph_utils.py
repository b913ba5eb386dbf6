"""Small helpers every pass uses to edit an ExportedProgram without touching its input.

A pass works on a copy of the program's graph (nodes are copied, `meta` dicts are shallow
copies, weights are shared) and builds a new ExportedProgram from it, so the caller's program
is unchanged whether the pass succeeds or raises.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Iterable

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, OutputSpec, TensorArgument
from torch.fx import Graph, Node

from dsv3_export.passes.base import PassError


def is_call(node: object, *targets) -> bool:
    """node is a call_function node of one of `targets` (False for constants and other node kinds)."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def copy_graph(program: ExportedProgram) -> Graph:
    """A copy of the program's graph: same node names, shallow-copied meta, shared weights."""
    return copy.deepcopy(program.graph)


def fake_mode_of(program: ExportedProgram, pass_name: str) -> FakeTensorMode:
    """The fake mode the program was traced under (new nodes' meta["val"] must come from it)."""
    vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        raise PassError(pass_name, "the program's placeholders carry no fake tensors in meta['val']; "
                                   "passes need a program produced by torch.export")
    return mode


def node_val(node: Node, pass_name: str) -> torch.Tensor:
    """meta["val"] of a tensor-valued node, or PassError naming the node."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise PassError(pass_name, f"node has no tensor meta['val'] (got {type(val).__name__}); "
                                   "the program must come from torch.export", node=node.name)
    return val


def fake_arg(arg, pass_name: str):
    """A node argument with Nodes replaced by their meta["val"] (for computing a new node's val)."""
    if isinstance(arg, Node):
        if "val" not in arg.meta:
            raise PassError(pass_name, "argument node has no meta['val']", node=arg.name)
        return arg.meta["val"]
    if isinstance(arg, (list, tuple)):
        return type(arg)(fake_arg(a, pass_name) for a in arg)
    return arg


def user_input_names(program: ExportedProgram) -> set[str]:
    return {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}


def ancestors(node: Node) -> list[Node]:
    """The nodes `node` is computed from, itself included, in graph order."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def depends_on(node: Node, names: set[str]) -> str | None:
    """Name of a placeholder in `names` that `node` (transitively) reads, else None."""
    return next((n.name for n in ancestors(node) if n.op == "placeholder" and n.name in names), None)


def op_histogram(graph: Graph) -> Counter:
    """Count of call_function targets by name (aten.einsum.default, dsv3.mla_attention.default...)."""
    return Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


def count_calls(graph: Graph, targets: Iterable) -> int:
    targets = set(targets)
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target in targets)


def _synced_signature(graph: Graph, signature: ExportGraphSignature) -> ExportGraphSignature:
    """Output specs renamed after the graph's output node (a rewrite may have replaced an output)."""
    output = graph.output_node()
    values = output.args[0]
    if len(values) != len(signature.output_specs):
        raise AssertionError(f"graph has {len(values)} outputs, signature {len(signature.output_specs)}")
    specs = []
    for value, spec in zip(values, signature.output_specs):
        if isinstance(spec.arg, TensorArgument) and isinstance(value, Node) and value.name != spec.arg.name:
            spec = OutputSpec(kind=spec.kind, arg=TensorArgument(name=value.name), target=spec.target)
        specs.append(spec)
    return ExportGraphSignature(input_specs=list(signature.input_specs), output_specs=specs)


def rebuild_program(program: ExportedProgram, graph: Graph, *, signature: ExportGraphSignature | None = None,
                    state_dict: dict | None = None, constants: dict | None = None) -> ExportedProgram:
    """A new ExportedProgram around an edited graph: DCE, lint, recompile and validate (the constructor).

    Output specs follow the graph's output node; everything not given is shared with `program`.
    """
    graph.eliminate_dead_code()
    graph.lint()
    signature = _synced_signature(graph, signature or program.graph_signature)
    # ExportedProgram builds (and recompiles) its own GraphModule from root + graph: one codegen.
    return ExportedProgram(
        root=program.graph_module, graph=graph, graph_signature=signature,
        state_dict=program.state_dict if state_dict is None else state_dict,
        range_constraints=copy.deepcopy(program.range_constraints),
        module_call_graph=copy.deepcopy(program.module_call_graph),
        example_inputs=program.example_inputs,
        constants=program.constants if constants is None else constants,
        verifiers=program.verifiers)
