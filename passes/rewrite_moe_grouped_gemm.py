"""rewrite_moe_grouped_gemm: the exported shape-static MoE -> one dsv3::moe_experts per layer.

Why: to be exportable the MoE is traced in its static form (reference/moe.py forward_static):
every expert runs on EVERY token and is weighted by a dense [T, E] routing matrix that is zero
off the top-k, i.e. E/k times the needed FLOPs and E chains of nodes (64 x 26 layers for 16b).
The op computes only the routed (token, expert) pairs as grouped GEMMs.

Matched, per layer, starting from the routing scatter (one linear scan of the graph):

    routing = scatter(zeros([T, E]), 1, topk_ids, topk_weights)       # [T, E]
    y0 = zeros_like(x)
    for i in 0..E-1:                                                   # any order of the adds
        h_i = mul(silu(linear(x, W1_i)), linear(x, W3_i))              # [T, I]
        y_{i+1} = add(y_i, mul(linear(h_i, W2_i), unsqueeze(select(routing, 1, i), 1)))
becomes
    y_E = dsv3::moe_experts(x, topk_weights, topk_ids, w13, w2)        # w13 [E, 2I, D], w2 [E, D, I]
with new parameters <moe>.w13 (rows [W1_i; W3_i]) and <moe>.w2; the per-expert parameters leave
the program. W_i may be dense parameters or fp8 dequant subgraphs (an fp8 checkpoint); fp8 experts
are stacked as they are (never re-quantized) into dsv3::moe_experts_fp8(..., act_quant=False),
which keeps the program's weight-only semantics (quantize_fp8_blockwise may later turn on
activation quantization). Each fp8 half is padded to a multiple of 128 rows with zeros so the
stacked matrix is blocked uniformly (exact: silu(0) * 0 = 0). Shared experts (a dense MLP) stay.

Guards (a near-miss note, nothing rewritten for that layer): routing matrix or a routing column
used by anything else, a partial sum of experts used elsewhere, expert intermediates used outside
their expert, experts reading different inputs, experts of different shapes or dtypes, weights
that are not parameters, mixed dense/fp8 experts, an fp8 block size other than 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import dsv3_export.ops.moe  # noqa: F401  (registers dsv3::moe_experts*)
from dsv3_export.ops.fp8 import FP8_BLOCK
from dsv3_export.passes.base import PassConfig, PassError, PassResult
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState
from dsv3_export.passes.sites import apply_rewrites, scan_sites
from dsv3_export.passes.weight_source import DenseWeight, Fp8Weight, match_linear, resolve_weight
from dsv3_export.reference.fp8 import cdiv

PASS = "rewrite_moe_grouped_gemm"
aten = torch.ops.aten
ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)


@dataclass
class Expert:
    w1: DenseWeight | Fp8Weight
    w3: DenseWeight | Fp8Weight
    w2: DenseWeight | Fp8Weight


@dataclass
class MoESite:
    scatter: Node
    x: Node  # tokens [T, D]
    topk_ids: Node  # [T, k] int64
    topk_weights: Node  # [T, k]
    experts: list[Expert]  # by expert index
    last_add: Node  # the sum over all experts, replaced by the op
    prefix: str  # module path of the MoE, e.g. "layers.1.ffn"

    @property
    def fp8(self) -> bool:
        return isinstance(self.experts[0].w1, Fp8Weight)


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: Node, known: Node) -> object:
    """The other operand of a binary node that has `known` as one operand."""
    a, b = node.args[:2]
    return b if a is known else a


def match_expert(state: ProgramState, out: Node, i: int) -> tuple[Node, Expert] | str:
    """out = linear(mul(silu(linear(x, W1)), linear(x, W3)), W2) -> (x, weights) or a reason."""
    down = match_linear(out)
    if down is None or down.bias is not None:
        return f"expert {i}: output {out.name} is not a bias-free Linear"
    h = down.x
    if not is_call(h, aten.mul.Tensor) or len(h.users) != 1:
        return f"expert {i}: {h.name} is not a SwiGLU product used only by w2"
    a, b = h.args[:2]
    gate_act, up = (a, b) if is_call(a, aten.silu.default) else (b, a)
    if not is_call(gate_act, aten.silu.default) or len(gate_act.users) != 1:
        return f"expert {i}: no silu(w1 x) feeding {h.name}"
    gate, up = match_linear(gate_act.args[0]), match_linear(up) if isinstance(up, Node) else None
    if gate is None or up is None or gate.bias is not None or up.bias is not None:
        return f"expert {i}: w1/w3 of {h.name} are not bias-free Linears"
    if len(gate.node.users) != 1 or len(up.node.users) != 1:
        return f"expert {i}: w1 or w3 output is used outside the expert"
    if gate.x is not up.x:
        return f"expert {i}: w1 and w3 read different inputs ({gate.x.name}, {up.x.name})"
    weights = [resolve_weight(state, s.weight) for s in (gate, up, down)]
    for name, w in zip(("w1", "w3", "w2"), weights):
        if w is None:
            return f"expert {i}: {name} weight is not a parameter (or an fp8 dequant of one)"
    return gate.x, Expert(*weights)


def _shape(w: DenseWeight | Fp8Weight) -> tuple[tuple[int, ...], torch.dtype]:
    v = (w.param if isinstance(w, DenseWeight) else w.weight).meta["val"]
    return tuple(v.shape), v.dtype


def _check_experts(experts: list[Expert]) -> str | None:
    kinds = {type(w) for e in experts for w in (e.w1, e.w3, e.w2)}
    if len(kinds) != 1:
        return "experts mix dense and fp8 weights"
    (w1_shape, dtype), (w3_shape, _), (w2_shape, _) = (_shape(w) for w in (experts[0].w1, experts[0].w3, experts[0].w2))
    if w1_shape != w3_shape or w2_shape != w1_shape[::-1]:
        return f"expert 0: w1 {w1_shape}, w3 {w3_shape}, w2 {w2_shape} are not [I, D], [I, D], [D, I]"
    for i, e in enumerate(experts):
        got = tuple(_shape(w) for w in (e.w1, e.w3, e.w2))
        if got != ((w1_shape, dtype), (w3_shape, dtype), (w2_shape, dtype)):
            want = (w1_shape, w3_shape, w2_shape, dtype)
            return f"experts of different shapes/dtypes: expert {i} has {got}, expert 0 has {want}"
        if isinstance(e.w1, Fp8Weight) and {e.w1.block_size, e.w3.block_size, e.w2.block_size} != {FP8_BLOCK}:
            return f"expert {i}: fp8 block size {e.w1.block_size} is not {FP8_BLOCK} (the dsv3 ops' block)"
    return None


def _module_prefix(state: ProgramState, site_scatter: Node, expert: Expert) -> str:
    target = state.target_of(expert.w1.param if isinstance(expert.w1, DenseWeight) else expert.w1.weight)
    if target and ".experts." in target:
        return target.split(".experts.")[0]
    stack = site_scatter.meta.get("nn_module_stack") or {}
    if stack:
        return list(stack.values())[-1][0]
    return f"moe_{site_scatter.name}"


def match_moe(state: ProgramState, scatter: Node) -> MoESite | str:
    """The static MoE hanging off a routing scatter, or the reason it is not one."""
    base, dim, ids, weights = scatter.args[:4]
    routing = scatter.meta.get("val")
    if routing is None or routing.dim() != 2 or dim not in (1, -1) or not isinstance(routing.shape[1], int):
        return "not a [T, E] scatter along dim 1 with a static E"
    if not is_call(base, *ZEROS):
        return f"routing base {getattr(base, 'name', base)} is not zeros"
    n_experts = routing.shape[1]
    columns: dict[int, Node] = {}
    for user in scatter.users:
        if not (is_call(user, aten.select.int) and user.args[1] in (1, -1) and isinstance(user.args[2], int)):
            return f"routing matrix also used by {user.name} ({user.target}), not only per-expert columns"
        columns[user.args[2] % n_experts] = user
    if sorted(columns) != list(range(n_experts)) or len(columns) != len(scatter.users):
        return f"routing columns {sorted(columns)} are not each of the {n_experts} experts exactly once"

    experts, adds, x = [], {}, None
    for i in range(n_experts):
        col = _only_user(columns[i])
        if not (is_call(col, aten.unsqueeze.default) and col.args[1] in (1, -1)):
            users = [u.name for u in columns[i].users]
            return f"routing column {i} used elsewhere (users of {columns[i].name}: {users})"
        scaled = _only_user(col)
        if not is_call(scaled, aten.mul.Tensor):
            return f"routing column {i} used elsewhere (users of {col.name}: {[u.name for u in col.users]})"
        out = _other(scaled, col)
        add = _only_user(scaled)
        if not isinstance(out, Node) or len(out.users) != 1 or not is_call(add, aten.add.Tensor) or "alpha" in add.kwargs:
            return f"expert {i}'s weighted output {scaled.name} is not only added to the expert sum"
        matched = match_expert(state, out, i)
        if isinstance(matched, str):
            return matched
        xi, expert = matched
        if x is not None and xi is not x:
            return f"experts read different inputs ({x.name}, expert {i}: {xi.name})"
        x = xi
        experts.append(expert)
        adds[add] = scaled

    # the adds must form one chain zeros -> ... -> last, with no partial sum used elsewhere
    heads = [a for a, s in adds.items() if _other(a, s) not in adds]
    if len(heads) != 1 or not is_call(_other(heads[0], adds[heads[0]]), *ZEROS):
        return "the expert outputs are not summed in one chain starting from zeros"
    node, length = heads[0], 1
    while True:
        nxt = [u for u in node.users if u in adds]
        if not nxt:
            break
        if len(node.users) != 1:
            return f"partial sum of experts {node.name} is used outside the sum"
        node, length = nxt[0], length + 1
    if length != n_experts:
        return f"the expert sum chain has {length} of {n_experts} experts"
    if (reason := _check_experts(experts)) is not None:
        return reason
    d = _shape(experts[0].w2)[0][0]
    if x.meta["val"].dim() != 2 or x.meta["val"].shape[1] != d:
        return f"expert input {x.name} is not [T, {d}]"
    if weights.meta["val"].shape != ids.meta["val"].shape or ids.meta["val"].dtype != torch.int64:
        return "routing weights/indices are not matching [T, k] / int64 tensors"
    return MoESite(scatter, x, ids, weights, experts, node, _module_prefix(state, scatter, experts[0]))


def _stack_dense(state: ProgramState, site: MoESite) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.stack([torch.cat([state.tensor(state.target_of(e.w1.param)), state.tensor(state.target_of(e.w3.param))])
                       for e in site.experts])  # [E, 2I, D]
    w2 = torch.stack([state.tensor(state.target_of(e.w2.param)) for e in site.experts])  # [E, D, I]
    return w13, w2


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim -2 of t up to `rows` (fp8 included: the zero byte is +0.0 in e4m3)."""
    out = torch.zeros(*t.shape[:-2], rows, t.shape[-1], dtype=t.dtype, device=t.device)
    out[..., : t.shape[-2], :] = t
    return out


def _stack_fp8(state: ProgramState, site: MoESite) -> tuple[torch.Tensor, ...]:
    """fp8 experts stacked as-is: w13 [E, 2I', D], w13_scale, w2 [E, D, I'], w2_scale; I' = I rounded up to 128."""
    inter = site.experts[0].w1.weight.meta["val"].shape[0]
    padded = cdiv(inter, FP8_BLOCK) * FP8_BLOCK
    get = lambda node: state.tensor(state.target_of(node))  # noqa: E731
    w13 = torch.stack([torch.cat([pad_rows(get(e.w1.weight), padded), pad_rows(get(e.w3.weight), padded)])
                       for e in site.experts])  # [E, 2I', D]
    # [E, 2I'/128, D/128]: each half's own blocks, which the padding aligns with the stacked matrix's
    w13_scale = torch.stack([torch.cat([get(e.w1.scale), get(e.w3.scale)]) for e in site.experts])
    w2 = torch.stack([pad_rows(get(e.w2.weight).T, padded).T for e in site.experts])  # [E, D, I']
    w2_scale = torch.stack([get(e.w2.scale) for e in site.experts])  # [E, D/128, I'/128]
    return w13, w13_scale, w2, w2_scale


def _rewrite(state: ProgramState, site: MoESite) -> list[str]:
    """Insert the op, reroute the sum's users to it; returns the parameters it made obsolete."""
    p = site.prefix
    if site.fp8:
        w13, w13_scale, w2, w2_scale = _stack_fp8(state, site)
        args = (state.add_parameter(f"{p}.w13", w13), state.add_parameter(f"{p}.w13_scale", w13_scale),
                state.add_parameter(f"{p}.w2", w2), state.add_parameter(f"{p}.w2_scale", w2_scale), False)
        op = torch.ops.dsv3.moe_experts_fp8.default
        old = [n for e in site.experts for w in (e.w1, e.w3, e.w2) for n in (w.weight, w.scale)]
    else:
        w13, w2 = _stack_dense(state, site)
        args = (state.add_parameter(f"{p}.w13", w13), state.add_parameter(f"{p}.w2", w2))
        op = torch.ops.dsv3.moe_experts.default
        old = [w.param for e in site.experts for w in (e.w1, e.w3, e.w2)]
    with state.graph.inserting_before(site.last_add):
        moe = state.call(op, (site.x, site.topk_weights, site.topk_ids, *args), meta_from=site.scatter)
    if moe.meta["val"].dtype != site.last_add.meta["val"].dtype:
        raise PassError(PASS, f"op output dtype {moe.meta['val'].dtype} differs from the expert sum's "
                              f"{site.last_add.meta['val'].dtype}", site.last_add.name)
    site.last_add.replace_all_uses_with(moe)
    return [state.target_of(n) for n in old]


def rewrite_moe_grouped_gemm(program: ExportedProgram, config: PassConfig) -> PassResult:
    state = ProgramState(program)
    # one scan; matching only looks near each routing scatter
    sites, notes = scan_sites(state, lambda n: n.target is aten.scatter.src, match_moe, "not rewritten")
    if not sites:
        return PassResult(program, 0, notes)
    obsolete = apply_rewrites(state, sites, _rewrite, PASS, "per-expert parameters")
    for site in sites:
        if not site.scatter._erased:
            raise PassError(PASS, "the static expert chains are still in the graph after the rewrite",
                            site.scatter.name)
    n_fp8 = sum(site.fp8 for site in sites)
    notes.append(f"{len(sites) - n_fp8} MoE layer(s) -> dsv3::moe_experts, {n_fp8} -> dsv3::moe_experts_fp8; "
                 f"removed {len(obsolete)} per-expert tensors")
    return PassResult(state.program(), len(sites), notes)
