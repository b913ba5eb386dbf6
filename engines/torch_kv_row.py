"""The decode program's new kv row built without a cat, so Inductor writes it straight into the step's output.

Each layer of a decode step computes its cache row kv_new = cat([kv_norm(latent), rope(k_pe)], -1) [b, 1, c + r]
(dsv3_export/step.py mla_step): dsv3::mla_attention reads it, and the step returns all layers' rows as
torch.stack(rows, 1) for the caller to write into the cache. In a CUDA package (H200, 27-layer 16b batch-1 profile,
session 20's fusion study) that stack is 27 copy kernels (`triton_poi_fused_stack_*`, 29 us per step): its 27
inputs exceed Inductor's pointwise-cat limit (8), so it becomes a concat buffer, which only pointwise producers can
write into in place, and each row is itself a concat (of the kv_norm and rope kernels' outputs). Rewritten as

    kv_new = where(arange(c + r) < c, pad(a, [0, r]), pad(b, [c, 0]))

the row is one pointwise node: the rope kernel writes it into its slice of the stack's output directly, and the
copy kernels go (the fusion study compiled 10 layers: 68 -> 58 kernels). The same values bit for bit (NaN payloads
aside: compiled on the CPU, a bf16 NaN came out with another payload): pad adds zeros the where never selects.
CUDA decode programs only; DSV3_TORCH_KV_ROW=where (default since session 21: on the H200 the 27 stack copies went,
27.5 us per batch-1 step; benchmarks/RESULTS.md) or `cat` (keeps the cat).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import dsv3_export.ops  # noqa: F401  (registers the dsv3:: ops matched here)
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState

KV_ROW_ENV = "DSV3_TORCH_KV_ROW"
KV_ROW_FORMS = {"cat": "the new kv row as a cat (the stack of rows copies each)",
                "where": "the new kv row as where(pad, pad): written into the stack's output in place"}
aten = torch.ops.aten
KV_NEW_ARG = 2  # dsv3::mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale)


def _last_dim_cat(node: object) -> tuple[Node, Node] | None:
    """(a, b) when node is cat([a, b]) over the last dim of same-dtype tensors with static last dims, else None."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    a, b = node.args[0]
    av, bv = a.meta.get("val"), b.meta.get("val")
    if av is None or bv is None or av.dtype != bv.dtype or dim not in (-1, av.dim() - 1):
        return None
    return (a, b) if isinstance(av.shape[-1], int) and isinstance(bv.shape[-1], int) else None


def kv_row_as_where(ep: ExportedProgram, kind: str) -> tuple[ExportedProgram, str]:
    """The program with each mla_attention's kv_new cat rewritten as where(pad, pad) (decode programs with
    KV_ROW_ENV=where), and a line for the manifest's `lowerings`."""
    if kind != "decode" or env_choice(KV_ROW_ENV, "where", KV_ROW_FORMS) != "where":
        return ep, f"cat ({KV_ROW_ENV}=cat)" if kind == "decode" else "cat (prefill)"
    state = ProgramState(ep)
    rewritten = 0
    for node in list(state.graph.nodes):
        if not is_call(node, torch.ops.dsv3.mla_attention.default) or len(node.args) <= KV_NEW_ARG:
            continue
        cat = node.args[KV_NEW_ARG]
        parts = _last_dim_cat(cat)
        if parts is None:
            continue
        a, b = parts
        c, r = a.meta["val"].shape[-1], b.meta["val"].shape[-1]
        with state.graph.inserting_before(cat):
            col = state.call(aten.arange.default, (c + r,), dict(device=a.meta["val"].device, pin_memory=False))
            first = state.call(aten.lt.Scalar, (col, c))
            left = state.call(aten.constant_pad_nd.default, (a, [0, r], 0.0))
            right = state.call(aten.constant_pad_nd.default, (b, [c, 0], 0.0))
            row = state.call(aten.where.self, (first, left, right), meta_from=cat)
        cat.replace_all_uses_with(row)
        rewritten += 1
    if not rewritten:
        return ep, f"no kv_new cat found ({KV_ROW_ENV}=where)"
    state.eliminate_dead_code()
    return state.program(), f"{rewritten} kv_new cats -> where(pad, pad) ({KV_ROW_ENV}=where)"
