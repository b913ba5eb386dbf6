"""Edit an ExportedProgram's graph AND its state together: the working copy passes rewrite.

An ExportedProgram keeps weights in four places that must agree: a placeholder node per lifted
tensor (with meta["val"], a FakeTensor of the program's fake mode), an InputSpec in the graph
signature (same order as the placeholders: parameters, buffers, constants, then user inputs),
and the tensor itself in state_dict (parameters, persistent buffers) or constants (non-persistent
buffers, lifted constants). ProgramState copies the graph (nodes and their meta, shallowly: no
tensor is copied) and the signature, lets a pass add / replace / remove weights and insert nodes
whose meta["val"] is computed under the program's fake mode, and builds a new, validated
ExportedProgram. The input program is never modified, so a pass that fails leaves it intact.

Works on meta-device programs too: weights are whatever tensors the program holds (meta tensors
stay meta), and fake values are derived from them without touching data.

    state = ProgramState(program)
    w = state.add_parameter("layers.1.ffn.w13", stacked)          # -> placeholder node
    with state.graph.inserting_before(node):
        y = state.call(torch.ops.dsv3.moe_experts.default, (x, tw, ti, w, w2), meta_from=node)
    node.replace_all_uses_with(y)
    state.eliminate_dead_code()
    state.remove("layers.1.ffn.experts.0.w1.weight")               # its placeholder must be unused
    new_program = state.program()
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputSpec,
                                          TensorArgument)
from torch.fx import Node
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
# Placeholders are ordered by kind; a new one goes after the last of its kind.
_KIND_ORDER = {InputKind.PARAMETER: 0, InputKind.BUFFER: 1, InputKind.CONSTANT_TENSOR: 2,
               InputKind.CUSTOM_OBJ: 3, InputKind.TOKEN: 4, InputKind.USER_INPUT: 5}
# meta keys carried over to a node that replaces others (debugging and module grouping)
_PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")
_ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default


class ProgramState:
    """A mutable working copy of an ExportedProgram (graph + signature + state dict + constants)."""

    def __init__(self, program: ExportedProgram):
        self.source = program
        self.graph = torch.fx.Graph()
        copies: dict[Node, Node] = {}
        for node in program.graph.nodes:  # node_copy keeps names and (shallow-copied) meta
            copies[node] = self.graph.node_copy(node, lambda n: copies[n])
        self.input_specs: list[InputSpec] = list(program.graph_signature.input_specs)
        self.output_specs: list[OutputSpec] = list(program.graph_signature.output_specs)
        self.state_dict: dict[str, Any] = dict(program.state_dict)
        self.constants: dict[str, Any] = dict(program.constants)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if placeholders != self.placeholders():
            raise ValueError("program's placeholders are not all at the start of its graph")
        if len(placeholders) != len(self.input_specs):
            raise ValueError(f"program has {len(placeholders)} placeholders but {len(self.input_specs)} input specs")
        vals = [n.meta.get("val") for n in placeholders]
        fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        self.fake_mode: FakeTensorMode = fake_mode or FakeTensorMode(allow_non_fake_inputs=True)
        self._index: tuple[dict[str, InputSpec], dict[str, Node]] | None = None  # by name, by target

    def _lookup(self) -> tuple[dict[str, InputSpec], dict[str, Node]]:
        """(placeholder name -> spec, state target -> placeholder), rebuilt after edits (O(1) lookups
        matter: the 16b program has thousands of weights)."""
        if self._index is None:
            nodes = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
            by_name = {s.arg.name: s for s in self.input_specs if isinstance(s.arg, TensorArgument)}
            by_target = {s.target: nodes[s.arg.name] for s in reversed(self.input_specs)
                         if s.kind in STATE_KINDS and isinstance(s.arg, TensorArgument)}
            self._index = (by_name, by_target)
        return self._index

    # --- lookups ---------------------------------------------------------------------------
    def placeholders(self) -> list[Node]:
        """Placeholders lead the graph: stop at the first other node (the graph may be 30k nodes)."""
        return list(itertools.takewhile(lambda n: n.op == "placeholder", self.graph.nodes))

    def spec_of(self, node: Node) -> InputSpec | None:
        return self._lookup()[0].get(node.name) if node.op == "placeholder" else None

    def target_of(self, node: Node) -> str | None:
        """The state name (e.g. "layers.0.attn.wq.weight") a placeholder stands for, else None."""
        spec = self.spec_of(node)
        return spec.target if spec is not None and spec.kind in STATE_KINDS else None

    def node_of(self, target: str) -> Node:
        node = self._lookup()[1].get(target)
        if node is not None:
            return node
        raise KeyError(f"no parameter, buffer or constant named {target!r} in the program")

    def tensor(self, target: str) -> torch.Tensor:
        if target in self.state_dict:
            return self.state_dict[target]
        if target in self.constants:
            return self.constants[target]
        raise KeyError(f"no tensor named {target!r} in the program's state dict or constants")

    def has(self, target: str) -> bool:
        return target in self._lookup()[1]

    def taken(self, target: str) -> bool:
        """True when a placeholder, parameter, buffer or constant already has this name."""
        return self.has(target) or target in self.state_dict or target in self.constants

    # --- fake values -----------------------------------------------------------------------
    def fake(self, tensor: torch.Tensor) -> torch.Tensor:
        """A FakeTensor of the program's fake mode with tensor's shape, dtype, device and strides."""
        return self.fake_mode.from_tensor(tensor, static_shapes=True)

    def _set_val(self, node: Node, val: Any) -> None:
        node.meta["val"] = val
        if isinstance(val, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(val)
        else:
            node.meta.pop("tensor_meta", None)

    # --- weights ---------------------------------------------------------------------------
    def add_parameter(self, target: str, tensor: torch.Tensor) -> Node:
        param = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor, requires_grad=False)
        return self._add(target, param, InputKind.PARAMETER, persistent=None)

    def add_buffer(self, target: str, tensor: torch.Tensor, persistent: bool = True) -> Node:
        return self._add(target, tensor, InputKind.BUFFER, persistent=persistent)

    def _add(self, target: str, tensor: torch.Tensor, kind: InputKind, persistent: bool | None) -> Node:
        if self.taken(target):
            raise ValueError(f"cannot add {target!r}: the program already has a tensor of that name")
        rank = _KIND_ORDER[kind]
        index = next((i for i, s in enumerate(self.input_specs) if _KIND_ORDER[s.kind] > rank), len(self.input_specs))
        placeholders = self.placeholders()
        if index < len(placeholders):
            where = self.graph.inserting_before(placeholders[index])
        elif placeholders:
            where = self.graph.inserting_after(placeholders[-1])
        else:
            where = self.graph.inserting_before(next(iter(self.graph.nodes), None))
        with where:
            node = self.graph.placeholder(_placeholder_name(kind, target))
        self._set_val(node, self.fake(tensor))
        self.input_specs.insert(index, InputSpec(kind, TensorArgument(node.name), target, persistent))
        self._index = None
        if kind == InputKind.BUFFER and not persistent:
            self.constants[target] = tensor
        else:
            self.state_dict[target] = tensor
        return node

    def replace(self, target: str, tensor: torch.Tensor) -> Node:
        """Give an existing parameter/buffer/constant a new value (shape and dtype may change).

        The _assert_tensor_metadata checks of the old value are erased; the caller is responsible
        for the other users still being valid (rewire them, or recompute their meta).
        """
        node = self.node_of(target)
        for user in list(node.users):
            if user.target is _ASSERT_METADATA and not user.users:
                self.graph.erase_node(user)
        if target in self.state_dict:
            old = self.state_dict[target]
            if isinstance(old, torch.nn.Parameter) and not isinstance(tensor, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            self.state_dict[target] = tensor
        else:
            self.constants[target] = tensor
        self._set_val(node, self.fake(tensor))
        return node

    def remove(self, *targets: str) -> None:
        """Drop parameters/buffers/constants whose placeholders no longer have users."""
        doomed: dict[str, tuple[str, Node]] = {}
        for target in targets:
            node = self.node_of(target)
            if node.users:
                users = ", ".join(u.name for u in node.users)
                raise ValueError(f"cannot remove {target!r}: placeholder {node.name} is still used by {users}")
            doomed[node.name] = (target, node)
        self.input_specs = [s for s in self.input_specs
                            if not (isinstance(s.arg, TensorArgument) and s.arg.name in doomed)]
        for _, node in doomed.values():
            self.graph.erase_node(node)
        self._index = None
        remaining = self._lookup()[1]
        for target, _ in doomed.values():
            if target not in remaining:
                self.state_dict.pop(target, None)
                self.constants.pop(target, None)

    def remove_if_unused(self, targets) -> list[str]:
        """Remove those of `targets` whose placeholders have no users left; returns the removed names."""
        unused = [t for t in dict.fromkeys(targets) if self.has(t) and not self.node_of(t).users]
        self.remove(*unused)
        return unused

    # --- nodes -----------------------------------------------------------------------------
    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, *, meta_from: Node | None = None) -> Node:
        """Insert call_function(target, args, kwargs) at the graph's insertion point, with
        meta["val"] computed by running target on the args' fake values under the fake mode."""
        kwargs = kwargs or {}
        node = self.graph.call_function(target, args, kwargs)
        self._set_val(node, self.fake_value(target, args, kwargs))
        if meta_from is not None:
            for key in _PROVENANCE_KEYS:
                if key in meta_from.meta:
                    node.meta[key] = copy.copy(meta_from.meta[key])
        return node

    def fake_value(self, target: Callable, args: tuple, kwargs: dict | None = None) -> Any:
        def val(a: Any) -> Any:
            if isinstance(a, Node):
                if "val" not in a.meta:
                    raise ValueError(f"node {a.name} has no meta['val']; cannot compute fake values downstream")
                return a.meta["val"]
            return a

        # The Python dispatcher, as torch.export traces: composite ops (aten.linear -> matmul) then
        # decompose through their SymInt-aware Python forms. Without it torch 2.11's C++ matmul
        # calls numel() on a symbolic batch ("Cannot call numel() on tensor with symbolic sizes",
        # the 16b bf16 decode program on the H200); 2.13's does not.
        with self.fake_mode, enable_python_dispatcher():
            return target(*map_aggregate(args, val), **map_aggregate(kwargs or {}, val))

    def eliminate_dead_code(self) -> int:
        """Erase unused pure nodes, and the aten._assert_tensor_metadata checks whose subject is
        otherwise unused (torch.export emits one per .to(); fx keeps them as side effects, which
        would keep replaced weights alive). Returns how many nodes were erased."""
        erased, changed = 0, True
        while changed:
            changed = False
            for node in reversed(list(self.graph.nodes)):
                if node.op != "call_function" or node.users:
                    continue
                if node.target is _ASSERT_METADATA:
                    subject = node.args[0]
                    if not (isinstance(subject, Node) and all(u.target is _ASSERT_METADATA for u in subject.users)):
                        continue
                elif node.is_impure():
                    continue
                self.graph.erase_node(node)
                erased, changed = erased + 1, True
        return erased

    # --- result ----------------------------------------------------------------------------
    def program(self) -> ExportedProgram:
        """Build (and validate) the new ExportedProgram."""
        self.graph.lint()
        output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        outputs = output.args[0]
        if len(outputs) != len(self.output_specs):
            raise ValueError(f"graph returns {len(outputs)} values, the signature has {len(self.output_specs)} outputs")
        output_specs = [  # an output node may have been replaced: specs follow the graph's names
            OutputSpec(s.kind, TensorArgument(o.name), s.target)
            if isinstance(s.arg, TensorArgument) and isinstance(o, Node) else s
            for s, o in zip(self.output_specs, outputs)
        ]
        gm = torch.fx.GraphModule(self.source.graph_module, self.graph)
        gm.meta.update(self.source.graph_module.meta)
        return ExportedProgram(
            root=gm,
            graph=gm.graph,
            graph_signature=ExportGraphSignature(input_specs=list(self.input_specs), output_specs=output_specs),
            state_dict=self.state_dict,
            range_constraints=copy.deepcopy(self.source.range_constraints),
            module_call_graph=copy.deepcopy(self.source.module_call_graph),
            example_inputs=self.source.example_inputs,
            constants=self.constants,
            verifiers=self.source.verifiers,
        )


def _placeholder_name(kind: InputKind, target: str) -> str:
    """torch.export's naming: p_ / b_ / c_ + the target with dots as underscores."""
    prefix = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_"}.get(kind, "c_")
    return prefix + target.replace(".", "_")


def state_nbytes(program: ExportedProgram, kinds: tuple[InputKind, ...] = STATE_KINDS) -> int:
    """Bytes of the lifted tensors of the given kinds (default all) the program's signature refers
    to; works for meta tensors."""
    total, seen = 0, set()
    for spec in program.graph_signature.input_specs:
        if spec.kind not in kinds or spec.target in seen:
            continue
        seen.add(spec.target)
        t = program.state_dict.get(spec.target, program.constants.get(spec.target))
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total
