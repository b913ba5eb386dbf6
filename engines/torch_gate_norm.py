"""The ffn norm before each MoE of a decode program computed by the router's gate kernel (meant to save a launch).

Each MoE layer's input is x = RMSNorm(h) with h = residual + attention output (reference/model.py Block; the
RMSNorm in fp32, reference/layers.py). In a CUDA package Inductor makes that a kernel of its own per MoE layer
(`triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_view_*`: writes h and x; 25-26 launches and ~37 us of kernels
per H200 batch-1 16b step, sessions 21-22), whose only reader of x is the router's gate kernel: with fuse_router's
split gate (engines/torch_router.py) that kernel also writes the fp8 MoE's act_quant(x), and the MoE op reads x
for its dtype alone. Rewritten (decode programs on CUDA, after fuse_router; DSV3_TORCH_GATE_NORM=1, opt-in):

    h   = add(residual, delta)                                     # bf16, also read later (the next residual)
    x   = reshape(to(rms_norm(to(h, f32), [D], weight, eps), bf16), [T, D])
    w, ids, q, s = dsv3_aoti::router_gate_topk_quant(x, gate_w, ...)
    y   = dsv3_aoti::moe_experts_fp8_quantized(x, q, s, w, ids, ...)
becomes
    w, ids, q, s, h = dsv3_aoti::router_gate_norm_topk_quant(residual, delta, weight, eps, gate_w, ...)
    y   = dsv3_aoti::moe_experts_fp8_quantized(reshape(h, [T, D]), q, s, w, ids, ...)    # (x's dtype)
and every other reader of h reads the op's h. The gate kernel's programs each take their rows' mean square over
all of D (L2 reads of r and d), normalize their 128-wide split and multiply (kernels/router_gate.py norm); the
first expert block's programs write h. The values, against the eager program: h bit for bit; x within a bf16
rounding (its fp32 mean square summed in another order). Against the package without the rewrite x may differ more:
Inductor's fused norm kernel need not round h to bf16 before the norm (emulate_precision_casts is off), this kernel
does, as eager torch does; the A/B compares both against the eager step. Cost: each program re-reads its rows of r and
d (L2): ~8 MB per MoE layer at batch 64 on the 16b model, so time batches 8 and 64 as well as 1. bf16 / fp16
programs (an fp32 program has no casts around its norm: not matched).

Measured on the H200 (benchmarks/RESULTS.md sessions 23-24): a loss in both forms. The gate kernel with the norm took
9.2 us per call (first form: column blocks one after another) and 4.3 us (row-by-row mean square) against 2.4 us plus
the 1.6 us norm kernel it replaces; above ROW_QUANT_MAX_ROWS rows it takes the column blocks again (0.58x the two
launches at 8 rows). Kept opt-in for the record; a candidate for removal.
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import dsv3_export.engines.torch_router  # noqa: F401  (registers the dsv3_aoti router ops)
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels import router_gate as kg
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState

GATE_NORM_ENV = "DSV3_TORCH_GATE_NORM"
GATE_NORM_FORMS = {"0": "the ffn norm by an Inductor kernel", "1": "the ffn norm in the router's gate kernel"}
aten = torch.ops.aten
CASTS = (aten.to.dtype, aten._to_copy.default)
RESHAPES = (aten.reshape.default, aten.view.default)


def cast_source(node: object, dtype: torch.dtype) -> Node | None:
    """The cast's input when node is a dtype cast to `dtype` (nothing else changed), else None."""
    if not is_call(node, *CASTS) or node.meta["val"].dtype != dtype:
        return None
    if node.target is aten._to_copy.default and set(node.kwargs) - {"dtype"}:
        return None
    return node.args[0]


def _ffn_norm(x: Node, router: Node) -> dict | None:
    """The norm chain feeding a router_gate_topk_quant's x, or None when x is not reshape(cast(rms_norm(cast(h,
    f32)))) of h = add(residual, delta) read by nothing else but the router and the MoE's dtype argument."""
    if not is_call(x, *RESHAPES) or x.meta["val"].dim() != 2:
        return None
    moes = [u for u in x.users if u is not router]
    if any(not (is_call(u, torch.ops.dsv3_aoti.moe_experts_fp8_quantized.default) and u.args[0] is x
                and x not in u.args[1:]) for u in moes):
        return None
    dtype = x.meta["val"].dtype
    if len(x.args[0].users) != 1 or dtype not in kg.DTYPES:
        return None
    site = residual_norm(x.args[0], dtype)
    return None if site is None else dict(site, x=x, moes=moes)


def residual_norm(normed: object, dtype: torch.dtype) -> dict | None:
    """The chain `cast(rms_norm(cast(h, f32), [D], weight, eps), dtype)` ending at node `normed`, with h = add(residual,
    delta) in dtype read by the f32 cast alone among the chain: dict(cast32, h, r, d, weight, eps), weight the norm
    weight's own tensor (its f32 cast skipped: the kernels widen it), or None. Shared with torch_attn_norm.py."""
    rms = cast_source(normed, dtype)
    if rms is None or not is_call(rms, aten.rms_norm.default) or len(rms.users) != 1:
        return None
    if len(rms.args) != 4 or rms.kwargs or not isinstance(rms.args[3], float):
        return None
    h32, shape, weight = rms.args[:3]
    h = cast_source(h32, torch.float32)
    if h is None or len(h32.users) != 1 or not is_call(h, aten.add.Tensor) or h.kwargs or len(h.args) != 2:
        return None
    r, d = h.args
    hv = h.meta["val"]
    if not all(isinstance(a, Node) and a.meta["val"].shape == hv.shape and a.meta["val"].dtype == hv.dtype
               for a in (r, d)):
        return None
    if hv.dtype != dtype or list(shape) != [hv.shape[-1]] or not isinstance(weight, Node):
        return None
    source = cast_source(weight, torch.float32)
    return dict(cast32=h32, h=h, r=r, d=d, weight=source if source is not None else weight, eps=rms.args[3])


def gate_norm_into_router(ep: ExportedProgram, kind: str) -> tuple[ExportedProgram, str]:
    """The decode program with each matching ffn norm moved into its router's gate kernel, and a line for the
    manifest's `lowerings`."""
    form = env_choice(GATE_NORM_ENV, "0", GATE_NORM_FORMS) if kind == "decode" else "0"
    if form == "0":
        return ep, f"Inductor ({GATE_NORM_ENV}=0)" if kind == "decode" else "Inductor (prefill)"
    state = ProgramState(ep)
    routers = [n for n in state.graph.nodes if is_call(n, torch.ops.dsv3_aoti.router_gate_topk_quant.default)]
    moved = 0
    for router in routers:
        order = {n: i for i, n in enumerate(state.graph.nodes)}  # (this loop inserts nodes)
        site = _ffn_norm(router.args[0], router)
        if site is None or any(order[u] < order[router] for u in site["h"].users if u is not site["cast32"]):
            continue  # (h read before the router: the op's h would come too late)
        with state.graph.inserting_before(router):
            new = state.call(torch.ops.dsv3_aoti.router_gate_norm_topk_quant.default,
                             (site["r"], site["d"], site["weight"], site["eps"], *router.args[1:]), meta_from=router)
            h = state.call(operator.getitem, (new, 4))
            x_like = state.call(site["x"].target, (h, *site["x"].args[1:]))  # the MoE's dtype argument
        for user in list(router.users):  # getitem 0-3: the same outputs
            user.replace_input_with(router, new)
        for moe in site["moes"]:
            moe.replace_input_with(site["x"], x_like)
        site["h"].replace_all_uses_with(h, delete_user_cb=lambda user, norm=site["cast32"]: user is not norm)
        moved += 1
    if not moved:
        return ep, f"no ffn norm matched ({GATE_NORM_ENV}=1)"
    state.eliminate_dead_code()
    return state.program(), f"{moved} of {len(routers)} ffn norms into the router's gate kernel ({GATE_NORM_ENV}=1)"
