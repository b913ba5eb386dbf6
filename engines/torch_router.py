"""The MoE router of a softmax-scored model as one kernel, in the torch backend's CUDA programs.

Why: between the gate GEMM and the grouped GEMMs a batch-1 decode step runs, per MoE layer, a
softmax, torch's top-k (gatherTopK + a sort), a gather * route_scale and the concatenations of
the shared experts' columns (passes/fuse_shared_experts): ~5 launches of ~2-5 us for a [T, 64]
tensor. kernels/topk.py router_topk does all of it from the logits in one.

Rewrites (before the dsv3:: ops are lowered; CUDA only; DSV3_TORCH_ROUTER=0 turns it off):

    s   = softmax(logits, -1, f32)                            # the reference Gate, score_func softmax,
    ids = getitem(topk(s, k), 1)                              # one group, no bias
    w   = type_as(mul(gather(s, 1, ids), route_scale), x)    # (or to(dtype); the mul may be absent)
    ids = cat([ids, expand(arange(E, E + n), [T, n])], 1)    # fuse_shared_experts' columns, if there
    w   = cat([w, new_ones(w, [T, n])], 1)
    dsv3::moe_experts(_fp8)(x, w, ids, ...)
becomes
    w, ids = dsv3_aoti::router_topk(logits, k, route_scale, n, E, dtype)
    dsv3::moe_experts(_fp8)(x, w, ids, ...)
Sigmoid scoring, a score bias or group-limited routing (DeepSeek-V3) do not match and keep their
ATen form (their top-k still becomes kernels/topk.py's, torch_triton.py's aten::topk lowering).

The gate GEMM too, opt-in (DSV3_TORCH_ROUTER_GATE=1): at batch-1 decode it is a cuBLAS call of ~5 us
(the 16b's [1, 2048] @ [2048, 64]: one thread block). Measured slower on the H200 (session 7, 16b fp8
decode, batch 1): router_topk_gate took 13.2 us per call (one program streams the 262 KB weight
alone) against ~5 us for cuBLAS's gate plus ~2.5 us for router_topk, so the default keeps the gate
GEMM separate (GATE_DEFAULT). When the logits are
    logits = linear(x, weight)         # (or mm(x, t(weight))); x [T, D], weight [E, D] a parameter,
                                       # buffer or constant in x's dtype; the softmax its only reader
the router becomes
    w, ids = dsv3_aoti::router_topk_gate(x, weight, k, route_scale, n, E, dtype)
(kernels/router_gate.py router_topk_gate: the logits in fp32, rounded to x's dtype, then the same math).
DSV3_TORCH_ROUTER_GATE=split takes the same sites into
    w, ids = dsv3_aoti::router_topk_gate_split(x, weight, k, route_scale, n, E, dtype)
(kernels/router_gate.py router_topk_gate_split): the experts split over programs (8-16 at E=64, each
streaming 16-32 KB of the weight instead of one program streaming all 262 KB), the last program of
a row block to finish routing the row from the others' logits (an arrival counter). Measured on
the H200 (session 8, CUDA graphs): 11.5 / 12.1 / 18.1 us at 1 / 8 / 64 rows against 11.6 / 11.7 / 12.4
for cuBLAS's gate + router_topk; 197 vs 191 us per 27-layer batch-1 step: not the default. Its traced
form allocates the counters zeroed (one memset node per router in the package) where eager calls
reuse a self-cleaning buffer.

The router and moe_align in one launch, opt-in (DSV3_TORCH_ROUTER_ALIGN=1; the decode program only):
the MoE op then aligns its ids with kernels/moe_align.py's single-program kernel right after the
router's launch (4.4 us per MoE layer in the H200's batch-1 decode profile, plus the gap before it).
Where the router above feeds dsv3::moe_experts_fp8 (act_quant=True) or dsv3::moe_experts (bf16/fp16)
    w, ids = dsv3_aoti::router_topk(logits, k, route_scale, n, E, dtype)
    dsv3::moe_experts_fp8(x, w, ids, w13, s13, w2, s2, True)
becomes
    w, ids, sorted, experts, npp = dsv3_aoti::router_align(logits, k, route_scale, n, E, dtype, E_all, block_m)
    dsv3_aoti::moe_experts_fp8_aligned(x, w, ids, sorted, experts, npp, w13, s13, w2, s2)
(dsv3_aoti::moe_experts_aligned for the bf16 MoE): kernels/router_align.py routes every row and
aligns the ids in one program, the same bits as router_topk + moe_align; the MoE op runs
engines/torch_triton.py's experts (moe_fp8_quantized / moe_dense_aligned) on that alignment.
E_all = w13.shape[0] (the shared experts included), block_m = BLOCK_M["decode"]. Not with the gate
GEMM in the router (DSV3_TORCH_ROUTER_GATE != 0), nor with DSV3_TORCH_MOE_ALIGN=aten (those
paths are kept as they are), nor in prefill (one program serializing thousands of rows). With
DSV3_TORCH_NORM_QUANT=1 the FFN norm no longer sees an fp8 MoE op to quantize for, so the MoE
input keeps its own act_quant launch (both switches are opt-in).
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.library import triton_op

import dsv3_export.ops  # noqa: F401  (registers the dsv3:: ops matched here)
from dsv3_export.engines import torch_triton as tt
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels import moe as km
from dsv3_export.kernels import router_align as kra
from dsv3_export.kernels import router_gate as kg
from dsv3_export.kernels import topk as kt
from dsv3_export.kernels._common import arrival_counters
from dsv3_export.kernels.moe_align import MAX_ALIGN_EXPERTS
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState

ROUTER_ENV = "DSV3_TORCH_ROUTER"
GATE_ENV = "DSV3_TORCH_ROUTER_GATE"
GATE_DEFAULT = "0"  # "1" and "split" measured slower or on par (module docstring)
GATE_CHOICES = {"1": "the gate GEMM inside the router kernel, one program per row block",
                "split": "the gate GEMM inside the router kernel, the experts split over programs",
                "0": "the gate GEMM separate"}
ALIGN_ENV = "DSV3_TORCH_ROUTER_ALIGN"
# Measured on the H200 (session 9): router_align 9.2 / 12.7 / 34.9 us at T = 1 / 8 / 64 against 10.3 / 12.7 /
# 30.2 for router_topk + moe_align (kernels.py router_align, CUDA graphs); 4-layer 16b fp8 decode
# (unprofiled, graph) 0.57 / 0.80 ms at batch 1 / 8 against the defaults' 0.56 / 0.77: not the default.
ALIGN_DEFAULT = "0"
ALIGN_CHOICES = {"1": "the router and moe_align in one kernel (decode program)",
                 "0": "the router kernel, then moe_align inside the MoE op"}
aten = torch.ops.aten
CASTS = (aten.type_as.default, aten.to.dtype, aten._to_copy.default)
MOE_OPS = (torch.ops.dsv3.moe_experts.default, torch.ops.dsv3.moe_experts_fp8.default)


@triton_op("dsv3_aoti::router_topk", mutates_args={})
def router_topk(logits: torch.Tensor, k: int, scale: float, n_extra: int, first_extra: int,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, k + n_extra] (out_dtype), ids [T, k + n_extra] int64."""
    logits = logits.contiguous()
    weights = torch.empty((logits.shape[0], k + n_extra), dtype=out_dtype, device=logits.device)
    ids = torch.empty((logits.shape[0], k + n_extra), dtype=torch.int64, device=logits.device)
    tt._launch(kt.router_spec(logits, k, scale, n_extra, first_extra, weights, ids))
    return weights, ids


@triton_op("dsv3_aoti::router_topk_gate", mutates_args={})
def router_topk_gate(x: torch.Tensor, gate: torch.Tensor, k: int, scale: float, n_extra: int, first_extra: int,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D], the gate's weight [E, D] -> router_topk(F.linear(x, gate), ...) in one launch."""
    x, gate = x.contiguous(), gate.contiguous()
    weights = torch.empty((x.shape[0], k + n_extra), dtype=out_dtype, device=x.device)
    ids = torch.empty((x.shape[0], k + n_extra), dtype=torch.int64, device=x.device)
    tt._launch(kg.router_gate_spec(x, gate, k, scale, n_extra, first_extra, weights, ids))
    return weights, ids


@triton_op("dsv3_aoti::router_topk_gate_split", mutates_args={})
def router_topk_gate_split(x: torch.Tensor, gate: torch.Tensor, k: int, scale: float, n_extra: int,
                           first_extra: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """router_topk_gate's result from programs that split the experts (the last one routes). Traced
    (torch.export / AOTInductor), the arrival counters are this op's own zeros; eager, the device's
    self-cleaning buffer (kernels/_common.py arrival_counters)."""
    x, gate = x.contiguous(), gate.contiguous()
    weights = torch.empty((x.shape[0], k + n_extra), dtype=out_dtype, device=x.device)
    ids = torch.empty((x.shape[0], k + n_extra), dtype=torch.int64, device=x.device)
    logits = torch.empty((x.shape[0], gate.shape[0]), dtype=x.dtype, device=x.device)  # [T, E] scratch
    counters = arrival_counters(x.shape[0], x.device)  # >= one per row block (MIN_SPLIT_ROWS is 1)
    tt._launch(kg.router_gate_split_spec(x, gate, k, scale, n_extra, first_extra, logits, counters, weights, ids))
    return weights, ids


@triton_op("dsv3_aoti::router_align", mutates_args={})
def router_align(logits: torch.Tensor, k: int, scale: float, n_extra: int, first_extra: int, out_dtype: torch.dtype,
                 n_experts: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_topk's (weights, ids) and moe_align(ids, n_experts, block_m)'s (sorted_token_ids,
    expert_ids, num_tokens_post_pad), from one launch (kernels/router_align.py)."""
    logits = logits.contiguous()
    out = kra.router_align_outputs(logits.shape[0], k, n_extra, n_experts, block_m, out_dtype, logits.device)
    tt._launch(kra.router_align_spec(logits, k, scale, n_extra, first_extra, n_experts, block_m, *out))
    return out


@triton_op("dsv3_aoti::moe_experts_fp8_aligned", mutates_args={})
def moe_experts_fp8_aligned(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                            w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor
                            ) -> torch.Tensor:
    """dsv3::moe_experts_fp8(act_quant=True) with the alignment given (router_align's): act_quant of x,
    then engines/torch_triton.py moe_fp8_quantized."""
    xq, xs = tt._act_quant(x.contiguous())
    return tt.moe_fp8_quantized(xq, xs, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale,
                                (sorted_token_ids, expert_ids, num_tokens_post_pad), x.dtype)


@triton_op("dsv3_aoti::moe_experts_aligned", mutates_args={})
def moe_experts_aligned(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                        w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """dsv3::moe_experts (bf16/fp16) with the alignment given: engines/torch_triton.py moe_dense_aligned."""
    return tt.moe_dense_aligned(x, topk_weights, topk_ids, w13, w2,
                                (sorted_token_ids, expert_ids, num_tokens_post_pad))


def _arg(node: Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _shared_columns(w: Node, ids: Node) -> tuple[Node, Node, int, int] | None:
    """(w0, ids0, n, E) when w / ids are fuse_shared_experts' concatenations, else None."""
    if not (is_call(w, aten.cat.default) and is_call(ids, aten.cat.default)):
        return None
    if _arg(w, 1, "dim", 0) not in (1, -1) or _arg(ids, 1, "dim", 0) not in (1, -1):
        return None
    (w0, ones), (ids0, extra) = (list(w.args[0]) + [None])[:2], (list(ids.args[0]) + [None])[:2]
    if len(w.args[0]) != 2 or len(ids.args[0]) != 2 or not is_call(ones, aten.new_ones.default):
        return None
    if not (is_call(extra, aten.expand.default) and is_call(extra.args[0], aten.arange.start)):
        return None
    start, end = extra.args[0].args[:2]
    if not (isinstance(start, int) and isinstance(end, int)) or extra.args[0].kwargs.get("dtype") != torch.int64:
        return None
    return w0, ids0, end - start, start


def _match(moe: Node) -> dict | str:
    """The router feeding one MoE op, or why it is not one the kernel computes."""
    w, ids = moe.args[1], moe.args[2]
    shared = _shared_columns(w, ids)
    w0, ids0, n_extra, first = shared if shared else (w, ids, 0, 0)
    topk = ids0.args[0] if isinstance(ids0, Node) and ids0.target is operator.getitem and ids0.args[1] == 1 else None
    if not is_call(topk, aten.topk.default):
        return "topk_ids is not a top-k's indices"
    if (reason := tt.topk_unfit(topk)) is not None:
        return f"its top-k does not fit the kernel: {reason}"
    s, k = topk.args[:2]
    if any(not (u.target is operator.getitem and u.args[1] == 1) for u in topk.users):
        return "the top-k's values are used"
    if not is_call(s, aten.softmax.int) or _arg(s, 1, "dim", -1) not in (-1, 1) or s.meta["val"].dtype != torch.float32:
        return "the top-k does not rank an fp32 softmax over the last dim (sigmoid / biased / grouped routing)"
    logits = s.args[0]
    cast = w0 if is_call(w0, *CASTS) else None
    scaled = cast.args[0] if cast is not None else w0
    scale = 1.0
    if is_call(scaled, aten.mul.Tensor, aten.mul.Scalar) and isinstance(scaled.args[1], float):
        scaled, scale = scaled.args[0], scaled.args[1]
    if not (is_call(scaled, aten.gather.default) and scaled.args[0] is s and scaled.args[1] in (1, -1)
            and scaled.args[2] is ids0):
        return "the weights are not the softmax gathered at the top-k's indices (times a float)"
    if set(s.users) - {topk, scaled}:
        return "the softmax is used elsewhere"
    if logits.meta["val"].dim() != 2:
        return f"logits {tuple(logits.meta['val'].shape)} are not [T, E]"
    return dict(moe=moe, w=w, ids=ids, logits=logits, k=k, scale=float(scale), n_extra=n_extra, first=first,
                dtype=w.meta["val"].dtype)


def _gate(logits: Node, state: ProgramState) -> tuple[Node, Node] | str:
    """(x, weight) when the logits are the gate's linear of a 2-D x and a weight of the program
    (parameter, buffer or constant) [E, D] in x's dtype, read by nothing but the router; else why not."""
    if is_call(logits, aten.linear.default) and _arg(logits, 2, "bias", None) is None:
        x, weight = logits.args[:2]
    elif is_call(logits, aten.mm.default) and (is_call(logits.args[1], aten.t.default) or (
            is_call(logits.args[1], aten.permute.default) and list(logits.args[1].args[1]) == [1, 0])):
        x, weight = logits.args[0], logits.args[1].args[0]
    else:
        return "the logits are not a bias-free linear (or mm with a transposed weight)"
    if len(logits.users) != 1:
        return "the logits are used elsewhere"
    if not (isinstance(weight, Node) and state.target_of(weight) is not None):
        return "the gate weight is not a parameter, buffer or constant of the program"
    xv, wv = x.meta["val"], weight.meta["val"]
    if xv.dim() != 2 or wv.dim() != 2 or xv.shape[1] != wv.shape[1] or xv.dtype != wv.dtype:
        return f"x {tuple(xv.shape)} {xv.dtype} and weight {tuple(wv.shape)} {wv.dtype} are not [T, D] @ [E, D]^T"
    if xv.dtype not in kt.DTYPES:
        return f"gate dtype {xv.dtype}"
    return x, weight


def _align_unfit(site: dict, kind: str, gate_value: str) -> str | None:
    """Why one routed MoE op keeps moe_align inside it rather than router_align's alignment (None: it
    takes router_align)."""
    moe = site["moe"]
    if kind != "decode":
        return f"{kind} program (router_align is decode's)"
    if gate_value != "0":
        return f"{GATE_ENV}={gate_value} (the gate GEMM in the router)"
    form = env_choice(tt.MOE_ALIGN_ENV, tt.MOE_ALIGN_DEFAULT, tt.MOE_ALIGN_FORMS)
    if form != "kernel":
        return f"{tt.MOE_ALIGN_ENV}={form}"
    x = moe.args[0].meta["val"]
    if is_call(moe, torch.ops.dsv3.moe_experts_fp8.default):
        if not _arg(moe, 7, "act_quant", False):
            return f"{moe.name}: weight-only fp8 experts (ATen)"
    elif x.dtype not in km.DENSE_DTYPES:
        return f"{moe.name}: {x.dtype} experts (ATen)"
    n, e = site["logits"].meta["val"].shape[1], moe.args[3].meta["val"].shape[0]
    if not isinstance(e, int) or e > MAX_ALIGN_EXPERTS:
        return f"{moe.name}: {e} experts (the alignment takes <= {MAX_ALIGN_EXPERTS})"
    if n > e or site["first"] + site["n_extra"] > e:
        return f"{moe.name}: ids up to {max(n, site['first'] + site['n_extra']) - 1} for {e} experts"
    return None


def _route_and_align(state: ProgramState, site: dict, route: tuple, kind: str) -> None:
    """router_align in place of the router, its alignment handed to the MoE op's aligned form."""
    moe = site["moe"]
    x, w13 = moe.args[0], moe.args[3]
    ops = torch.ops.dsv3_aoti
    with state.graph.inserting_before(moe):
        out = state.call(ops.router_align.default,
                         (site["logits"], *route, w13.meta["val"].shape[0], tt.BLOCK_M[kind]))
        parts = [state.call(operator.getitem, (out, i)) for i in range(5)]  # w, ids, sorted, experts, npp
        if is_call(moe, torch.ops.dsv3.moe_experts_fp8.default):
            new = state.call(ops.moe_experts_fp8_aligned.default, (x, *parts, *moe.args[3:7]), meta_from=moe)
        else:
            new = state.call(ops.moe_experts_aligned.default, (x, *parts, w13, moe.args[4]), meta_from=moe)
    moe.replace_all_uses_with(new)


def fuse_router(ep: ExportedProgram, kind: str) -> tuple[ExportedProgram, str]:
    """The program (`kind`: prefill or decode) with each matching router rewritten, and a line for
    the manifest's `lowerings`."""
    value = env_choice(ROUTER_ENV, "1", {"1": "one router kernel", "0": "ATen softmax / top-k / gather"})
    gate_value = env_choice(GATE_ENV, GATE_DEFAULT, GATE_CHOICES)
    align_value = env_choice(ALIGN_ENV, ALIGN_DEFAULT, ALIGN_CHOICES)
    gate_op = {"1": torch.ops.dsv3_aoti.router_topk_gate.default,
               "split": torch.ops.dsv3_aoti.router_topk_gate_split.default}.get(gate_value)
    moes = [n for n in ep.graph.nodes if is_call(n, *MOE_OPS)]
    if value == "0" or not moes:
        return ep, f"not fused ({ROUTER_ENV}=0)" if moes else "no MoE"
    state = ProgramState(ep)
    found = [_match(n) for n in state.graph.nodes if is_call(n, *MOE_OPS)]
    sites = [f for f in found if not isinstance(f, str)]
    gated, aligned, kept, unaligned = 0, 0, [], []  # kept: why a gate GEMM stays separate
    for site in sites:
        gate = _gate(site["logits"], state) if gate_op is not None else f"{GATE_ENV}=0"
        route = (site["k"], site["scale"], site["n_extra"], site["first"], site["dtype"])
        align = _align_unfit(site, kind, gate_value) if align_value == "1" else f"{ALIGN_ENV}=0"
        if align is None:
            _route_and_align(state, site, route, kind)
            aligned += 1
            continue
        unaligned.append(align)
        with state.graph.inserting_before(site["moe"]):
            if isinstance(gate, str):
                kept.append(gate)
                out = state.call(torch.ops.dsv3_aoti.router_topk.default, (site["logits"], *route))
            else:
                out = state.call(gate_op, (*gate, *route))
                gated += 1
            weights, ids = (state.call(operator.getitem, (out, i)) for i in range(2))
        site["moe"].replace_input_with(site["w"], weights)
        site["moe"].replace_input_with(site["ids"], ids)
    state.eliminate_dead_code()
    how = (f"{len(sites)} of {len(moes)} MoE routers (softmax, top-k, weights, shared-expert columns) -> "
           "dsv3_aoti::router_topk (kernels/topk.py)")
    if sites:
        how += (f", {gated} of them with the gate GEMM ({gate_op.name().split('::')[1]})" if gate_op is not None
                else f", the gate GEMM separate ({GATE_ENV}=0)")
        if gate_op is not None and kept:
            how += f" (gate kept: {kept[0]})"
        if align_value == "1":
            how += (f"; {aligned} of them with moe_align in the same launch (dsv3_aoti::router_align, "
                    "kernels/router_align.py) feeding the MoE's aligned form"
                    + (f" (not aligned: {unaligned[0]})" if unaligned else ""))
    skipped = [f for f in found if isinstance(f, str)]
    if skipped:
        how += f"; not fused: {skipped[0]}"
    return (state.program() if sites else ep), how
