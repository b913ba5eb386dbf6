"""fuse_mla_absorb: the absorbed MLA attention subgraph of each layer -> one dsv3::mla_attention.

Why: the exported graph computes absorbed attention as six einsums, two masks, a softmax over
[cache | new] and a split; a backend can only run FlashMLA-style kernels (one pass over the
576-wide latent cache for all heads) if it sees the whole thing as one op.

Matched IR (exactly what `dsv3_export.step.absorbed_attention` traces to; per layer):

    w      = view(wkv_b, [h, -1, c]);  w_uk = slice(w, 1, 0, dn);  w_uv = slice(w, 1, dn, end)
    q      = cat([einsum("bshd,hdc->bshc", q_nope, w_uk), q_pe], -1)
    past   = masked_fill(einsum("bshk,btk->bsht", q, kv_cache) * scale, ~(arange(T) < start_pos), -inf)
    new    = masked_fill(einsum("bshk,buk->bshu", q, kv_new) * scale, ~tril(ones(s, s)), -inf)
    p_past, p_new = split(type_as(softmax(cat([past, new], -1), fp32), q), [T, s], -1)
    out    = einsum("bshc,hdc->bshd", einsum(p_past, kv_cache[..., :c]) + einsum(p_new, kv_new[..., :c]), w_uv)

becomes

    out    = dsv3::mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, scale)

The naive formulation a naive-mode model exports (`step.naive_attention`: the latent cache and
new positions expanded through wkv_b into per-head K/V, one masked softmax over [cache | new],
tail einsum "bsht,bthd->bshd") is the same function and becomes the same op.

The patterns are not hand-written: they are traced from `absorbed_attention` / `naive_attention`
with marker sizes, and the sizes (b, h, dn, c, T, s), the softmax scale and the device become
wildcards that the match binds and the guards check against the tensors' shapes. So the pass
follows the math if step.py changes. It runs on the un-decomposed export IR (before
run_decompositions) and before any CSE (the masks of different layers must not be shared).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch.export import Dim, ExportedProgram
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

import dsv3_export.ops  # noqa: F401 - registers dsv3::mla_attention
from dsv3_export.passes.base import PassConfig, PassError, PassResult
from dsv3_export.passes.graph_utils import (copy_graph, count_calls, depends_on, fake_arg, fake_mode_of, node_val,
                                            rebuild_program, user_input_names)
from dsv3_export.step import absorbed_attention, naive_attention

NAME = "fuse_mla_absorb"
log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TENSOR_INPUTS = ("q_nope", "q_pe", "kv_new", "kv_cache", "start_pos", "wkv_b")
# Marker sizes for tracing the pattern: distinct, and unlike any dim index or other literal in it.
_MARKERS = {"h": 7, "dn": 11, "c": 17}
_R, _DV, _SCALE = 13, 19, 0.123456789
MLA_OP = torch.ops.dsv3.mla_attention.default
# The formulations that become dsv3::mla_attention, with the equation of their last einsum.
FORMULATIONS = {"absorbed": (absorbed_attention, "bshc,hdc->bshd"), "naive": (naive_attention, "bsht,bthd->bshd")}
_SIZES = {("kv_cache", 1): "T", **{(x, 1): "s" for x in ("q_nope", "q_pe", "kv_new")},
          **{(x, 0): "b" for x in TENSOR_INPUTS if x != "wkv_b"}}
_WILDCARDS = set(TENSOR_INPUTS) | set(_MARKERS) | set(_SIZES.values()) | {"scale", "device"}


class _Pattern(torch.nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b):
        return self.attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, _SCALE)


@functools.cache
def attention_patterns() -> tuple[tuple[str, Graph], ...]:
    """(formulation, ATen graph with sizes, scale and device as placeholders) for each formulation."""
    h, dn, c = _MARKERS["h"], _MARKERS["dn"], _MARKERS["c"]
    b, s, t = 2, 3, 5
    example = (torch.randn(b, s, h, dn), torch.randn(b, s, h, _R), torch.randn(b, s, c + _R),
               torch.randn(b, t, c + _R), torch.zeros(b, dtype=torch.int64), torch.randn(h * (dn + _DV), c))
    batch, seq, cache = Dim("b", min=1, max=64), Dim("s", min=1, max=4096), Dim("t", min=1, max=4096)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: cache}, {0: batch}, None)
    patterns = []
    for name, (attention, _) in FORMULATIONS.items():
        program = torch.export.export(_Pattern(attention), example, dynamic_shapes=dynamic, strict=False)
        patterns.append((name, _wildcard_literals(program.graph)))
    return tuple(patterns)


def _wildcard_literals(graph: Graph) -> Graph:
    """Replace marker sizes, the scale, devices and sym_size nodes by named placeholders."""
    first = next(iter(graph.nodes))
    wild: dict[str, Node] = {}

    def placeholder(name: str) -> Node:
        if name not in wild:
            with graph.inserting_before(first):
                wild[name] = graph.placeholder(name)
        return wild[name]

    def replace(arg):
        if isinstance(arg, (list, tuple)):
            return type(arg)(replace(a) for a in arg)
        if isinstance(arg, bool) or isinstance(arg, Node):
            return arg
        if isinstance(arg, int):
            return next((placeholder(k) for k, v in _MARKERS.items() if v == arg), arg)
        if isinstance(arg, float) and arg == _SCALE:
            return placeholder("scale")
        if isinstance(arg, torch.device):
            return placeholder("device")
        return arg

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == torch.ops.aten.sym_size.int:
            src, dim = node.args
            size = _SIZES.get((src.target, dim))
            if size is None:
                raise AssertionError(f"unexpected size {src.name}.shape[{dim}] in the traced MLA pattern")
            node.replace_all_uses_with(placeholder(size))
            graph.erase_node(node)
            continue
        node.args = replace(node.args)
        node.kwargs = {k: replace(v) for k, v in node.kwargs.items()}
    graph.lint()
    got = {n.target for n in graph.nodes if n.op == "placeholder"}
    if not set(TENSOR_INPUTS) | {"scale", "T", "s"} <= got <= _WILDCARDS:  # step.py changed beyond the wildcards
        raise AssertionError(f"traced MLA pattern has inputs {sorted(got)}, expected a subset of {sorted(_WILDCARDS)}")
    return graph


def _bindings(match: InternalMatch) -> dict[str, object]:
    """Pattern placeholder name -> the node or literal it matched."""
    return {pn.target: gn for pn, gn in match.nodes_map.items() if pn.op == "placeholder"}


def _size(value) -> object:
    """A bound size: an int literal or a SymInt from a sym_size node's meta."""
    return value.meta.get("val") if isinstance(value, Node) else value


def _check(bound: dict[str, object], user_inputs: set[str]) -> str | None:
    """None if the match can become dsv3::mla_attention, else the reason it cannot."""
    vals = {k: node_val(bound[k], NAME) for k in TENSOR_INPUTS}
    q_nope, wkv_b, start_pos = vals["q_nope"], vals["wkv_b"], vals["start_pos"]
    if q_nope.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {q_nope.dtype} (supported: {SUPPORTED_DTYPES})"
    mixed = {k: v.dtype for k, v in vals.items() if k != "start_pos" and v.dtype != q_nope.dtype}
    if mixed:
        return f"mixed dtypes: q_nope is {q_nope.dtype}, {mixed}"
    if start_pos.dtype != torch.int64:
        return f"start_pos is {start_pos.dtype}, dsv3::mla_attention takes int64"
    if wkv_b.dim() != 2:
        return f"wkv_b has {wkv_b.dim()} dims, expected [h * (dn + dv), c]"
    scale = bound["scale"]
    if not isinstance(scale, float) or not math.isfinite(scale):
        return f"softmax scale is {scale!r}, not a finite constant"
    expected = {"h": q_nope.shape[2], "dn": q_nope.shape[3], "c": wkv_b.shape[1],
                "T": vals["kv_cache"].shape[1], "s": q_nope.shape[1], "b": q_nope.shape[0]}
    for name, want in expected.items():
        if name not in bound:  # this formulation does not use the size
            continue
        got = _size(bound[name])
        if got is None or not statically_known_true(got == want):
            return f"size {name} bound to {got}, but the tensors say {want}"
    reads_input = depends_on(bound["wkv_b"], user_inputs)
    if reads_input is not None:
        return f"wkv_b depends on the user input {reads_input!r}, not only on weights"
    return None


def _find(graph: Graph) -> list[tuple[str, InternalMatch]]:
    return [(name, m) for name, pattern in attention_patterns()
            for m in SubgraphMatcher(pattern, ignore_literals=False).match(graph)]


def fuse_mla_absorb(program: ExportedProgram, config: PassConfig) -> PassResult:
    graph = copy_graph(program)
    fake_mode = fake_mode_of(program, NAME)
    user_inputs = user_input_names(program)
    notes: list[str] = []
    matches = _find(graph)
    matched_anchors = {m.returning_nodes[0] for _, m in matches}
    tails = {equation: name for name, (_, equation) in FORMULATIONS.items()}
    for node in graph.nodes:  # near-misses: tail einsums of attention that did not match
        if node.target == torch.ops.aten.einsum.default and node.args[0] in tails and node not in matched_anchors:
            notes.append(f"{node.name}: einsum {node.args[0]!r} is not the tail of an attention subgraph (the graph "
                         f"differs from step.{tails[node.args[0]]}_attention)")
    rewritten: dict[str, int] = {}
    for formulation, match in matches:
        anchor, bound = match.returning_nodes[0], _bindings(match)
        reason = _check(bound, user_inputs)
        if reason is not None:
            notes.append(f"{anchor.name}: {reason}")
            continue
        args = tuple(bound[k] for k in TENSOR_INPUTS) + (bound["scale"],)
        with fake_mode:
            val = MLA_OP(*fake_arg(args, NAME))
        with graph.inserting_before(anchor):
            fused = graph.call_function(MLA_OP, args)
        fused.meta.update({k: v for k, v in anchor.meta.items() if k != "val"})
        fused.meta["val"] = val
        anchor.replace_all_uses_with(fused)
        rewritten[formulation] = rewritten.get(formulation, 0) + 1
    if not matches:
        notes.append("no attention subgraph found (already fused, other math, or decomposed IR)")
    if rewritten:
        notes.append("rewritten: " + ", ".join(f"{n} {f}" for f, n in rewritten.items()))
    if config.debug:
        for note in notes:
            log.info("%s: %s", NAME, note)
    count = sum(rewritten.values())
    if count == 0:
        return PassResult(program, 0, notes)
    before = count_calls(program.graph, [MLA_OP])
    result = rebuild_program(program, graph)
    _check_postcondition(result, expected_ops=before + count, expected_leftovers=len(matches) - count)
    return PassResult(result, count, notes)


def _check_postcondition(program: ExportedProgram, expected_ops: int, expected_leftovers: int) -> None:
    """Every rewritten site is one dsv3::mla_attention and left none of its pattern behind."""
    fused = count_calls(program.graph, [MLA_OP])
    if fused != expected_ops:
        raise PassError(NAME, f"expected {expected_ops} dsv3::mla_attention nodes after rewriting, found {fused}")
    leftovers = _find(program.graph)
    if len(leftovers) != expected_leftovers:
        raise PassError(NAME, f"{len(leftovers)} attention subgraphs remain after rewriting, expected "
                              f"{expected_leftovers} (the skipped ones)",
                        node=leftovers[0][1].returning_nodes[0].name if leftovers else None)
