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
CUDA decode programs only; DSV3_TORCH_KV_ROW=where (session 21's default: on the H200 the 27 stack copies went,
27.5 us per batch-1 step; benchmarks/RESULTS.md) or `cat` (keeps the cat).

DSV3_TORCH_KV_ROW=norm (the default since session 22; session 21's opt-in) also takes the row's kv_norm
(rms_norm(latent) with latent = kv[..., :c], kv = wkv_a's output row [b, 1, c + r]) as a mean over the whole row:

    ms = sum(where(arange(c + r) < c, kv.float() ** 2, 0), -1, keepdim) / c
    kv_norm(latent) = (kv.float() * rsqrt(ms + eps))[..., :c] * weight

rms_norm's own decomposition with its mean over c columns replaced. Why: Inductor built each row with two kernels,
the mean over the c latent columns (a reduction of c) and the row over c + r columns (pointwise, the norm, the key's
RoPE, the where); a reduction over the row's c + r columns fuses with that pointwise row into one persistent kernel
(27 launches fewer per 27-layer 16b step; 2 -> 1 kernels per layer in benchmarks/inductor_fusion_study.py). The
values are the cat's up to the fp32 sum's order (not bit for bit; within an ulp of the fp32 mean). H200, session 22
(4-layer 16b fp8 A/B, two builds per arm, with Q_ROPE=absorb): per layer one kernel of 1.7-1.9 us against 2.0-2.7 +
1.0-1.1 us, one launch gap fewer; logits as far from the eager step's as before.
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import dsv3_export.ops  # noqa: F401  (registers the dsv3:: ops matched here)
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState

KV_ROW_ENV = "DSV3_TORCH_KV_ROW"
KV_ROW_FORMS = {"cat": "the new kv row as a cat (the stack of rows copies each)",
                "where": "the new kv row as where(pad, pad): written into the stack's output in place",
                "norm": "where(pad, pad), its kv_norm's mean a masked sum over the whole row: one kernel per row"}
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


def _first_columns(state: ProgramState, width: int, c: int, device: torch.device) -> Node:
    """The mask arange(width) < c [width]: a kv row's latent columns."""
    col = state.call(aten.arange.default, (width,), dict(device=device, pin_memory=False))
    return state.call(aten.lt.Scalar, (col, c))


def _uncast(x: Node) -> Node:
    """x's input when x is a dtype cast (aten.to.dtype as exported, aten._to_copy once decomposed), else x."""
    if is_call(x, aten.to.dtype) or (is_call(x, aten._to_copy.default) and set(x.kwargs) <= {"dtype"}):
        return x.args[0]
    return x


def _latent_of(x: Node) -> tuple[Node, int] | None:
    """(kv, c) when x is kv[..., :c] taken as split_with_sizes(kv, [c, r], -1)[0] (in fp32 or cast to it)."""
    x = _uncast(x)
    if x.op != "call_function" or x.target is not operator.getitem or x.args[1] != 0:
        return None
    split = x.args[0]
    if not is_call(split, aten.split_with_sizes.default):
        return None
    kv, sizes = split.args[0], split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    val = kv.meta.get("val")
    if val is None or dim not in (-1, val.dim() - 1) or len(sizes) != 2:
        return None
    return kv, sizes[0]


def _norm_over_row(state: ProgramState, normed: Node, width: int) -> bool:
    """The rms_norm under the cat's first input (normed: it, or its cast) rewritten to reduce over the whole kv row
    of `width` columns, masked to its first c (KV_ROW_ENV=norm, the module docstring); False where the shape is
    not rms_norm(kv[..., :c] in fp32, [c], weight, eps) over a row of `width`."""
    norm = _uncast(normed)
    if not is_call(norm, aten.rms_norm.default) or not 2 <= len(norm.args) <= 4:
        return False
    x, shape, weight, eps = (*norm.args, None, None)[:4]  # rms_norm(input, normalized_shape, weight=None, eps=None)
    weight, eps = norm.kwargs.get("weight", weight), norm.kwargs.get("eps", eps)
    found = _latent_of(x)
    if found is None or x.meta["val"].dtype != torch.float32:
        return False
    if eps is None:  # rms_norm's default for an fp32 computation (torch/_decomp/decompositions.py _fused_rms_norm)
        eps = torch.finfo(torch.float32).eps
    kv, c = found
    if list(shape) != [c] or kv.meta["val"].shape[-1] != width:
        return False
    with state.graph.inserting_before(norm):
        row = kv if kv.meta["val"].dtype == torch.float32 else state.call(aten._to_copy.default, (kv,),
                                                                          dict(dtype=torch.float32))
        squares = state.call(aten.where.ScalarOther, (_first_columns(state, width, c, kv.meta["val"].device),
                                                      state.call(aten.pow.Tensor_Scalar, (row, 2)), 0.0))
        mean = state.call(aten.div.Tensor, (state.call(aten.sum.dim_IntList, (squares, [-1], True)), c))
        inv = state.call(aten.rsqrt.default, (state.call(aten.add.Scalar, (mean, eps)),))
        out = state.call(aten.slice.Tensor, (state.call(aten.mul.Tensor, (row, inv)), -1, 0, c), meta_from=norm)
        if weight is not None:  # rms_norm(..., weight=None): no affine
            out = state.call(aten.mul.Tensor, (out, weight), meta_from=norm)
    norm.replace_all_uses_with(out)
    return True


def kv_row_as_where(ep: ExportedProgram, kind: str) -> tuple[ExportedProgram, str]:
    """The program with each mla_attention's kv_new cat rewritten as where(pad, pad) (decode programs with
    KV_ROW_ENV=where or norm; norm also takes the row's kv_norm over the whole row), and a line for the manifest's
    `lowerings`."""
    form = env_choice(KV_ROW_ENV, "norm", KV_ROW_FORMS) if kind == "decode" else "cat"
    if form == "cat":
        return ep, f"cat ({KV_ROW_ENV}=cat)" if kind == "decode" else "cat (prefill)"
    state = ProgramState(ep)
    rewritten = norms = 0
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
            first = _first_columns(state, c + r, c, a.meta["val"].device)
            left = state.call(aten.constant_pad_nd.default, (a, [0, r], 0.0))
            right = state.call(aten.constant_pad_nd.default, (b, [c, 0], 0.0))
            row = state.call(aten.where.self, (first, left, right), meta_from=cat)
        cat.replace_all_uses_with(row)
        rewritten += 1
        norms += form == "norm" and _norm_over_row(state, a, c + r)
    if not rewritten:
        return ep, f"no kv_new cat found ({KV_ROW_ENV}={form})"
    state.eliminate_dead_code()
    how = f"{rewritten} kv_new cats -> where(pad, pad)"
    if form == "norm":
        how += f", {norms} kv_norms over the whole row"
    return state.program(), f"{how} ({KV_ROW_ENV}={form})"
