"""fold_attention_weights: the weight math in front of dsv3::mla_attention's wkv_b, done once at build.

Why: dsv3::mla_attention takes MLA's wkv_b as one dense [h * (dn + dv), c] matrix (the absorbed
W_UK / W_UV). In an fp8 checkpoint (DeepSeek's, or the fp8 presets) wkv_b is stored e4m3 with
128x128 scales, and the exported step dequantizes it on every call: an fp8 read, a bf16 write and
a bf16 re-read of the whole matrix per layer per step, one more kernel per layer (~3.5 us each in
the 16b batch-1 decode profile on the H200, 27 layers). Its value never depends on the inputs, so
it is computed here, once, and stored as a dense parameter; the fp8 weight and scale are dropped
when nothing else reads them.

Rewrite, per dsv3::mla_attention node whose wkv_b argument is computed (not a parameter) from
parameters and constants only:

    wkv_b = f(weight, scale, ...)        ->  wkv_b = <new parameter, f evaluated at build time>
    dsv3::mla_attention(..., wkv_b, s)       dsv3::mla_attention(..., wkv_b, s)

f is evaluated with the program's own ATen ops on the real tensors, so the folded matrix equals
what the step computed (bit for bit on the device the weights are on). The stored matrix is in
the dtype the attention received (bf16 for the 16b model: 2 bytes per value instead of ~1), a
storage cost of 0.4% of the 16b model's weights, paid back by the traffic saved every step.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.fx.node import map_arg

import dsv3_export.ops  # noqa: F401  (registers dsv3::mla_attention)
from dsv3_export.passes.base import PassConfig, PassError, PassResult
from dsv3_export.passes.graph_utils import ancestors, is_call
from dsv3_export.passes.program_state import ProgramState

PASS = "fold_attention_weights"
MLA = torch.ops.dsv3.mla_attention.default
WKV_B_ARG = 5  # dsv3::mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale)


def _evaluate(state: ProgramState, node: Node, cone: list[Node]) -> torch.Tensor:
    """node's value from the program's weights: its cone run op by op on the real tensors."""
    env: dict[Node, object] = {}
    for n in cone:
        if n.op == "placeholder":
            env[n] = state.tensor(state.target_of(n))
        elif n.op == "call_function":
            env[n] = n.target(*map_arg(n.args, env.__getitem__), **map_arg(n.kwargs, env.__getitem__))
        else:
            raise PassError(PASS, f"cannot evaluate a {n.op} node ({n.name}) at build time", node.name)
    value = env[node]
    if not isinstance(value, torch.Tensor):
        raise PassError(PASS, f"evaluates to {type(value).__name__}, not a tensor", node.name)
    return value


def _not_constant(state: ProgramState, cone: list[Node], mutated: set[str]) -> str | None:
    """Why the cone's value can change between steps (a user input, a buffer the step writes), or None."""
    for n in cone:
        if n.op != "placeholder":
            continue
        target = state.target_of(n)
        if target is None:
            return f"it reads the input {n.name!r}"
        if target in mutated:
            return f"it reads the buffer {target!r}, which the step updates"
    return None


def _mutated_state(state: ProgramState, program: ExportedProgram) -> set[str]:
    """Buffers the step writes: its buffer mutations (functional IR), or state placeholders that an
    in-place op writes (the non-functional IR torch.export also returns)."""
    mutated = set(program.graph_signature.buffers_to_mutate.values())
    for node in state.placeholders():
        writes = (u for u in node.users if u.op == "call_function" and getattr(u.target, "_schema", None) is not None
                  and u.target._schema.is_mutable)
        if any(writes) and state.target_of(node) is not None:
            mutated.add(state.target_of(node))
    return mutated


def _plain_parameter(node: Node, cone: list[Node]) -> bool:
    """True when node only re-labels one parameter (same dtype and shape: a no-op cast or view
    chain, which remove_noop_casts drops): nothing to compute, nothing to fold."""
    sources = [n for n in cone if n.op == "placeholder"]
    if len(sources) != 1:
        return False
    src, val = sources[0].meta["val"], node.meta["val"]
    return src.dtype == val.dtype and tuple(src.shape) == tuple(val.shape)


def _folded_name(state: ProgramState, cone: list[Node]) -> str:
    """"layers.0.attn.wkv_b.weight" (the cone's largest parameter) -> "layers.0.attn.wkv_b.folded"."""
    sources = [state.target_of(n) for n in cone if n.op == "placeholder"]
    source = max(sources, key=lambda t: state.tensor(t).numel())
    base = source.rsplit(".", 1)[0] + ".folded"
    name, i = base, 1
    while state.taken(name):
        name, i = f"{base}_{i}", i + 1
    return name


def fold_attention_weights(program: ExportedProgram, config: PassConfig) -> PassResult:
    state = ProgramState(program)
    mutated = _mutated_state(state, program)
    notes: list[str] = []
    folded: dict[Node, Node] = {}  # computed wkv_b -> its new parameter (shared by every reader)
    sources: list[str] = []
    attentions = [n for n in state.graph.nodes if is_call(n, MLA)]
    for node in attentions:
        wkv_b = node.args[WKV_B_ARG]
        if not isinstance(wkv_b, Node) or wkv_b.op == "placeholder":
            continue
        if wkv_b not in folded:
            cone = ancestors(wkv_b)
            if _plain_parameter(wkv_b, cone):
                continue
            why = _not_constant(state, cone, mutated)
            if why is not None:
                notes.append(f"{node.name}: wkv_b left alone: {why}")
                continue
            with torch.no_grad():
                value = _evaluate(state, wkv_b, cone).contiguous()
            want = wkv_b.meta["val"]
            if value.dtype != want.dtype or tuple(value.shape) != tuple(want.shape):
                raise PassError(PASS, f"evaluated to {value.dtype} {tuple(value.shape)}, the graph says "
                                      f"{want.dtype} {tuple(want.shape)}", wkv_b.name)
            sources += [state.target_of(n) for n in cone if n.op == "placeholder"]
            folded[wkv_b] = state.add_parameter(_folded_name(state, cone), value)
        node.replace_input_with(wkv_b, folded[wkv_b])
    if not folded:
        return PassResult(program, 0, notes or ["every attention's wkv_b is already a parameter"])
    state.eliminate_dead_code()
    removed = state.remove_if_unused(sources)
    computed = [n.name for n in attentions if n.args[WKV_B_ARG] in folded]
    if computed:
        raise PassError(PASS, f"attention(s) still read a computed wkv_b after the rewrite: {computed[:4]}")
    result = state.program()
    notes.append(f"{len(folded)} wkv_b computation(s) folded into parameters; {len(removed)} source tensor(s) "
                 f"dropped (e.g. {removed[0] if removed else '-'})")
    return PassResult(result, len(folded), notes)
