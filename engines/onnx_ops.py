"""Lowering of each dsv3:: op to ONNX, in one place per op, with `supports(node, target) -> reason | None`.

    table = translation_table(target)        # torch op -> onnxscript function, for torch.onnx.export
    lowerings = check_program(program, target)   # {op: how it lowers}; UnsupportedOp names the node

CPU target: standard ONNX only (opset 21), fp32 compute; fp8 weights stay FLOAT8E4M3FN
initializers and are dequantized in the graph (DequantizeLinear blocked along K, bit-exact with
torch, TOOLCHAIN.md; on CUDA the same node is folded to bf16 at session creation, onnx_fp8.py).
CUDA target: the routed experts become com.microsoft.MoE; MLA stays standard ONNX (see
onnx_mla.py for why no contrib attention op fits the latent cache).

The translations themselves live beside this file, one module per op family (onnx_mla.py,
onnx_moe.py, onnx_fp8.py); this module is only the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.export import ExportedProgram

from dsv3_export.engines.base import Target


class UnsupportedOp(ValueError):
    """A dsv3:: op this backend cannot lower for the target; names the node and why."""


@dataclass(frozen=True)
class Lowering:
    op: str  # "dsv3::name"
    supports: Callable[[torch.fx.Node, Target], str | None]  # None, or why this node cannot lower
    translate: Callable[[Target], Callable]  # the onnxscript (trace-only) function for the target
    describe: Callable[[Target], str]  # what the manifest records


def _lowerings() -> dict[str, Lowering]:
    import dsv3_export.ops  # noqa: F401 - registers the ops that exist
    from dsv3_export.engines import onnx_fp8, onnx_mla, onnx_moe

    table = {}
    for module in (onnx_mla, onnx_moe, onnx_fp8):
        for lowering in module.LOWERINGS:
            table[lowering.op] = lowering
    return table


def _torch_op(name: str):
    namespace, op = name.split("::")
    packet = getattr(getattr(torch.ops, namespace), op, None)
    return None if packet is None else packet.default


def _dsv3_nodes(program: ExportedProgram):
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target.namespace == "dsv3":
            yield node


def check_program(program: ExportedProgram, target: Target) -> dict[str, str]:
    """How each dsv3 op of `program` lowers for `target`; UnsupportedOp on the first that cannot."""
    table = _lowerings()
    used: dict[str, str] = {}
    for node in _dsv3_nodes(program):
        name = node.target.name().split(".")[0]  # "dsv3::mla_attention"
        lowering = table.get(name)
        if lowering is None:
            raise UnsupportedOp(f"node {node.name!r}: op {name} has no ONNX lowering "
                                f"(lowered ops: {', '.join(sorted(table))})")
        reason = lowering.supports(node, target)
        if reason:
            raise UnsupportedOp(f"node {node.name!r}: {name} cannot lower for {target.device}/{target.precision}: {reason}")
        used[name] = lowering.describe(target)
    return used


def translation_table(target: Target) -> dict[Callable, Callable]:
    out = {}
    for name, lowering in _lowerings().items():
        op = _torch_op(name)
        if op is not None:
            out[op] = lowering.translate(target)
    return out
