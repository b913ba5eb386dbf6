"""fuse_shared_input_linears: Linears that read the same activation -> one GEMM + slices.

Why: at batch-1 decode a step is a chain of small dependent kernels (act_quant + GEMM per
Linear, each ~5-15 us on the H200), far above the weight-bandwidth floor. Linears that read the
same input can be one GEMM over their stacked weights: attention's wq and wkv_a (q_lora_rank 0)
read the same normed x, an MLP's w1 and w3 (and an MoE layer's gate, bf16/fp32) read the same x.
On the fp8 path the two act_quant of x become one too.

Rewrites, per group of 2+ Linears with the same input node (graph order kept):

    linear(x, cast*(W_i))  i = 1..n,  W_i dense parameters [N_i, K], same dtype, no bias
        -> y = linear(x, W)            W = cat(W_1..W_n) [sum N_i, K], a new parameter
    dsv3::fp8_linear(x, Wq_i, Ws_i, act_quant)  same act_quant flag
        -> y = dsv3::fp8_linear(x, cat(Wq_i), cat(Ws_i), act_quant)
    and every old output -> slice(y, -1, offset_i, offset_i + N_i)

fp8 concatenation is bit-exact only when no 128x128 scale block straddles two weights: every
weight but the last must have N % 128 == 0. Aligned weights go first, one ragged weight may go
last; a group left with fewer than two members is noted as a near-miss (tiny: wq 192 / wkv_a 80;
16b: the dense MLP's w1 / w3, 10944 rows). Linears with a bias are not fused (the reference model
has none), nor weights that feed anything else (their bytes would be stored twice). The old
weights are dropped once unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import dsv3_export.ops.fp8  # noqa: F401  (registers dsv3::fp8_linear)
from dsv3_export.ops.fp8 import FP8_BLOCK
from dsv3_export.passes.base import PassConfig, PassError, PassResult
from dsv3_export.passes.program_state import ProgramState
from dsv3_export.passes.weight_source import DenseWeight, resolve_weight

PASS = "fuse_shared_input_linears"
aten = torch.ops.aten
LINEAR = aten.linear.default
FP8_LINEAR = torch.ops.dsv3.fp8_linear.default
_ASSERT_METADATA = aten._assert_tensor_metadata.default


@dataclass(frozen=True)
class _Member:
    node: Node  # the linear / fp8_linear
    targets: tuple[str, ...]  # state names: (weight,) or (weight, scale)
    rows: int  # N


def _sole_consumer(param: Node, node: Node, chain: tuple[Node, ...]) -> bool:
    """True when `param` reaches nothing but `node` through `chain` (its casts; metadata asserts ignored)."""
    stack = [param]
    while stack:
        for user in stack.pop().users:
            if user is node or user.target is _ASSERT_METADATA:
                continue
            if user not in chain:
                return False
            stack.append(user)
    return True


def _member(state: ProgramState, node: Node) -> tuple[tuple, _Member] | str:
    """(group key, member) for a fusable Linear, else the reason it is not one."""
    x = node.args[0]
    if node.target is FP8_LINEAR:
        weight, scale, act = node.args[1:4]
        if not all(isinstance(n, Node) and state.target_of(n) is not None for n in (weight, scale)):
            return "fp8 weight or scale is not a parameter"
        if not all(_sole_consumer(n, node, ()) for n in (weight, scale)):
            return f"{state.target_of(weight)} also feeds other nodes"
        val = weight.meta["val"]
        key = ("fp8", x, val.dtype, tuple(val.shape[1:]), bool(act))
        return key, _Member(node, (state.target_of(weight), state.target_of(scale)), int(val.shape[0]))
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None:
        return "has a bias"
    source = resolve_weight(state, node.args[1])
    if not isinstance(source, DenseWeight):
        return "weight is not a dense parameter"
    if not _sole_consumer(source.param, node, source.chain):
        return f"{state.target_of(source.param)} also feeds other nodes"
    val, used = source.param.meta["val"], node.args[1].meta["val"]
    key = ("dense", x, val.dtype, used.dtype, tuple(val.shape[1:]))
    return key, _Member(node, (state.target_of(source.param),), int(val.shape[0]))


def _fp8_order(members: list[_Member], notes: list[str]) -> list[_Member]:
    """Aligned weights first, then at most one ragged one (no scale block may straddle a seam)."""
    aligned = [m for m in members if m.rows % FP8_BLOCK == 0]
    ragged = [m for m in members if m.rows % FP8_BLOCK != 0]
    chosen = aligned + ragged[:1]
    if len(ragged) > 1:
        names = ", ".join(f"{m.targets[0]} ({m.rows} rows)" for m in ragged)
        kept = "fusing the rest" if len(chosen) >= 2 else "group left alone"
        notes.append(f"near-miss at {members[0].node.args[0].name}: fp8 weights {names} have N % {FP8_BLOCK} != 0; "
                     f"only the last may be ragged (a 128x128 scale block would straddle the seam): {kept}")
    return chosen if len(chosen) >= 2 else []


def _fused_name(state: ProgramState, targets: list[str], suffix: str) -> str:
    """"layers.0.attn.wq.weight" + "layers.0.attn.wkv_a.weight" -> "layers.0.attn.wq_wkv_a.weight"."""
    paths = [t.rsplit(".", 1)[0].split(".") for t in targets]
    common = 0
    while all(len(p) > common + 1 and p[common] == paths[0][common] for p in paths):
        common += 1
    name = ".".join(paths[0][:common] + ["_".join("_".join(p[common:]) for p in paths)]) + suffix
    unique, i = name, 1
    while state.taken(unique):
        unique, i = f"{name}_{i}", i + 1
    return unique


def _fuse(state: ProgramState, members: list[_Member], order: dict[Node, int]) -> None:
    first = min(members, key=lambda m: order[m.node]).node
    x = first.args[0]
    weights = [state.tensor(m.targets[0]) for m in members]
    fused_w = state.add_parameter(_fused_name(state, [m.targets[0] for m in members], ".weight"),
                                  torch.cat(weights))  # [sum N, K]
    with state.graph.inserting_before(first):
        if first.target is FP8_LINEAR:
            scales = torch.cat([state.tensor(m.targets[1]) for m in members])  # [sum ceil(N/128), ceil(K/128)]
            fused_s = state.add_parameter(_fused_name(state, [m.targets[0] for m in members], ".scale"), scales)
            y = state.call(FP8_LINEAR, (x, fused_w, fused_s, first.args[3]), meta_from=first)
        else:
            w = fused_w
            dtype = first.args[1].meta["val"].dtype
            if weights[0].dtype != dtype:
                w = state.call(aten.to.dtype, (fused_w, dtype), meta_from=first)
            y = state.call(LINEAR, (x, w), meta_from=first)
    last = y.meta["val"].dim() - 1
    offset = 0
    for m in members:
        with state.graph.inserting_before(m.node):
            part = state.call(aten.slice.Tensor, (y, last, offset, offset + m.rows), meta_from=m.node)
        offset += m.rows
        old, new = m.node.meta["val"], part.meta["val"]
        if old.dtype != new.dtype or old.dim() != new.dim():
            raise PassError(PASS, f"slice gives {new.dtype} rank {new.dim()}, the Linear gave {old.dtype} "
                                  f"rank {old.dim()}", m.node.name)
        m.node.replace_all_uses_with(part)
        state.graph.erase_node(m.node)


def fuse_shared_input_linears(program: ExportedProgram, config: PassConfig) -> PassResult:
    state = ProgramState(program)
    notes: list[str] = []
    groups: dict[tuple, list[_Member]] = {}
    skipped: dict[str, list[str]] = {}
    for node in state.graph.nodes:
        if node.op != "call_function" or node.target not in (LINEAR, FP8_LINEAR) or not isinstance(node.args[0], Node):
            continue
        found = _member(state, node)
        if isinstance(found, str):
            skipped.setdefault(found, []).append(node.name)
            continue
        key, member = found
        groups.setdefault(key, []).append(member)

    fused = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        if key[0] == "fp8":
            members = _fp8_order(members, notes)
            if not members:
                continue
        fused.append(members)
    for why, names in skipped.items():
        notes.append(f"not fused ({why}): {len(names)} Linear(s), e.g. {names[0]}")
    if not fused:
        return PassResult(program, 0, notes or ["no two Linears with constant weights share an input"])

    order = {n: i for i, n in enumerate(state.graph.nodes)}
    with torch.no_grad():
        for members in fused:
            _fuse(state, members, order)
    state.eliminate_dead_code()
    removed = state.remove_if_unused([t for members in fused for m in members for t in m.targets])
    stale = [t for members in fused for m in members for t in m.targets if t not in removed]
    if stale:
        raise PassError(PASS, f"fused weights still in use after the rewrite: {stale[:4]}")
    result = state.program()
    sizes = ", ".join("+".join(str(m.rows) for m in members) for members in fused[:4])
    notes.append(f"{len(fused)} group(s) of {sum(map(len, fused))} Linears fused (rows {sizes}"
                 f"{', ...' if len(fused) > 4 else ''})")
    return PassResult(result, len(fused), notes)
