"""The attention norm of a decode program computed by the wq + wkv_a GEMV (meant to save a launch a layer).

Each layer after the first reads x = RMSNorm(h) with h = residual + the last layer's output (reference/model.py
Block; the RMSNorm in fp32, reference/layers.py), and x's only reader is the attention's first GEMM: wq + wkv_a as
one fp8 Linear (passes/fuse_shared_input_linears), the decode GEMV at batch <= GEMV_MAX_ROWS
(engines/torch_decode_gemv.py). In a CUDA package Inductor makes the norm a kernel of its own per layer
(`triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_select_unsqueeze_view_*`: 24-26 launches and ~52 us of kernels
per H200 batch-1 16b step, sessions 22-23). Rewritten (decode programs on CUDA with the GEMV; DSV3_TORCH_ATTN_NORM=gemv,
opt-in):

    h = add(residual, delta)                                   # also read later (the next residual)
    x = to(rms_norm(to(h, f32), [D], weight, eps), bf16)
    y = dsv3::fp8_linear(x, W, S, True)
becomes
    y, h = dsv3_aoti::norm_fp8_linear(residual, delta, weight, eps, W, S, split_k_sum)

and every other reader of h reads the op's h. The op (kernels/rms_norm.py, kernels/fp8_gemv.py NORM): at batch <=
GEMV_MAX_ROWS the GEMV's programs each compute their row's norm from r and d (one whole-row load for the mean square,
L2 hits) and the first column tile writes h; above it our norm kernel writes x and h, then act_quant and the tile
GEMM run as fp8_linear's, all gated by the batch so that one compiled program launches one path or the other.

Values against the eager program: h bit for bit; x within one bf16 rounding (its fp32 mean square summed in another
order), y the GEMV / GEMM of that x. Against the package without the rewrite x may differ more: Inductor's fused
norm need not round h to bf16 before the norm, these kernels do, as eager torch does; compare both arms against the
eager step. bf16 / fp16 programs; the first layer (its h is the embedding, no add) keeps Inductor's kernel.

Measured on the H200 (benchmarks/RESULTS.md session 24, 27 layers): within the build-to-build spread. The 24 norm
kernels go, but 25 pointwise kernels come (`triton_poi_fused__to_copy_add_select_view_*`, ~1.7 us each): delta, the
MoE's output combine, was computed inside Inductor's norm kernel and must now be written out as this op's input; and
the GEMVs with the norm in their prologue took 285 us per step against 250. A launch is saved only if the op also
takes the combine's inputs.
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.library import triton_op

import dsv3_export.ops.fp8  # noqa: F401  (registers dsv3::fp8_linear)
from dsv3_export.engines import torch_launch
from dsv3_export.engines.torch_decode_gemv import gated
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.engines.torch_triton import _fp8_gemm, _split_k_sum_kernel
from dsv3_export.kernels import fp8_gemv as kv
from dsv3_export.kernels import rms_norm as kn
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState

ATTN_NORM_ENV = "DSV3_TORCH_ATTN_NORM"
ATTN_NORM_FORMS = {"0": "the attention norm by an Inductor kernel",
                   "gemv": "the attention norm in the wq + wkv_a GEMV's prologue (our norm kernel above its batches)"}
aten = torch.ops.aten
CASTS = (aten.to.dtype, aten._to_copy.default)


@triton_op("dsv3_aoti::norm_fp8_linear", mutates_args={})
def norm_fp8_linear(residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, scale: torch.Tensor, split_k_sum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dsv3::fp8_linear(rms_norm(residual + delta) * norm_weight, weight, scale, act_quant=True) of a decode program
    with the GEMV -> (y [..., N], h = residual + delta in residual's shape); the module docstring's two paths."""
    k = residual.shape[-1]
    r = residual.reshape(-1, k).contiguous()  # [M, K]
    d = delta.reshape(-1, k).contiguous()
    nw = norm_weight.contiguous()
    gate = kv.gemv_gate(r.shape[0])  # 1 at M <= GEMV_MAX_ROWS (symbolic: no guard)
    x, h = torch.empty_like(r), torch.empty_like(r)  # x: written by the norm kernel, read by the tile path only
    torch_launch.launch_spec(gated(kn.add_rms_norm_spec(r, d, nw, eps, x, h), 1 - gate))
    xq, xs = torch_launch.act_quant_launch(x, 1 - gate)
    y = _fp8_gemm(xq, xs, weight, scale, r.dtype, "decode", small_batch=(x, gate), kernel_sum=split_k_sum,
                  gemv_norm=kn.ResidualNorm(r, d, nw, eps, h))
    return y.reshape(*residual.shape[:-1], weight.shape[0]), h.view(residual.shape)


def cast_source(node: object, dtype: torch.dtype) -> Node | None:
    """The cast's input when node is a dtype cast to `dtype` (nothing else changed), else None."""
    if not is_call(node, *CASTS) or node.meta["val"].dtype != dtype:
        return None
    if node.target is aten._to_copy.default and set(node.kwargs) - {"dtype"}:
        return None
    return node.args[0]


def residual_norm(normed: object, dtype: torch.dtype) -> dict | None:
    """The chain `cast(rms_norm(cast(h, f32), [D], weight, eps), dtype)` ending at node `normed`, with h = add(residual,
    delta) in dtype read by the f32 cast alone among the chain: dict(cast32, h, r, d, weight, eps), weight the norm
    weight's own tensor (its f32 cast skipped: the kernels widen it), or None."""
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


def _attn_norm(linear: Node) -> dict | None:
    """The norm chain feeding an fp8 Linear (act_quant on) whose weight the decode GEMV takes (residual_norm's
    dict), or None unless its x is cast(rms_norm(cast(h, f32))) of h = add(residual, delta), x read by this Linear
    alone."""
    if len(linear.args) != 4 or linear.kwargs or linear.args[3] is not True:
        return None
    x, w = linear.args[:2]
    if not isinstance(x, Node) or len(x.users) != 1 or not isinstance(w, Node):
        return None
    wv, xv = w.meta["val"], x.meta["val"]
    if wv.dim() != 2 or not kv.gemv_suits(*wv.shape) or xv.dtype not in kn.DTYPES:
        return None
    site = residual_norm(x, xv.dtype)
    if site is None or site["h"].meta["val"].shape[-1] > kn.MAX_K:
        return None
    return site


def attn_norm_into_gemv(ep: ExportedProgram, kind: str, gemv: bool) -> tuple[ExportedProgram, str]:
    """The decode program with each matching attention norm moved into its GEMV (gemv: the program has the decode
    GEMV, engines/torch_decode_gemv.py program_decode_gemv), and a line for the manifest's `lowerings`."""
    form = env_choice(ATTN_NORM_ENV, "0", ATTN_NORM_FORMS) if kind == "decode" else "0"
    if form == "0":
        return ep, f"Inductor ({ATTN_NORM_ENV}=0)" if kind == "decode" else "Inductor (prefill)"
    if not gemv:
        return ep, f"Inductor: this decode program has no GEMV ({ATTN_NORM_ENV}={form})"
    state = ProgramState(ep)
    linears = [n for n in state.graph.nodes if is_call(n, torch.ops.dsv3.fp8_linear.default)]
    kernel_sum = _split_k_sum_kernel("decode", True)
    moved = 0
    for linear in linears:
        order = {n: i for i, n in enumerate(state.graph.nodes)}  # (this loop inserts nodes)
        site = _attn_norm(linear)
        if site is None or any(order[u] < order[linear] for u in site["h"].users if u is not site["cast32"]):
            continue  # (h read before the Linear: the op's h would come too late)
        with state.graph.inserting_before(linear):
            new = state.call(torch.ops.dsv3_aoti.norm_fp8_linear.default,
                             (site["r"], site["d"], site["weight"], site["eps"], *linear.args[1:3], kernel_sum),
                             meta_from=linear)
            y = state.call(operator.getitem, (new, 0))
            h = state.call(operator.getitem, (new, 1))
        linear.replace_all_uses_with(y)
        site["h"].replace_all_uses_with(h, delete_user_cb=lambda user, norm=site["cast32"]: user is not norm)
        moved += 1
    if not moved:
        return ep, f"no attention norm matched ({ATTN_NORM_ENV}={form})"
    state.eliminate_dead_code()
    return state.program(), f"{moved} of {len(linears)} fp8 Linears with their attention norm in the GEMV " \
                            f"({ATTN_NORM_ENV}={form})"
