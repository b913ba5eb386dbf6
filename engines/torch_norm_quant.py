"""RMSNorm and the act_quant of its fp8 consumers as one kernel, in the torch backend's CUDA programs.

Why: in an fp8 program every attention and FFN block starts with RMSNorm (Inductor's kernel, with
the residual add fused in) and then act_quant (ours) of the normed x before each fp8 GEMM: two
launches per block where one kernel (kernels/rmsnorm.py rmsnorm_quant) can add, normalize and
quantize a row it holds in registers. At batch-1 decode these are ~2.5 us launches each.

Off by default: DSV3_TORCH_NORM_QUANT=1 at build time turns it on. Measured on the H200 (session 7,
4-layer 16b fp8 decode program, CUDA-graph step at batch 1 / 8 / 64): 0.54 / 0.78 / 1.37 ms with it,
0.53 / 0.75 / 1.27 ms without. The fused kernel (~2.3 us per call at batch 1) costs more than the
act_quant launch it saves (~1.3 us) plus Inductor's norm, which fuses into the kernels around it.

Rewrites (before the dsv3:: ops are lowered; CUDA only, with DSV3_TORCH_NORM_QUANT=1):

    h = add(a, b)                                               # the residual stream, if present
    y = to(rms_norm(to(h, f32), [D], to(w, f32), eps), dtype)  # (the casts as the reference traces)
    dsv3::fp8_linear(y, W, S, act_quant=True)                   # and/or
    dsv3::moe_experts_fp8(reshape(y, [-1, D]), tw, ids, w13, s13, w2, s2, act_quant=True)
becomes
    y, h, q, s = dsv3_aoti::add_rmsnorm_quant(a, b, w, eps)     # or y, q, s = rmsnorm_quant(h, w, eps)
    dsv3_aoti::fp8_linear_q(q, s, W, S, dtype, decode)          # the GEMM on the kernel's q, s
    dsv3_aoti::moe_experts_fp8_q(reshape(q, [-1, D]), reshape(s, [-1, D/128]), tw, ids, ..., block_m, dtype)
Other users of y (the bf16 router gate) read the kernel's y; later residual adds read its h.
q, s are act_quant(y)'s bits (kernels/rmsnorm.py); y may differ from the ATen decomposition's by
the order of the mean's sum (one bf16 rounding, now and then).
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
from dsv3_export.kernels import rmsnorm as kr
from dsv3_export.kernels._common import QUANT_BLOCK, cdiv
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState
from dsv3_export.passes.weight_source import strip_casts

NORM_QUANT_ENV = "DSV3_TORCH_NORM_QUANT"
NORM_QUANT_DEFAULT = "0"  # measured slower (module docstring)
aten = torch.ops.aten
CASTS = (aten.to.dtype, aten._to_copy.default)
VIEWS = (aten.reshape.default, aten.view.default)
DENSE = (torch.bfloat16, torch.float16, torch.float32)


def _norm_quant(x2, res2, weight, eps):
    y, h, q, s = kr.rmsnorm_outputs(x2, res2 is not None, True)
    tt._launch(kr.rmsnorm_spec(x2, res2, weight, y, h, q, s, eps, x2.is_cuda))  # scale rounding as _act_quant's
    return y, h, q, s


@triton_op("dsv3_aoti::rmsnorm_quant", mutates_args={})
def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> y [..., D] (x.dtype), q fp8 [..., D], s fp32 [..., ceil(D/128)]."""
    d = x.shape[-1]
    y, _, q, s = _norm_quant(x.reshape(-1, d).contiguous(), None, weight, eps)
    lead = x.shape[:-1]
    return y.view(x.shape), q.view(x.shape), s.view(*lead, s.shape[-1])


@triton_op("dsv3_aoti::add_rmsnorm_quant", mutates_args={})
def add_rmsnorm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = x + residual; y = rmsnorm(h); (y, h, q, s) with q, s = act_quant(y)."""
    d = x.shape[-1]
    y, h, q, s = _norm_quant(x.reshape(-1, d).contiguous(), residual.reshape(-1, d).contiguous(), weight, eps)
    lead = x.shape[:-1]
    return y.view(x.shape), h.view(x.shape), q.view(x.shape), s.view(*lead, s.shape[-1])


@triton_op("dsv3_aoti::fp8_linear_q", mutates_args={})
def fp8_linear_q(q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 out_dtype: torch.dtype, decode: bool) -> torch.Tensor:
    """dsv3::fp8_linear(act_quant=True) on x already quantized: q [..., K] fp8, s [..., ceil(K/128)]."""
    k = q.shape[-1]
    y = tt._fp8_gemm(q.reshape(-1, k), s.reshape(-1, s.shape[-1]), weight, scale, out_dtype,
                     "decode" if decode else "prefill")  # [M, N]
    return y.reshape(*q.shape[:-1], weight.shape[0])


@triton_op("dsv3_aoti::moe_experts_fp8_q", mutates_args={})
def moe_experts_fp8_q(xq: torch.Tensor, xs: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                      block_m: int, out_dtype: torch.dtype) -> torch.Tensor:
    """dsv3::moe_experts_fp8(act_quant=True) on x already quantized: xq [T, D] fp8, xs [T, ceil(D/128)]."""
    alignment = tt._moe_align(topk_ids, w13.shape[0], block_m)
    return tt.moe_fp8_quantized(xq, xs, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, alignment, out_dtype)


def _cast_dtype(node: Node) -> torch.dtype | None:
    """The dtype a lone cast node converts to (None if it is not one)."""
    if not is_call(node, *CASTS) or set(node.kwargs) - {"dtype", "layout", "device"}:
        return None
    dtype = node.args[1] if node.target is aten.to.dtype and len(node.args) > 1 else node.kwargs.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


def _quantized_consumers(y: Node, d: int) -> list[Node]:
    """The fp8 GEMMs with act_quant that read y (fp8_linear) or a [.., D] view of it (moe_experts_fp8)."""
    found = []
    for user in y.users:
        if is_call(user, torch.ops.dsv3.fp8_linear.default) and user.args[0] is y and user.args[3]:
            found.append(user)
        elif is_call(user, *VIEWS) and user.meta["val"].shape[-1] == d:
            found += [moe for moe in user.users if is_call(moe, torch.ops.dsv3.moe_experts_fp8.default)
                      and moe.args[0] is user and moe.args[7]]
    return found


def _match(norm: Node) -> dict | str:
    """The pieces of one norm site, or why it is not one."""
    x_cast, shape, w, eps = (list(norm.args) + [None] * 4)[:4]
    y = norm
    if len(norm.users) == 1 and _cast_dtype(next(iter(norm.users))) in DENSE:
        y = next(iter(norm.users))
    dtype = y.meta["val"].dtype
    x = x_cast.args[0] if _cast_dtype(x_cast) == torch.float32 else x_cast  # the reference's x.float()
    xv = x.meta["val"]
    d = xv.shape[-1]
    if xv.dtype != dtype or dtype not in DENSE:
        return f"{norm.name}: input {xv.dtype} and output {dtype} differ (the kernel keeps x's dtype)"
    if list(shape) != [d] or not isinstance(d, int) or not isinstance(eps, float):
        return f"{norm.name}: not a norm over a static last dim with a float eps"
    weight, _ = strip_casts(w) if isinstance(w, Node) else (None, [])
    if weight is None or weight.op != "placeholder" or tuple(weight.meta["val"].shape) != (d,):
        return f"{norm.name}: weight is not a [{d}] parameter"
    consumers = _quantized_consumers(y, d)
    if not consumers:
        return f"{norm.name}: no fp8 GEMM with act_quant reads its output"
    residual = None
    if is_call(x, aten.add.Tensor) and not x.kwargs and all(
            isinstance(a, Node) and a.meta["val"].shape == xv.shape and a.meta["val"].dtype == dtype for a in x.args):
        residual = x.args
    return dict(x=x, y=y, weight=weight, eps=eps, d=d, dtype=dtype, consumers=consumers, residual=residual)


def _rewrite(state: ProgramState, site: dict, kind: str) -> None:
    d, dtype, x = site["d"], site["dtype"], site["x"]
    ops = torch.ops.dsv3_aoti
    with state.graph.inserting_before(x.next):  # right after x: every user of x and y comes later
        if site["residual"] is not None:
            out = state.call(ops.add_rmsnorm_quant.default, (*site["residual"], site["weight"], site["eps"]))
            y, h, q, s = (state.call(operator.getitem, (out, i)) for i in range(4))
        else:
            out = state.call(ops.rmsnorm_quant.default, (x, site["weight"], site["eps"]))
            y, q, s = (state.call(operator.getitem, (out, i)) for i in range(3))
            h = None
    for consumer in site["consumers"]:
        with state.graph.inserting_before(consumer):
            if is_call(consumer, torch.ops.dsv3.fp8_linear.default):
                new = state.call(ops.fp8_linear_q.default, (q, s, *consumer.args[1:3], dtype, kind == "decode"),
                                 meta_from=consumer)
            else:
                q2 = state.call(aten.reshape.default, (q, [-1, d]))  # [T, D]
                s2 = state.call(aten.reshape.default, (s, [-1, cdiv(d, QUANT_BLOCK)]))  # [T, D/128]
                new = state.call(ops.moe_experts_fp8_q.default, (q2, s2, *consumer.args[1:7], tt.BLOCK_M[kind], dtype),
                                 meta_from=consumer)
        consumer.replace_all_uses_with(new)
    site["y"].replace_all_uses_with(y)
    if h is not None:
        x.replace_all_uses_with(h, delete_user_cb=lambda user: user is not out)


def fuse_norm_act_quant(ep: ExportedProgram, kind: str) -> tuple[ExportedProgram, str]:
    """The program with each RMSNorm feeding fp8 GEMMs rewritten (see the module docstring), and a
    line for the manifest's `lowerings` saying how many."""
    value = env_choice(NORM_QUANT_ENV, NORM_QUANT_DEFAULT, {"1": "fused RMSNorm + act_quant", "0": "separate"})
    norms = [n for n in ep.graph.nodes if is_call(n, aten.rms_norm.default)]
    if value == "0" or not norms:
        return ep, f"not fused ({NORM_QUANT_ENV}=0)" if norms else "no RMSNorm"
    state = ProgramState(ep)
    sites, skipped = [], []
    for node in state.graph.nodes:
        if is_call(node, aten.rms_norm.default):
            found = _match(node)
            (skipped if isinstance(found, str) else sites).append(found)
    with torch.no_grad():
        for site in sites:
            _rewrite(state, site, kind)
    state.eliminate_dead_code()
    how = (f"{len(sites)} of {len(norms)} RMSNorms + the act_quant of their fp8 GEMMs -> dsv3_aoti::"
           f"(add_)rmsnorm_quant (kernels/rmsnorm.py) feeding fp8_linear_q / moe_experts_fp8_q")
    if skipped:
        how += f"; not fused: {skipped[0]}" + (f" (+{len(skipped) - 1} more)" if len(skipped) > 1 else "")
    return (state.program() if sites else ep), how
