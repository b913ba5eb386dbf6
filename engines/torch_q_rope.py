"""The decode program's RoPE of the query moved into the MLA split kernel: one Inductor launch fewer per layer.

Each decode layer rotates q_pe (reference/layers.py apply_rotary_emb: interleaved pairs by the step's cos / sin
rows, in fp32, rounded back) before dsv3_aoti::mla_attention reads it. In a CUDA package that is a kernel of its
own per layer (`triton_poi_fused_..._index_mul_select_..._stack_sub_...`: 27 launches, ~32 us per H200 batch-1
16b step, session 20's fusion study, benchmarks/inductor_fusion_study.py). Rewritten (after the dsv3:: ops are
lowered; decode programs on CUDA; DSV3_TORCH_Q_ROPE=kernel, session 21's default; `inductor` leaves the RoPE to
Inductor):

    x  = view(_to_copy(q_pe_raw, f32), [..., r/2, 2]);  x0, x1 = select(x, -1, 0), select(x, -1, 1)
    c = unsqueeze(index(rope_cos, [unsqueeze(start_pos, 1) + arange(1)]), 2)  (and s from rope_sin)
    q_pe = _to_copy(view(stack([x0 * c - x1 * s, x0 * s + x1 * c], -1), [..., r]), q_pe_raw.dtype)
    dsv3_aoti::mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, ..., decode=True, flags...)
becomes
    dsv3_aoti::mla_attention_rope_q(q_nope, q_pe_raw, rope_cos, rope_sin, kv_new, kv_cache, start_pos, ..., flags...)
The tables themselves go to the kernel (which reads row start_pos[b]): passing the gathered rows instead cost
Inductor a gather kernel per consumer (two layers a launch), half the launches saved.
whose split kernel loads the raw pairs and rotates them with the same fp32 arithmetic and rounding
(kernels/mla_decode_kernels.py _q_pe_tile): the same bits in the CPU interpreter; on the GPU the compiler may
contract a multiply-add differently from Inductor's kernel (a last-bit difference before the rounding, rare).

DSV3_TORCH_Q_ROPE=absorb (the default since session 22; session 21's opt-in): the same rewrite with rope_in_query
set, so W_UK's head_gemm launch writes the rotated q_pe from programs of its own (kernels/mla_query.py, the same
rotation) and the split kernel reads it as before the rewrite. Why: with the rotation inside it the split kernel took
20-24 us more per 27-layer batch-1 step on the H200 (session 21). H200, session 22 (4-layer 16b fp8 A/B, two builds
per arm, with KV_ROW=norm): the split kernel 7.0-7.5 us per call against 8.1-8.2, head_gemm_rope 2.9-3.0 against
head_gemm's 2.9-3.1.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import dsv3_export.engines.torch_triton_mla  # noqa: F401  (registers dsv3_aoti::mla_attention_rope_q)
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState

Q_ROPE_ENV = "DSV3_TORCH_Q_ROPE"
Q_ROPE_FORMS = {"inductor": "the query's RoPE by an Inductor kernel per layer",
                "kernel": "the query's RoPE inside the MLA split kernel",
                "absorb": "the query's RoPE in W_UK's head_gemm launch (kernels/mla_query.py)"}
# Where each form rotates the query, for the manifest's line.
_WHERE = {"kernel": "the MLA split kernel", "absorb": "W_UK's head_gemm launch"}
aten = torch.ops.aten


def _two(node: Node, target) -> tuple | None:
    """node's two positional arguments when it is a call of target with exactly those, else None."""
    return tuple(node.args) if is_call(node, target) and len(node.args) == 2 and not node.kwargs else None


def _pair_selects(x0: Node, x1: Node) -> Node | None:
    """The [..., r/2, 2] view whose pair elements 0 and 1 x0 and x1 select, else None."""
    if not (is_call(x0, aten.select.int) and is_call(x1, aten.select.int)) or x0.args[0] is not x1.args[0]:
        return None
    pairs = x0.args[0]
    last = pairs.meta["val"].dim() - 1 if "val" in pairs.meta else None
    if x0.args[1] not in (-1, last) or x1.args[1] not in (-1, last) or (x0.args[2], x1.args[2]) != (0, 1):
        return None
    return pairs if is_call(pairs, aten.view.default) and pairs.meta["val"].shape[-1] == 2 else None


def _table_at(rows: Node, start_pos: Node) -> Node | None:
    """The table when rows = index(table [P, r/2], [unsqueeze(start_pos, 1) + arange(1)]) (the decode step's one
    position per batch row), else None."""
    if not is_call(rows, aten.index.Tensor) or len(rows.args) != 2 or len(rows.args[1]) != 1:
        return None
    table, (idx,) = rows.args
    pair = _two(idx, aten.add.Tensor) if isinstance(idx, Node) else None
    if pair is None:
        return None
    col, steps = pair
    if _two(col, aten.unsqueeze.default) != (start_pos, 1):
        return None
    if not is_call(steps, aten.arange.default) or tuple(steps.args) != (1,):
        return None
    val = table.meta.get("val")
    return table if val is not None and val.dim() == 2 and val.dtype == torch.float32 and val.stride(1) == 1 else None


def rope_inputs(q_pe: Node, start_pos: Node) -> tuple[Node, Node, Node] | None:
    """(q_pe_raw, rope_cos, rope_sin) when q_pe is apply_rotary_emb's ATen form at the rope tables' rows start_pos,
    else None."""
    if not is_call(q_pe, aten._to_copy.default) or set(q_pe.kwargs) - {"dtype"}:
        return None
    flat = q_pe.args[0]
    if not is_call(flat, aten.view.default) or not is_call(flat.args[0], aten.stack.default):
        return None
    stack = flat.args[0]
    halves = stack.args[0]
    if len(halves) != 2 or (stack.args[1] if len(stack.args) > 1 else 0) not in (-1, stack.meta["val"].dim() - 1):
        return None
    diff, total = _two(halves[0], aten.sub.Tensor), _two(halves[1], aten.add.Tensor)
    if diff is None or total is None:
        return None
    a, b = (_two(m, aten.mul.Tensor) for m in diff)
    d, e = (_two(m, aten.mul.Tensor) for m in total)
    if None in (a, b, d, e):
        return None
    (x0, cos), (x1, sin) = a, b
    if d != (x0, sin) or e != (x1, cos):  # x0 * s + x1 * c
        return None
    pairs = _pair_selects(x0, x1)
    if pairs is None or not is_call(pairs.args[0], aten._to_copy.default):
        return None
    raw = pairs.args[0].args[0]
    if pairs.args[0].kwargs.get("dtype") != torch.float32 or q_pe.kwargs.get("dtype") != raw.meta["val"].dtype:
        return None
    tables = []
    for factor in (cos, sin):  # unsqueeze(rows [b, 1, r/2] fp32, 2): the step's rope rows, broadcast over heads
        if not is_call(factor, aten.unsqueeze.default) or factor.args[1] != 2:
            return None
        table = _table_at(factor.args[0], start_pos)
        if table is None or table.meta["val"].shape[-1] * 2 != raw.meta["val"].shape[-1]:
            return None
        tables.append(table)
    if raw.meta["val"].stride(-1) != 1:
        return None
    return raw, tables[0], tables[1]


def _args_with_defaults(node: Node) -> tuple | None:
    """node's arguments in schema order, its defaulted trailing ones filled in: the traced call drops an argument
    passed with its default value (mla_attention's merge_uv=False left 10 of 11), which the match must not miss."""
    args = list(node.args)
    for arg in node.target._schema.arguments[len(args):]:
        if arg.name in node.kwargs:
            args.append(node.kwargs[arg.name])
        elif arg.has_default_value():
            args.append(arg.default_value)
        else:
            return None
    return tuple(args)


def q_rope_into_attention(ep: ExportedProgram, kind: str) -> tuple[ExportedProgram, str]:
    """The lowered program with each decode mla_attention's query RoPE moved into its split kernel (Q_ROPE_ENV=kernel,
    decode programs) or W_UK's head_gemm launch (Q_ROPE_ENV=absorb), and a line for the manifest's `lowerings`."""
    form = env_choice(Q_ROPE_ENV, "absorb", Q_ROPE_FORMS) if kind == "decode" else "inductor"
    if form == "inductor":
        return ep, f"Inductor ({Q_ROPE_ENV}=inductor)" if kind == "decode" else "Inductor (prefill)"
    state = ProgramState(ep)
    rewritten = 0
    for node in list(state.graph.nodes):
        args = _args_with_defaults(node) if is_call(node, torch.ops.dsv3_aoti.mla_attention.default) else None
        if args is None or len(args) != 11:
            continue
        q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, scale, decode, absorb, head_gemv, merge_uv = args
        found = rope_inputs(q_pe, start_pos) if decode is True else None
        if found is None:
            continue
        raw, cos, sin = found
        with state.graph.inserting_before(node):
            new = state.call(torch.ops.dsv3_aoti.mla_attention_rope_q.default,
                             (q_nope, raw, cos, sin, kv_new, kv_cache, start_pos, wkv_b, scale, absorb, head_gemv,
                              merge_uv, form == "absorb"), meta_from=node)
        node.replace_all_uses_with(new)
        rewritten += 1
    if not rewritten:
        return ep, f"no query RoPE matched ({Q_ROPE_ENV}={form})"
    state.eliminate_dead_code()
    return state.program(), f"{rewritten} query RoPEs into {_WHERE[form]} ({Q_ROPE_ENV}={form})"
