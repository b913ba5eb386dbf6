"""fuse_shared_experts: a MoE layer's shared experts -> extra routed experts that every token takes.

Why: beside each dsv3::moe_experts the shared experts are a dense SwiGLU MLP: at batch-1 decode
two more GEMMs, their two act_quant launches, a SwiGLU kernel and an add per layer (16b: ~5 of
the ~35 launches of a layer), reading weights the grouped GEMM could read in the same launch.
DeepSeek's shared MLP is n_shared experts side by side (MLP(dim, n_shared * moe_inter_dim)), and
SwiGLU acts on each intermediate channel alone: cut the intermediate into chunks of the routed
experts' width and each chunk is one more expert, taken by every token with weight 1.

    y = add(dsv3::moe_experts(x, tw, ids, w13, w2), w2_s(silu(w1_s x) * w3_s x))
becomes
    ids' = cat(ids, expand(arange(E, E + n), [T, n]))                   # [T, k + n]
    tw'  = cat(tw, new_ones(tw, [T, n]))                                # [T, k + n]
    y    = dsv3::moe_experts(x, tw', ids', cat(w13, W13_s), cat(w2, W2_s))
with W13_s [n, 2I, D] (chunk c: rows [cI, (c+1)I) of w1_s over the same rows of w3_s) and W2_s
[n, D, I] (the same columns of w2_s); the last chunk is zero-padded (silu(0) * 0 = 0: exact).
The stacked parameters keep their names (<moe>.w13, <moe>.w2); the shared weights leave.

Exact up to summation order: the shared w2 GEMM is split along K into the chunks, and routed and
shared outputs are summed once in fp32 by the op (before: each rounded to x.dtype, then added).
fp8 experts (an fp8 checkpoint, before quantize_fp8_blockwise: moe_experts_fp8(act_quant=False))
are cut as stored, bit-exact: the chunk width I' is the stack's 128-padded width, so every chunk
starts on a 128x128 scale block; a padded tail gets zero weights and unit scales.

Runs after rewrite_moe_grouped_gemm (it needs the op) and before quantize_fp8_blockwise (so the
shared weights are still Linears and are quantized with the experts, per expert's blocks).
Guards (a note, the layer left alone): the op's output used by anything but one add; the add's
other operand not a bias-free SwiGLU MLP reading the op's own x; dense/fp8 or dtype mismatch with
the stack; an fp8 block other than 128; stacked weights shared with another node.
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
from dsv3_export.passes.rewrite_moe_grouped_gemm import Expert, match_expert
from dsv3_export.passes.sites import apply_rewrites, scan_sites
from dsv3_export.passes.weight_source import DenseWeight, Fp8Weight
from dsv3_export.reference.fp8 import cdiv

PASS = "fuse_shared_experts"
aten = torch.ops.aten
MOE = torch.ops.dsv3.moe_experts.default
MOE_FP8 = torch.ops.dsv3.moe_experts_fp8.default


@dataclass
class SharedSite:
    moe: Node  # the dsv3::moe_experts(_fp8) node
    add: Node  # add(moe, shared): replaced by the new op
    shared: Expert  # the shared MLP's weights
    stacked: tuple[str, ...]  # the op's weight targets: (w13, w2) or (w13, w13_scale, w2, w2_scale)


def match_shared(state: ProgramState, moe: Node) -> SharedSite | str:
    """The shared MLP added to a dsv3::moe_experts output, or the reason there is none."""
    fp8 = moe.target is MOE_FP8
    if fp8 and moe.args[7]:
        return "the experts' activations are already quantized (runs before quantize_fp8_blockwise)"
    if len(moe.users) != 1:
        return f"output used by {len(moe.users)} nodes, not one add"
    add = next(iter(moe.users))
    if not is_call(add, aten.add.Tensor) or "alpha" in add.kwargs or len(add.args) != 2:
        return f"output used by {add.name} ({add.target}), not an add"
    out = add.args[1] if add.args[0] is moe else add.args[0]
    if not isinstance(out, Node) or len(out.users) != 1:
        return f"the other operand of {add.name} is not a node used only there"
    matched = match_expert(state, out, 0)
    if isinstance(matched, str):
        return f"no shared MLP added: {matched.replace('expert 0', 'shared experts')}"
    x, shared = matched
    if x is not moe.args[0]:
        return f"the shared MLP reads {x.name}, the experts read {moe.args[0].name}"
    weights = [shared.w1, shared.w3, shared.w2]
    if any(isinstance(w, Fp8Weight) != fp8 for w in weights):
        return "the shared MLP's weights and the experts' are not both fp8 (or both dense)"
    if fp8 and any(w.block_size != FP8_BLOCK for w in weights):
        return f"shared fp8 block size {shared.w1.block_size} is not {FP8_BLOCK}"
    stacked = tuple(state.target_of(a) for a in moe.args[3:7 if fp8 else 5])
    if None in stacked or any(len(state.node_of(t).users) != 1 for t in stacked):
        return "the stacked expert weights are not parameters used by this op alone"
    stack_dtype = state.tensor(stacked[0]).dtype
    if any(_tensor(state, w).dtype != stack_dtype for w in weights):
        return f"shared weights are not {stack_dtype} like the stacked experts"
    d = state.tensor(stacked[0]).shape[2]
    s = _tensor(state, shared.w1).shape
    if tuple(_tensor(state, shared.w3).shape) != tuple(s) or tuple(_tensor(state, shared.w2).shape) != (d, s[0]) \
            or s[1] != d:
        return f"shared MLP shapes are not [S, {d}], [S, {d}], [{d}, S]"
    return SharedSite(moe, add, shared, stacked)


def _tensor(state: ProgramState, w: DenseWeight | Fp8Weight) -> torch.Tensor:
    return state.tensor(state.target_of(w.param if isinstance(w, DenseWeight) else w.weight))


def _chunks(t: torch.Tensor, width: int, n: int, fill: float = 0.0) -> torch.Tensor:
    """Rows of t cut into n chunks of `width` -> [n, width, ...], the tail padded with `fill`."""
    out = torch.full((n * width, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out.view(n, width, *t.shape[1:])


def _shared_experts(state: ProgramState, site: SharedSite) -> list[torch.Tensor]:
    """The shared MLP as n experts in the op's layout: [W13_s, W2_s] or [W13_s, S13_s, W2_s, S2_s]."""
    width = state.tensor(site.stacked[0]).shape[1] // 2  # I (dense) or I' (fp8: 128-padded)
    w = site.shared
    n = cdiv(_tensor(state, w.w1).shape[0], width)
    up = torch.cat([_chunks(_tensor(state, w.w1), width, n), _chunks(_tensor(state, w.w3), width, n)], dim=1)
    down = _chunks(_tensor(state, w.w2).T, width, n).transpose(1, 2).contiguous()  # [n, D, width]
    if isinstance(w.w1, DenseWeight):
        return [up, down]  # [n, 2I, D], [n, D, I]
    blocks = width // FP8_BLOCK  # I' is a multiple of 128: every chunk starts on a scale block
    scale = lambda weight: state.tensor(state.target_of(weight.scale))  # noqa: E731
    up_scale = torch.cat([_chunks(scale(w.w1), blocks, n, fill=1.0), _chunks(scale(w.w3), blocks, n, fill=1.0)],
                         dim=1)  # [n, 2I'/128, D/128]
    down_scale = _chunks(scale(w.w2).T, blocks, n, fill=1.0).transpose(1, 2).contiguous()  # [n, D/128, I'/128]
    return [up, up_scale, down, down_scale]


def _rewrite(state: ProgramState, site: SharedSite) -> list[str]:
    """Replace the add by the op over routed + shared experts; returns the shared weights' names."""
    moe = site.moe
    x, tw, ids = moe.args[:3]
    shared = _shared_experts(state, site)
    n_routed = state.tensor(site.stacked[0]).shape[0]
    n = shared[0].shape[0]
    stacked = [state.replace(t, torch.cat([state.tensor(t), extra]))
               for t, extra in zip(site.stacked, shared)]  # [E + n, ...]
    ids_val = ids.meta["val"]
    with state.graph.inserting_before(site.add):
        tokens = ids_val.shape[0] if isinstance(ids_val.shape[0], int) else state.call(aten.sym_size.int, (ids, 0))
        always = state.call(aten.arange.start, (n_routed, n_routed + n),
                            dict(dtype=torch.int64, device=ids_val.device))  # [n]
        shared_ids = state.call(aten.expand.default, (always, [tokens, n]))  # [T, n]
        ones = state.call(aten.new_ones.default, (tw, [tokens, n]))  # [T, n]
        all_ids = state.call(aten.cat.default, ([ids, shared_ids], 1))  # [T, k + n]
        all_weights = state.call(aten.cat.default, ([tw, ones], 1))  # [T, k + n]
        fused = state.call(moe.target, (x, all_weights, all_ids, *stacked, *moe.args[3 + len(stacked):]),
                           meta_from=moe)
    if fused.meta["val"].dtype != site.add.meta["val"].dtype:
        raise PassError(PASS, f"op output dtype {fused.meta['val'].dtype} differs from the add's "
                              f"{site.add.meta['val'].dtype}", site.add.name)
    site.add.replace_all_uses_with(fused)
    w = site.shared
    return [state.target_of(n) for n in ((w.w1.param, w.w3.param, w.w2.param) if isinstance(w.w1, DenseWeight)
                                         else (w.w1.weight, w.w1.scale, w.w3.weight, w.w3.scale, w.w2.weight,
                                               w.w2.scale))]


def fuse_shared_experts(program: ExportedProgram, config: PassConfig) -> PassResult:
    state = ProgramState(program)
    sites, notes = scan_sites(state, lambda n: n.target in (MOE, MOE_FP8), match_shared, "not fused")
    if not sites:
        return PassResult(program, 0, notes)
    obsolete = apply_rewrites(state, sites, _rewrite, PASS, "shared-expert weights")
    if any(not site.moe._erased for site in sites):
        raise PassError(PASS, "an old dsv3::moe_experts node is still used after the rewrite", sites[0].moe.name)
    notes.append(f"{len(sites)} MoE layer(s): shared experts -> routed experts every token takes; removed "
                 f"{len(obsolete)} shared-expert tensors")
    return PassResult(state.program(), len(sites), notes)
