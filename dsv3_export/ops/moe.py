"""dsv3::moe_experts / dsv3::moe_experts_fp8: the routed experts of a MoE layer as grouped GEMMs.

    dsv3::moe_experts(x [T, D], topk_weights [T, k], topk_ids [T, k] int64,
                      w13 [E, 2I, D], w2 [E, D, I]) -> [T, D] in x.dtype
    dsv3::moe_experts_fp8(x, topk_weights, topk_ids,
                          w13 fp8 [E, 2I, D], w13_scale fp32 [E, ceil(2I/128), ceil(D/128)],
                          w2 fp8 [E, D, I],   w2_scale fp32 [E, ceil(D/128), ceil(I/128)],
                          act_quant: bool) -> [T, D] in x.dtype

y[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) with
expert_e(x) = w2[e] (silu(w1 x) * (w3 x)), w13[e] = [w1; w3] stacked on dim 1 (rows [0, I) are
w1, rows [I, 2I) are w3; the fused_moe kernel's SwiGLU epilogue reads them that way). The fp8
variant blocks each expert's stacked matrix uniformly by 128x128, so a kernel needs no special
case at the w1/w3 seam; passes that stack separately-blocked w1 and w3 pad I up to a multiple of
128 with zero rows/columns (silu(0) * 0 = 0: exact).

The CPU body is the reference math (the compiled model's semantics, run eagerly by tests and
--verify-each-pass): tokens sorted by expert (stable argsort of the flattened ids), per-expert
segments from bincount + cumsum, one GEMM pair per non-empty segment (torch._grouped_mm when the
CPU build has it and the strides allow it, else a Python loop), then a weighted index_add in fp32.
The CUDA kernels (kernels/moe.py) plug in through register_kernel with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3_export.ops.fp8 import check_fp8_weight, fp8_matmul


def _check_routing(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, op: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{op}: x must be [T, D], got {tuple(x.shape)}")
    torch._check(topk_ids.dtype == torch.int64, lambda: f"{op}: topk_ids must be int64, got {topk_ids.dtype}")
    torch._check(topk_weights.dim() == 2 and topk_ids.dim() == 2,
                 lambda: f"{op}: topk_weights/topk_ids must be [T, k], got {tuple(topk_weights.shape)} "
                         f"and {tuple(topk_ids.shape)}")
    torch._check(topk_weights.shape[1] == topk_ids.shape[1],
                 lambda: f"{op}: topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} differ")


def _check_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, op: str) -> None:
    torch._check(w13.dim() == 3 and w2.dim() == 3,
                 lambda: f"{op}: w13 must be [E, 2I, D] and w2 [E, D, I], got {tuple(w13.shape)}, {tuple(w2.shape)}")
    e, two_i, d = w13.shape
    torch._check(tuple(w2.shape) == (e, d, two_i // 2) and two_i % 2 == 0,
                 lambda: f"{op}: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} are not [E, 2I, D] / [E, D, I]")
    torch._check(x.shape[1] == d, lambda: f"{op}: x [T, {x.shape[1]}] does not match w13 {tuple(w13.shape)}")


def sort_by_expert(topk_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (order [T*k]: flat assignment ids grouped by expert, ends [E]: segment ends)."""
    flat = topk_ids.flatten()  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k]
    counts = torch.bincount(flat, minlength=n_experts)  # [E]
    return order, torch.cumsum(counts, dim=0)


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm on CPU needs 16-byte aligned strides; fall back to the loop otherwise."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype or a.dtype not in (torch.float32, torch.bfloat16):
        return False
    return all((s * a.element_size()) % 16 == 0 for s in (*a.stride()[:-1], *b.stride()[:-1]))


def grouped_linear(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Segment g of a [M, K] (rows [ends[g-1], ends[g])) times w[g]^T ([E, N, K]) -> [M, N]."""
    b = w.transpose(1, 2)  # [E, K, N]
    if _grouped_mm_ok(a, b):
        return torch._grouped_mm(a, b, offs=ends.to(torch.int32))
    out = a.new_empty(a.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = F.linear(a[start:end], w[g])
        start = end
    return out


def _combine(x: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Scatter-add expert outputs rows [T*k, D] (sorted by expert) back to tokens, weighted, in fp32."""
    k = topk_weights.shape[1]
    weights = topk_weights.flatten()[order].to(torch.float32)  # [T*k]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    y.index_add_(0, order // k, rows.to(torch.float32) * weights[:, None])  # [T, D]
    return y.to(x.dtype)


@torch.library.custom_op("dsv3::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    _check_routing(x, topk_weights, topk_ids, "dsv3::moe_experts")
    _check_experts(x, w13, w2, "dsv3::moe_experts")
    order, ends = sort_by_expert(topk_ids, w13.shape[0])
    xs = x[order // topk_ids.shape[1]]  # [T*k, D], grouped by expert
    gate, up = grouped_linear(xs, w13.to(x.dtype), ends).chunk(2, dim=-1)  # [T*k, I] each
    rows = grouped_linear(F.silu(gate) * up, w2.to(x.dtype), ends)  # [T*k, D]
    return _combine(x, rows, order, topk_weights)


@moe_experts.register_fake
def _(x, topk_weights, topk_ids, w13, w2):
    _check_routing(x, topk_weights, topk_ids, "dsv3::moe_experts")
    _check_experts(x, w13, w2, "dsv3::moe_experts")
    return x.new_empty(x.shape)


def _check_fp8_experts(x, w13, w13_scale, w2, w2_scale) -> None:
    op = "dsv3::moe_experts_fp8"
    _check_experts(x, w13, w2, op)
    check_fp8_weight(w13, w13_scale, f"{op} w13")
    check_fp8_weight(w2, w2_scale, f"{op} w2")


@torch.library.custom_op("dsv3::moe_experts_fp8", mutates_args=())
def moe_experts_fp8(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                    act_quant: bool) -> torch.Tensor:
    _check_routing(x, topk_weights, topk_ids, "dsv3::moe_experts_fp8")
    _check_fp8_experts(x, w13, w13_scale, w2, w2_scale)
    order, ends = sort_by_expert(topk_ids, w13.shape[0])
    xs = x[order // topk_ids.shape[1]]  # [T*k, D], grouped by expert
    rows = x.new_empty(xs.shape)  # [T*k, D]
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            gate, up = fp8_matmul(xs[start:end], w13[e], w13_scale[e], act_quant).chunk(2, dim=-1)  # [n, I]
            rows[start:end] = fp8_matmul(F.silu(gate) * up, w2[e], w2_scale[e], act_quant)  # [n, D]
        start = end
    return _combine(x, rows, order, topk_weights)


@moe_experts_fp8.register_fake
def _(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, act_quant):
    _check_routing(x, topk_weights, topk_ids, "dsv3::moe_experts_fp8")
    _check_fp8_experts(x, w13, w13_scale, w2, w2_scale)
    return x.new_empty(x.shape)
