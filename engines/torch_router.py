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
ATen form (torch's top-k). The gate GEMM stays a separate cuBLAS call in prefill programs. In decode
programs (DSV3_TORCH_GATE_SPLIT=1, the default since session 19; 0: cuBLAS) `logits = linear(x, w_gate)`
feeding the router becomes
    w, ids = dsv3_aoti::router_gate_topk(x, w_gate, k, route_scale, n, E, dtype)
kernels/router_gate.py's K-split partials (cuBLAS runs the batch-1 gate as one CTA: 5 us a layer) and the
router kernel summing them: still two launches. When the MoE is the W8A8 fp8 op on the same x, the gate
kernel also writes its act_quant(x) (router_gate_topk_quant -> dsv3_aoti::moe_experts_fp8_quantized): one
launch fewer. H200, 27-layer 16b fp8 batch-1 step: gate + x's act_quant 125 us against 226 (cuBLAS 129 + act_quant
97) in the build whose gate kernel had the pinned config (benchmarks/RESULTS.md session 19).

Removed in session 14, measured slower or no faster on the H200 (benchmarks/RESULTS.md): the gate
GEMM inside the router kernel (DSV3_TORCH_ROUTER_GATE=1: 342 us per 27-layer batch-1 step against
129 for cuBLAS's gate + 64 for router_topk, session 7; =split, the experts split over programs: 197
against 128 + 63 us, session 8) and the router and moe_align in one kernel
(DSV3_TORCH_ROUTER_ALIGN=1: 0.57 / 0.80 ms per 4-layer step at batch 1 / 8 against 0.56 / 0.77,
session 9).
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.library import triton_op

import dsv3_export.ops  # noqa: F401  (registers the dsv3:: ops matched here)
from dsv3_export.engines import torch_launch
from dsv3_export.engines import torch_triton as tt
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels import router_gate as kg
from dsv3_export.kernels import topk as kt
from dsv3_export.kernels.fp8_quant import act_quant_outputs
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState

ROUTER_ENV = "DSV3_TORCH_ROUTER"
GATE_SPLIT_ENV = "DSV3_TORCH_GATE_SPLIT"
GATE_SPLIT_FORMS = {"0": "the gate GEMM by cuBLAS", "1": "the decode gate split over K (kernels/router_gate.py)"}
# How the split gate kernel writes act_quant(x), read when a program is lowered: `rows` (default since session 20)
# a block of at most kernels/router_gate.py ROW_QUANT_MAX_ROWS real rows one row at a time (at batch 1 a sixteenth
# of the arithmetic), fuller blocks as a tile; `tile` every block as a whole [16, 128] tile. H200, 27-layer 16b fp8
# batch-1 step: the gate kernel 60 us per step with `rows` against 122 with `tile` (4 builds against 3,
# benchmarks/RESULTS.md session 20).
GATE_QUANT_ENV = "DSV3_TORCH_GATE_QUANT"
GATE_QUANT_FORMS = {"rows": f"blocks of <= {kg.ROW_QUANT_MAX_ROWS} real rows quantized row by row",
                    "tile": "every block quantized as a whole tile"}
aten = torch.ops.aten
CASTS = (aten.type_as.default, aten.to.dtype, aten._to_copy.default)
MOE_OPS = (torch.ops.dsv3.moe_experts.default, torch.ops.dsv3.moe_experts_fp8.default)


@triton_op("dsv3_aoti::router_topk", mutates_args={})
def router_topk(logits: torch.Tensor, k: int, scale: float, n_extra: int, first_extra: int,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, k + n_extra] (out_dtype), ids [T, k + n_extra] int64."""
    logits = logits.contiguous()
    weights, ids = kt.router_outputs(logits.shape[0], k, n_extra, out_dtype, logits.device)
    torch_launch.launch_spec(kt.router_spec(logits, k, scale, n_extra, first_extra, weights, ids))
    return weights, ids


@triton_op("dsv3_aoti::router_gate_topk", mutates_args={})
def router_gate_topk(x: torch.Tensor, gate_weight: torch.Tensor, k: int, scale: float, n_extra: int,
                     first_extra: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """router_topk(linear(x [T, D], gate_weight [E, D])) with the gate as K-split fp32 partials that the
    router kernel sums (rounded to bf16 for bf16 x, as linear's output is)."""
    return _gate_route(x, gate_weight, k, scale, n_extra, first_extra, out_dtype, None)


@triton_op("dsv3_aoti::router_gate_topk_quant", mutates_args={})
def router_gate_topk_quant(x: torch.Tensor, gate_weight: torch.Tensor, k: int, scale: float, n_extra: int,
                           first_extra: int, out_dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_gate_topk, and act_quant(x) (q fp8 [T, D], s fp32 [T, D/128]) written by the gate kernel
    from the same loads: the fp8 MoE's input (dsv3_aoti::moe_experts_fp8_quantized)."""
    quant = act_quant_outputs(*x.shape, x.device)
    weights, ids = _gate_route(x, gate_weight, k, scale, n_extra, first_extra, out_dtype, quant)
    return weights, ids, *quant


def _gate_route(x, gate_weight, k: int, scale: float, n_extra: int, first_extra: int, out_dtype: torch.dtype,
                quant) -> tuple[torch.Tensor, torch.Tensor]:
    """The split gate's two launches (partials, with act_quant(x) into `quant` if given; the router)."""
    x = x.contiguous()
    partials = kg.partials_buffer(x.shape[0], gate_weight.shape[0], x.shape[1], x.device)  # [S, T, E]
    rows = kg.ROW_QUANT_MAX_ROWS if env_choice(GATE_QUANT_ENV, "rows", GATE_QUANT_FORMS) == "rows" else 0
    torch_launch.launch_spec(kg.gate_partials_spec(x, gate_weight.contiguous(), partials, quant, rows))
    weights, ids = kt.router_outputs(x.shape[0], k, n_extra, out_dtype, x.device)
    torch_launch.launch_spec(kt.router_spec(partials, k, scale, n_extra, first_extra, weights, ids,
                                            round_bf16=x.dtype == torch.bfloat16))
    return weights, ids


def _split_gate(logits: Node) -> tuple[Node, Node] | None:
    """(x, w) when the logits are linear(x [T, D], w [E, D]) without a bias in a dtype the split gate
    computes, else None."""
    if not is_call(logits, aten.linear.default) or len(logits.args) != 2 or logits.kwargs:
        return None
    x, w = logits.args
    xv, wv = x.meta.get("val"), w.meta.get("val")
    if xv is None or wv is None or xv.dim() != 2 or wv.dim() != 2:
        return None
    return (x, w) if kg.gate_unfit(xv.dtype, wv.dtype, wv.shape[0], wv.shape[1]) is None else None


def _takes_quantized_x(moe: Node, gate_x: Node) -> bool:
    """Whether the MoE is the W8A8 fp8 op (act_quant on, all eight arguments positional) on the gate's own x,
    so that the gate kernel's act_quant(x) can be its input."""
    if not is_call(moe, torch.ops.dsv3.moe_experts_fp8.default) or len(moe.args) != 8 or moe.kwargs:
        return False
    return moe.args[0] is gate_x and moe.args[7] is True


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


def _topk_unfit(node: Node) -> str | None:
    """Why an aten.topk node is not one the kernel takes (None: it is)."""
    args = dict(zip(("self", "k", "dim", "largest", "sorted"), node.args)) | dict(node.kwargs)
    x, k = args["self"].meta["val"], args["k"]
    dim, largest = args.get("dim", -1), args.get("largest", True)
    n = x.shape[-1] if x.dim() else None
    if x.dtype not in kt.DTYPES:
        return f"{node.name}: dtype {x.dtype}"
    if dim not in (-1, x.dim() - 1) or not largest:
        return f"{node.name}: dim={dim}, largest={largest} (the kernel: last dim, largest)"
    reason = kt.rows_unfit(n, k)
    return None if reason is None else f"{node.name}: {reason}"


def _match(moe: Node) -> dict | str:
    """The router feeding one MoE op, or why it is not one the kernel computes."""
    w, ids = moe.args[1], moe.args[2]
    shared = _shared_columns(w, ids)
    w0, ids0, n_extra, first = shared if shared else (w, ids, 0, 0)
    topk = ids0.args[0] if isinstance(ids0, Node) and ids0.target is operator.getitem and ids0.args[1] == 1 else None
    if not is_call(topk, aten.topk.default):
        return "topk_ids is not a top-k's indices"
    if (reason := _topk_unfit(topk)) is not None:
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


def fuse_router(ep: ExportedProgram, kind: str = "decode") -> tuple[ExportedProgram, str]:
    """The program (prefill or decode) with each matching router rewritten, and a line for the
    manifest's `lowerings`. In a decode program with GATE_SPLIT_ENV=1 the gate GEMM joins the router op."""
    value = env_choice(ROUTER_ENV, "1", {"1": "one router kernel", "0": "ATen softmax / top-k / gather"})
    split_gate = kind == "decode" and env_choice(GATE_SPLIT_ENV, "1", GATE_SPLIT_FORMS) == "1"
    moes = [n for n in ep.graph.nodes if is_call(n, *MOE_OPS)]
    if value == "0" or not moes:
        return ep, f"not fused ({ROUTER_ENV}=0)" if moes else "no MoE"
    state = ProgramState(ep)
    found = [_match(n) for n in state.graph.nodes if is_call(n, *MOE_OPS)]
    sites = [f for f in found if not isinstance(f, str)]
    gates = quantized = 0
    for site in sites:
        tail = (site["k"], site["scale"], site["n_extra"], site["first"], site["dtype"])
        gate = _split_gate(site["logits"]) if split_gate else None
        moe = site["moe"]
        quant = gate is not None and _takes_quantized_x(moe, gate[0])
        with state.graph.inserting_before(moe):
            if gate is None:
                out = state.call(torch.ops.dsv3_aoti.router_topk.default, (site["logits"], *tail))
            else:
                op = torch.ops.dsv3_aoti.router_gate_topk_quant if quant else torch.ops.dsv3_aoti.router_gate_topk
                out = state.call(op.default, (*gate, *tail))
                gates += 1
            weights, ids, *xq_xs = (state.call(operator.getitem, (out, i)) for i in range(4 if quant else 2))
            if quant:  # the fp8 MoE without its own act_quant of x
                x, _, _, w13, w13_s, w2, w2_s, _ = moe.args
                new = state.call(torch.ops.dsv3_aoti.moe_experts_fp8_quantized.default,
                                 (x, *xq_xs, weights, ids, w13, w13_s, w2, w2_s, tt.BLOCK_M[kind]), meta_from=moe)
                moe.replace_all_uses_with(new)  # the old node is left dead, removed below
                quantized += 1
            else:
                moe.replace_input_with(site["w"], weights)
                moe.replace_input_with(site["ids"], ids)
    state.eliminate_dead_code()
    how = (f"{len(sites)} of {len(moes)} MoE routers (softmax, top-k, weights, shared-expert columns) -> "
           "dsv3_aoti::router_topk (kernels/topk.py)")
    if split_gate:
        how += (f"; {gates} gate GEMMs split over K into the router op ({GATE_SPLIT_ENV}=1, kernels/router_gate.py),"
                f" {quantized} of them writing the fp8 MoE's act_quant of x")
    skipped = [f for f in found if isinstance(f, str)]
    if skipped:
        how += f"; not fused: {skipped[0]}"
    return (state.program() if sites else ep), how
