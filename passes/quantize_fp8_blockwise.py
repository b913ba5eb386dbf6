"""quantize_fp8_blockwise: Linear and expert weights -> fp8 e4m3 + 128x128 fp32 block scales.

Why: decode is bound by reading weights (DESIGN.md: ~4.9 GB/token in bf16 for 16b, ~2.5 GB in
fp8), and the H200's fp8 tensor cores are ~1.8x its bf16 ones. DeepSeek-V3 is trained with this
exact scheme, so its fp8 checkpoints run as they are.

Rewrites (config.precision == "fp8"; anything else is a no-op):

    linear(x, W) / mm(x, t(W)) / addmm(b, x, t(W)),  W a dense parameter [N, K]
        -> dsv3::fp8_linear(x, Wq, Ws, act_quant)     Wq, Ws = reference.fp8.weight_quant(W)
           (W is replaced in place by Wq under its own name, Ws is added as <module>.scale: the
           names of an fp8 DeepSeek checkpoint)
    linear(x, dequant(Wq, Ws))                        an fp8 checkpoint's Linear (see weight_source)
        -> dsv3::fp8_linear(x, Wq, Ws, act_quant)     the existing bytes, NEVER re-quantized
    dsv3::moe_experts(x, tw, ti, w13, w2)
        -> dsv3::moe_experts_fp8(x, tw, ti, w13q, w13s, w2q, w2s, act_quant)
           each expert's [w1; w3] and w2 quantized with weight_quant after padding I to a multiple
           of 128 (zero rows/cols, exact), so no scale block straddles the w1/w3 seam
    dsv3::moe_experts_fp8(..., act_quant=not config.fp8_activations)  -> act_quant flipped
    (act_quant = config.fp8_activations: dynamic 1x128 activation quantization)

Kept in high precision: weights whose name contains one of config.fp8_skip (embed, gate, norm,
head by default: tiny, and the logits and routing decisions are the most sensitive), and weights
that are not a Linear's: MLA's wkv_b is consumed whole by dsv3::mla_attention (or by the absorbed
einsums before fuse_mla_absorb), which takes a dense [h*(dn+dv), c] matrix; quantizing it would
only save storage (the attention kernel reads it once per step, not per token) and would need an
fp8 variant of the attention op, for 0.4% of the 16b model's weights (27 x 4096 x 512), so it
stays dense and the pass notes it. A dense weight that also feeds something other than the
rewritten Linears stays dense too (noted).

The pass notes the program's weight bytes before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

import dsv3_export.ops.fp8  # noqa: F401  (registers dsv3::fp8_linear)
import dsv3_export.ops.moe  # noqa: F401  (registers dsv3::moe_experts*)
from dsv3_export.ops.fp8 import FP8_BLOCK
from dsv3_export.passes.base import PassConfig, PassError, PassResult
from dsv3_export.passes.program_state import ProgramState, state_nbytes
from dsv3_export.passes.rewrite_moe_grouped_gemm import pad_rows
from dsv3_export.passes.weight_source import (TRANSPOSES, DenseWeight, Fp8Weight, LinearSite, match_linear,
                                              resolve_weight)
from dsv3_export.reference.fp8 import FP8_DTYPE, cdiv, weight_quant

PASS = "quantize_fp8_blockwise"
aten = torch.ops.aten
FP8_LINEAR = torch.ops.dsv3.fp8_linear.default
MOE = torch.ops.dsv3.moe_experts.default
MOE_FP8 = torch.ops.dsv3.moe_experts_fp8.default
_ASSERT_METADATA = aten._assert_tensor_metadata.default


@dataclass
class _Linear:
    site: LinearSite
    weight: DenseWeight | Fp8Weight
    target: str  # the weight's state name


def scale_name(weight_target: str) -> str:
    """"layers.0.attn.wq.weight" -> "layers.0.attn.wq.scale" (DeepSeek's fp8 checkpoint names)."""
    if weight_target.endswith(".weight"):
        return weight_target[: -len(".weight")] + ".scale"
    return weight_target + "_scale"


def _skipped(target: str, config: PassConfig) -> str | None:
    return next((s for s in config.fp8_skip if s in target), None)


def _other_consumer(param: Node, group: list[_Linear]) -> Node | None:
    """A node reading `param` (through casts) that is not one of the group's Linears, else None."""
    ends = {lin.site.node for lin in group}
    through = {n for lin in group for n in lin.weight.chain}
    through |= {a for lin in group for a in lin.site.node.args  # mm / addmm: the transpose of W
                if isinstance(a, Node) and a.target in TRANSPOSES and a.args[0] is lin.site.weight}
    stack = [param]
    while stack:
        for user in stack.pop().users:
            if user.target is _ASSERT_METADATA or user in ends:
                continue
            if user not in through:
                return user
            stack.append(user)
    return None


def _collect(state: ProgramState, config: PassConfig, notes: list[str]) -> tuple[list[_Linear], list[Node]]:
    """One scan: the Linears with parameter weights (not skipped) and the MoE expert ops."""
    linears, moes, skipped = [], [], {}
    for node in state.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (MOE, MOE_FP8):
            moes.append(node)
            continue
        site = match_linear(node)
        if site is None:
            continue
        weight = resolve_weight(state, site.weight)
        if weight is None:
            continue  # activation x activation: not a Linear
        target = state.target_of(weight.param if isinstance(weight, DenseWeight) else weight.weight)
        if (why := _skipped(target, config)) is not None:
            skipped.setdefault(why, []).append(target)
            continue
        linears.append(_Linear(site, weight, target))
    for why, targets in skipped.items():
        notes.append(f"kept high precision (fp8_skip {why!r}): {len(targets)} weight(s), e.g. {targets[0]}")
    return linears, moes


def _quantize_dense(state: ProgramState, group: list[_Linear], notes: list[str]) -> tuple[Node, Node] | None:
    """Replace a dense [N, K] parameter by its fp8 form in place and add its scale."""
    target = group[0].target
    param = group[0].weight.param
    dense = state.tensor(target)
    if dense.dim() != 2 or not dense.is_floating_point() or dense.dtype == FP8_DTYPE:
        notes.append(f"kept {target}: {tuple(dense.shape)} {dense.dtype} is not a dense 2-D float weight")
        return None
    if dense.numel() == 0:
        # n_shared_experts=0 leaves empty shared-expert Linears ([0, D], [D, 0]) when fuse_shared_experts does not
        # run: as fp8_linear they failed at run time (a reshape to [-1, 0], in eager and in ONNX Runtime).
        notes.append(f"kept {target} dense: {tuple(dense.shape)} is empty (nothing to quantize)")
        return None
    other = _other_consumer(param, group)
    if other is not None:
        notes.append(f"kept {target} dense: it also feeds {other.name} ({other.target}), not only Linears")
        return None
    scale_target = scale_name(target)
    if state.has(scale_target):
        raise PassError(PASS, f"cannot add scale {scale_target!r}: the name is taken", param.name)
    q, s = weight_quant(dense, FP8_BLOCK)
    weight = state.replace(target, q)
    return weight, state.add_parameter(scale_target, s)


def _rewrite_linear(state: ProgramState, lin: _Linear, weight: Node, scale: Node, act_quant: bool) -> None:
    node = lin.site.node
    with state.graph.inserting_before(node):
        new = state.call(FP8_LINEAR, (lin.site.x, weight, scale, act_quant), meta_from=node)
        if lin.site.bias is not None:
            new = state.call(aten.add.Tensor, (new, lin.site.bias), meta_from=node)
    old, got = node.meta["val"], new.meta["val"]
    if old.dtype != got.dtype or old.dim() != got.dim():
        raise PassError(PASS, f"fp8_linear gives {got.dtype} rank {got.dim()}, the Linear gave {old.dtype} "
                              f"rank {old.dim()}", node.name)
    node.replace_all_uses_with(new)


def _quantize_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Dense [E, 2I, D], [E, D, I] -> fp8 stacks with I padded to a multiple of 128, and their scales."""
    inter = w2.shape[2]
    padded = cdiv(inter, FP8_BLOCK) * FP8_BLOCK
    q13, s13, q2, s2 = [], [], [], []
    for e in range(w13.shape[0]):
        up = torch.cat([pad_rows(w13[e, :inter], padded), pad_rows(w13[e, inter:], padded)])  # [2I', D]
        q, s = weight_quant(up, FP8_BLOCK)
        q13.append(q), s13.append(s)
        q, s = weight_quant(pad_rows(w2[e].T, padded).T, FP8_BLOCK)  # [D, I']
        q2.append(q), s2.append(s)
    return torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)


def _rewrite_moe(state: ProgramState, node: Node, config: PassConfig, notes: list[str]) -> bool:
    if node.target is MOE_FP8:
        if node.args[7] == config.fp8_activations:
            return False
        node.args = (*node.args[:7], config.fp8_activations)  # already fp8: only the activation mode
        return True
    x, tw, ti, w13_node, w2_node = node.args
    targets = [state.target_of(n) if isinstance(n, Node) else None for n in (w13_node, w2_node)]
    if None in targets:
        notes.append(f"{node.name}: kept dense: expert weights are not parameters")
        return False
    if (why := next((_skipped(t, config) for t in targets if _skipped(t, config)), None)) is not None:
        notes.append(f"{node.name}: kept dense (fp8_skip {why!r})")
        return False
    if any(set(n.users) - {node} - {u for u in n.users if u.target is _ASSERT_METADATA} for n in (w13_node, w2_node)):
        notes.append(f"{node.name}: kept dense: its stacked weights have other users")
        return False
    q13, s13, q2, s2 = _quantize_experts(state.tensor(targets[0]), state.tensor(targets[1]))
    w13 = state.replace(targets[0], q13)
    w2 = state.replace(targets[1], q2)
    s13_node = state.add_parameter(targets[0] + "_scale", s13)
    s2_node = state.add_parameter(targets[1] + "_scale", s2)
    with state.graph.inserting_before(node):
        new = state.call(MOE_FP8, (x, tw, ti, w13, s13_node, w2, s2_node, config.fp8_activations), meta_from=node)
    node.replace_all_uses_with(new)
    state.graph.erase_node(node)
    return True


def _left_unquantized(state: ProgramState, config: PassConfig) -> list[str]:
    """Name the 2-D weights (not in fp8_skip) the pass left dense or dequantized in the graph."""
    dense, dequantized = [], []
    for spec in state.input_specs:
        if spec.kind != InputKind.PARAMETER or _skipped(spec.target, config):
            continue
        val = state.node_of(spec.target).meta["val"]
        if val.dim() != 2 or val.dtype == torch.float32 and spec.target.endswith("scale"):
            continue
        users = state.node_of(spec.target).users
        if val.dtype == FP8_DTYPE:
            if any(u.target not in (FP8_LINEAR, _ASSERT_METADATA) for u in users):
                dequantized.append(spec.target)
        elif val.is_floating_point():
            dense.append(spec.target)
    notes = []
    if dense:
        notes.append(f"kept dense: {len(dense)} weight(s) not consumed as Linear weights "
                     f"(wkv_b goes whole into the attention), e.g. {dense[0]}")
    if dequantized:
        notes.append(f"fp8 weight(s) still dequantized in the graph for non-Linear consumers: {len(dequantized)}, "
                     f"e.g. {dequantized[0]}")
    return notes


def quantize_fp8_blockwise(program: ExportedProgram, config: PassConfig) -> PassResult:
    if config.precision != "fp8":
        return PassResult(program, 0, [f"precision is {config.precision!r}, not 'fp8': nothing to quantize"])
    if config.block_size != FP8_BLOCK:
        raise PassError(PASS, f"block_size {config.block_size} is not supported: the dsv3 fp8 ops use {FP8_BLOCK}")
    state = ProgramState(program)
    notes: list[str] = []
    linears, moes = _collect(state, config, notes)

    matches, reused = 0, 0
    groups: dict[str, list[_Linear]] = {}
    replaced: list[str] = []
    with torch.no_grad():
        for lin in linears:
            if isinstance(lin.weight, Fp8Weight):
                if lin.weight.block_size != FP8_BLOCK:
                    notes.append(f"{lin.site.node.name}: kept: fp8 block {lin.weight.block_size} is not {FP8_BLOCK}")
                    continue
                _rewrite_linear(state, lin, lin.weight.weight, lin.weight.scale, config.fp8_activations)
                matches, reused = matches + 1, reused + 1
            else:
                groups.setdefault(lin.target, []).append(lin)
        for target, group in groups.items():
            quantized = _quantize_dense(state, group, notes)
            if quantized is None:
                continue
            replaced.append(target)
            for lin in group:
                _rewrite_linear(state, lin, *quantized, config.fp8_activations)
                matches += 1
        for node in moes:
            matches += _rewrite_moe(state, node, config, notes)
    if matches == 0:
        return PassResult(program, 0, notes)

    state.eliminate_dead_code()
    stale = [u.name for t in replaced for u in state.node_of(t).users
             if u.target not in (FP8_LINEAR, _ASSERT_METADATA)]
    if stale:
        raise PassError(PASS, f"quantized weights still read by non-fp8 nodes: {stale[:4]}")
    notes += _left_unquantized(state, config)
    result = state.program()
    before, after = (state_nbytes(p, (InputKind.PARAMETER,)) for p in (program, result))
    notes.append(f"{matches} rewrite(s) ({reused} fp8 checkpoint Linear(s) reused as they are); "
                 f"weights {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB (parameters only)")
    return PassResult(result, matches, notes)
