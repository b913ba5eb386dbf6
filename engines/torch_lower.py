"""Lowering of the dsv3:: custom ops before AOTInductor compiles a program (torch backend).

Why: a package that still calls a Python-defined `custom_op` cannot run without Python (the C++
runtime fails with "Cannot be run via AOTI without Python environment"). So every dsv3:: op is
replaced, in this one place, by something Inductor compiles into the package:

    cpu   its reference math in traceable ATen (run_decompositions with the functions below);
          Inductor turns it into C++ kernels.
    cuda  the same ATen math, which Inductor turns into its own Triton kernels, except where
          engines/torch_triton.py provides a `triton_op` around one of our kernels/ kernels
          (then the kernel is embedded in the package through wrap_triton).

The lowerings are shape-static: no `.tolist()`, no data-dependent control flow, so they trace
under dynamic batch / sequence / cache dims. Unknown dsv3:: ops fail the build naming the op
and the node, never silently pass through.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch.export import ExportedProgram

import dsv3_export.ops  # noqa: F401 - registers whichever dsv3:: ops exist
from dsv3_export.reference.fp8 import AMAX_FLOOR, FP8_DTYPE, FP8_E4M3_MAX, cdiv
from dsv3_export.step import absorbed_attention

NAMESPACE = "dsv3"
FP8_BLOCK = 128


class LoweringError(RuntimeError):
    """A dsv3:: op in a program has no lowering for the requested device."""


def _mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale):
    return absorbed_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale)


def _fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x rounded through 1x128 fp8 blocks, back in x.dtype: dequant(act_quant(x)), bit-identical.

    sum_kb (xq . wq)_kb * xs * ws == dequant(xq) @ dequant(wq)^T exactly in real arithmetic, so
    with fp32 compute this is the act_quant=True math of dsv3::fp8_linear up to summation order;
    bf16 engines (CUDA) round the dequantized operands to bf16 and run a bf16 GEMM.
    Written out instead of calling reference.fp8.act_quant: Inductor (2.13, CPU and
    torch.compile alike) miscompiles that form when K is not a multiple of 128 (the slice back
    to K before the fp8 cast gives garbage, 1e25, then NaN); slicing after dequantizing does not.
    The cast back to x.dtype comes before that slice: sliced first, bf16 / fp16 x with ragged K
    (192, 200, 328) compiled to garbage or NaN (2.13 CPU, 27 of 45 shape x dtype cases; the
    tiny fp8 torch engine's logits were NaN); cast first, all 45 are bit-exact.
    """
    k = x.shape[-1]
    nb = cdiv(k, FP8_BLOCK)
    xf = x.to(torch.float32)
    if nb * FP8_BLOCK != k:
        xf = torch.cat([xf, xf.new_zeros(*xf.shape[:-1], nb * FP8_BLOCK - k)], dim=-1)  # [..., nb * 128]
    blocks = xf.unflatten(-1, (nb, FP8_BLOCK))  # [..., nb, 128]
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX  # [..., nb, 1]
    q = (blocks / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return (q.to(torch.float32) * scale).to(x.dtype).flatten(-2)[..., :k]  # [..., K]


def _dequant(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [..., N, K] + fp32 [..., ceil(N/128), ceil(K/128)] -> dense [..., N, K], bit-identical to
    reference.fp8.weight_dequant.

    Block form (pad, view as blocks, scale, slice) because Inductor (2.13 CPU) miscompiles the
    reference's repeat_interleave form, and an index_select form, when a scale dim has one block
    (a Linear with N = 80: outputs went inf); this form compiled exactly for every shape tried.
    """
    n, k = w.shape[-2:]
    nr, nc = scale.shape[-2:]
    wf = F.pad(w.to(torch.float32), (0, nc * FP8_BLOCK - k, 0, nr * FP8_BLOCK - n))  # [..., nr*128, nc*128]
    blocks = wf.unflatten(-1, (nc, FP8_BLOCK)).unflatten(-3, (nr, FP8_BLOCK))  # [..., nr, 128, nc, 128]
    blocks = blocks * scale.to(torch.float32)[..., :, None, :, None]
    return blocks.flatten(-2).flatten(-3, -2)[..., :n, :k].to(dtype)  # [..., N, K]


def _fp8_linear(x, weight, scale, act_quant_x):
    w = _dequant(weight, scale, x.dtype)
    return F.linear(_fake_quant(x) if act_quant_x else x, w)


def _moe_experts(x, topk_weights, topk_ids, w13, w2):
    """Routed experts, shape-static: every expert on every token, weighted by the [T, E] routing
    matrix that is exactly zero off the top-k (the reference's forward_static). E/k times the
    FLOPs of a sparse grouped GEMM, but no data-dependent shapes; x [T, D], topk [T, k],
    w13 [E, 2I, D], w2 [E, D, I] -> [T, D].
    """
    t, d = x.shape
    e = w13.shape[0]
    routing = torch.zeros(t, e, dtype=torch.float32, device=x.device)
    routing = routing.scatter_add(1, topk_ids, topk_weights.to(torch.float32))  # [T, E]
    w13 = w13.to(x.dtype)
    h = torch.einsum("td,end->etn", x, w13)  # [E, T, 2I]
    gate, up = h.chunk(2, dim=-1)  # [E, T, I]
    y = torch.einsum("eti,edi->etd", F.silu(gate) * up, w2.to(x.dtype))  # [E, T, D]
    out = torch.einsum("etd,te->td", y.to(torch.float32), routing)  # [T, D]
    return out.to(x.dtype)


def _moe_experts_fp8(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, act_quant_x):
    w13d = _dequant(w13, w13_scale, x.dtype)
    w2d = _dequant(w2, w2_scale, x.dtype)
    if not act_quant_x:
        return _moe_experts(x, topk_weights, topk_ids, w13d, w2d)
    t, d = x.shape
    e = w13.shape[0]
    routing = torch.zeros(t, e, dtype=torch.float32, device=x.device)
    routing = routing.scatter_add(1, topk_ids, topk_weights.to(torch.float32))  # [T, E]
    h = torch.einsum("td,end->etn", _fake_quant(x), w13d)  # [E, T, 2I]
    gate, up = h.chunk(2, dim=-1)  # [E, T, I]
    y = torch.einsum("eti,edi->etd", _fake_quant(F.silu(gate) * up), w2d)  # [E, T, D]
    return torch.einsum("etd,te->td", y.to(torch.float32), routing).to(x.dtype)


# op name -> ATen lowering with the op's signature. The reference bodies of moe_experts(_fp8)
# sort tokens with .tolist() loops, which torch.export cannot trace; these are the static forms.
ATEN_LOWERINGS: dict[str, Callable] = {
    "dsv3::mla_attention": _mla_attention,
    "dsv3::fp8_linear": _fp8_linear,
    "dsv3::moe_experts": _moe_experts,
    "dsv3::moe_experts_fp8": _moe_experts_fp8,
}


def dsv3_ops(ep: ExportedProgram) -> Counter:
    """Histogram of dsv3:: ops (by name) called in the program's graph."""
    counts: Counter = Counter()
    for node in ep.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target.namespace == NAMESPACE:
            counts[node.target.name()] += 1
    return counts


def lower_dsv3_ops(ep: ExportedProgram, device: str,
                   triton_lowerings: dict[str, Callable] | None = None) -> tuple[ExportedProgram, dict[str, str]]:
    """The program with every dsv3:: op replaced; returns (program, {op: how it was lowered}).

    triton_lowerings (cuda only): op name -> function calling a triton_op; preferred over ATen.
    """
    found = dsv3_ops(ep)
    table: dict = {}
    how: dict[str, str] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                or node.target.namespace != NAMESPACE:
            continue
        name = node.target.name()
        if name in how:
            continue
        if device == "cuda" and triton_lowerings and name in triton_lowerings:
            table[node.target] = triton_lowerings[name]
            how[name] = getattr(triton_lowerings[name], "how",
                                "triton_op dsv3_aoti::* (our kernels/ kernel, embedded through wrap_triton)")
        elif name in ATEN_LOWERINGS:
            table[node.target] = ATEN_LOWERINGS[name]
            how[name] = "ATen decomposition (Inductor-generated " + ("Triton" if device == "cuda" else "C++") + " kernels)"
        else:
            raise LoweringError(f"torch backend: no {device} lowering for op {name} (node {node.name!r}); "
                                f"known: {sorted(ATEN_LOWERINGS)}")
    if not table:
        return ep, how
    lowered = ep.run_decompositions(table)
    left = dsv3_ops(lowered)
    if left:
        raise LoweringError(f"torch backend: ops left after lowering: {dict(left)} (of {dict(found)})")
    return lowered, how
