"""The one-token fp8 MoE in one launch: up GEMM + SwiGLU, act_quant of h, down GEMM and the routing-weighted
sum over the slots, per (slot, 128-wide block of the expert's inter dim).

Why: at batch 1 the 16b decode step ran the MoE as up GEMM, act_quant(h), down GEMM (kernels/moe.py, direct
mode): ~28 us per MoE layer on the H200 against a 16.5 us weight-read floor, and sessions 12-22 found the gap in
the three launches' fixed costs and each GEMM's ramp, not in their instruction streams (benchmarks/RESULTS.md).
Here one grid does all of it and h never goes through memory.

Shapes (T = 1 token, k slots: the routed top-k plus the shared experts' slots, E experts, D model dim, I inter):
  xq [1, D] fp8, xs [1, ceil(D/128)] fp32      act_quant(x) (the split gate kernel computes it)
  w13 [E, 2I, D] fp8 ([gate; up] rows), w13_scale [E, ceil(2I/128), ceil(D/128)]
  w2 [E, D, I] fp8, w2_scale [E, ceil(D/128), ceil(I/128)]
  topk_ids, topk_weights [1, k]                the slots' experts and routing weights
  out [1, D] fp32, zeros on entry              sum over slots of weight * expert(x), by fp32 atomic adds

Program p = (slot p // IB, inter block p % IB), IB = ceil(I/128). Its K loop is the grouped GEMM's
(_expert_k_step: the same fp8 dots and block scales, row 0 of a 16-row tile real), giving h = silu(gate) * up
for its 128 columns, rounded to x's dtype as the grouped GEMM stores h. One program holds a whole 1x128
quantization block of h, so it quantizes h exactly as act_quant does (quantize_rows). The down GEMM's K is
I; this program holds one 128-wide K block of it, so it multiplies that block by w2[expert][:, block] for
every column tile of D and adds weight * partial into out with atomics.

Numerics against the three launches: the same fp8 operands and scales (h, its quantization and the up
GEMM bit for bit); the down GEMM's sum over K blocks and the sum over slots happen in fp32 atomics, where the
grouped GEMM rounded each slot's row to x's dtype before the fp32 combine. Atomics make the fp32 sum order,
and so the output's last bits, vary from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv, check_tensor, launch
from dsv3_export.kernels.fp8_quant import quantize_rows
from dsv3_export.kernels.moe import _expert_k_step
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.topk import round_to

# Rows of the dot tiles: mma needs 16; row 0 is the token.
TILE_ROWS = 16
# The first config is the one launched (a one-config autotuner: the decode program is tuned at batch 64, where
# this kernel launches nothing); the others are candidates for benchmarks/kbench/moe.py's sweep and the tests.
FUSED_CONFIGS = [
    triton.Config({"BLOCK_D": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_D": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_D": 256}, num_warps=16, num_stages=3),
    triton.Config({"BLOCK_D": 128}, num_warps=16, num_stages=3),
    triton.Config({"BLOCK_D": 256}, num_warps=16, num_stages=4),
]


@waits_for_producer
@triton.jit
def _moe_one_token_kernel(
    xq_ptr, xs_ptr, w13_ptr, w13s_ptr, w2_ptr, w2s_ptr, ids_ptr, tw_ptr, out_ptr, D, I,
    stride_w13e, stride_w13n, stride_w13se, stride_w13sn, stride_w2e, stride_w2n, stride_w2se, stride_w2sn,
    H_DTYPE: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Program pid: slot pid // cdiv(I, BLOCK_I), inter block pid % cdiv(I, BLOCK_I) (the module docstring)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid = tl.program_id(0)
    i_blocks = tl.cdiv(I, BLOCK_I)
    slot = pid // i_blocks
    ib = pid % i_blocks
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row0 = rows == 0
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I

    # up + SwiGLU: h [BLOCK_M, BLOCK_I], row 0 real (the grouped GEMM's K loop, BLOCK_K = BLOCK_I = 128)
    w_gate = w13_ptr + expert * stride_w13e + offs_i[None, :] * stride_w13n
    w_up = w13_ptr + expert * stride_w13e + (offs_i + I)[None, :] * stride_w13n
    s_gate = w13s_ptr + expert * stride_w13se + (offs_i // BLOCK_I) * stride_w13sn
    s_up = w13s_ptr + expert * stride_w13se + ((offs_i + I) // BLOCK_I) * stride_w13sn
    acc_g = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    for kb in range(0, tl.cdiv(D, BLOCK_I)):
        offs_k = kb * BLOCK_I + tl.arange(0, BLOCK_I)
        mask_k = offs_k < D
        a = tl.load(xq_ptr + rows[:, None] * 0 + offs_k[None, :], mask=row0[:, None] & mask_k[None, :], other=0.0)
        a_s = tl.load(xs_ptr + kb + rows * 0, mask=row0, other=0.0)
        acc_g = _expert_k_step(a, a_s, w_gate + offs_k[:, None], s_gate + kb, mask_k, mask_i, acc_g,
                               True, True, False)
        acc_u = _expert_k_step(a, a_s, w_up + offs_k[:, None], s_up + kb, mask_k, mask_i, acc_u,
                               True, True, False)
    h = round_to(acc_g * tl.sigmoid(acc_g) * acc_u, H_DTYPE).to(tl.float32)  # as the grouped GEMM stores h

    # act_quant of this 1x128 block of h (columns past I are 0: no effect on its amax)
    hq, hs = quantize_rows(h, SCALE_RECIPROCAL)  # [BLOCK_M, BLOCK_I] on the e4m3 grid, [BLOCK_M]
    hq = hq.to(xq_ptr.dtype.element_ty)
    weight = tl.load(tw_ptr + slot).to(tl.float32)

    # down: this K block of w2[expert] times h, for each column tile of D, weighted, added into out
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w_down = w2_ptr + expert * stride_w2e + offs_d[None, :] * stride_w2n + offs_i[:, None]
        s_down = w2s_ptr + expert * stride_w2se + (offs_d // BLOCK_I) * stride_w2sn + ib
        part = _expert_k_step(hq, hs, w_down, s_down, mask_i, mask_d,
                              tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), True, True, False)
        y = tl.sum(tl.where(row0[:, None], part, 0.0), axis=0) * weight  # [BLOCK_D]
        tl.atomic_add(out_ptr + offs_d, y, mask=mask_d, sem="relaxed")


_moe_one_token_single = autotune_or_single(_moe_one_token_kernel, FUSED_CONFIGS[:1], key=[])


def moe_one_token_spec(xq: torch.Tensor, xs: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                       w2: torch.Tensor, w2_scale: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       out: torch.Tensor, h_dtype: torch.dtype, scale_reciprocal: bool) -> LaunchSpec:
    """The launch into out [1, D] fp32 (zeros; inputs checked by the caller). topk_ids / topk_weights: contiguous.
    h_dtype: the dtype the grouped GEMM would store h in (x's). scale_reciprocal: act_quant's scale rounding
    (kernels/fp8_quant.py quantize_rows: torch's on CUDA). The grid's size is a product of static sizes, k x
    ceil(I/128): a traced caller gates it by the batch (engines/torch_decode_gemv.py gated)."""
    d, inter = w2.shape[1], w2.shape[2]
    grid = lambda meta: (topk_ids.shape[1] * cdiv(inter, QUANT_BLOCK),)  # noqa: E731
    args = (xq, xs, w13, w13_scale, w2, w2_scale, topk_ids, topk_weights, out, d, inter,
            w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1),
            w2.stride(0), w2.stride(1), w2_scale.stride(0), w2_scale.stride(1))
    kwargs = dict(H_DTYPE=_TL_DTYPES[h_dtype], SCALE_RECIPROCAL=scale_reciprocal, BLOCK_I=QUANT_BLOCK,
                  BLOCK_M=TILE_ROWS)
    return LaunchSpec(_moe_one_token_kernel, _moe_one_token_single, FUSED_CONFIGS, grid, args, kwargs)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def moe_one_token(xq: torch.Tensor, xs: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                  w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                  h_dtype: torch.dtype = torch.bfloat16, config: triton.Config | None = None) -> torch.Tensor:
    """One token's W8A8 experts from act_quant(x) = (xq, xs) -> fp32 [1, D] (kernels/moe.py fused_moe's math
    with act_quant=True, its output before the cast to x's dtype)."""
    check_tensor("moe_one_token: xq", xq, dtypes=(torch.float8_e4m3fn,), ndim=2, contiguous=True)
    dev = xq.device
    d = xq.shape[1]
    check_tensor("moe_one_token: xs", xs, dtypes=(torch.float32,), ndim=2, device=dev, contiguous=True)
    check_tensor("moe_one_token: w13", w13, dtypes=(torch.float8_e4m3fn,), ndim=3, device=dev)
    check_tensor("moe_one_token: w2", w2, dtypes=(torch.float8_e4m3fn,), ndim=3, device=dev)
    check_tensor("moe_one_token: topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2, device=dev,
                 contiguous=True)
    check_tensor("moe_one_token: topk_weights", topk_weights, ndim=2, device=dev, contiguous=True)
    e, two_i, _ = w13.shape
    inter = two_i // 2
    if xq.shape[0] != 1 or topk_ids.shape[0] != 1 or topk_ids.shape != topk_weights.shape:
        raise ValueError(f"moe_one_token: one token: xq {tuple(xq.shape)}, topk_ids {tuple(topk_ids.shape)} and "
                         f"topk_weights {tuple(topk_weights.shape)} must have one row (k columns each)")
    if tuple(xs.shape) != (1, cdiv(d, QUANT_BLOCK)):
        raise ValueError(f"moe_one_token: xs {tuple(xs.shape)} must be [1, {cdiv(d, QUANT_BLOCK)}]")
    if w13.shape[2] != d or two_i % 2 or tuple(w2.shape) != (e, d, inter):
        raise ValueError(f"moe_one_token: w13 {tuple(w13.shape)} must be [E, 2I, D={d}] and w2 {tuple(w2.shape)} "
                         f"[E, D, I]")
    for name, s, w in (("w13_scale", w13_scale, w13), ("w2_scale", w2_scale, w2)):
        want = (e, cdiv(w.shape[1], QUANT_BLOCK), cdiv(w.shape[2], QUANT_BLOCK))
        check_tensor(f"moe_one_token: {name}", s, dtypes=(torch.float32,), ndim=3, device=dev)
        if tuple(s.shape) != want:
            raise ValueError(f"moe_one_token: {name} {tuple(s.shape)} must be {want}")
    out = torch.zeros((1, d), dtype=torch.float32, device=dev)
    launch(*moe_one_token_spec(xq, xs, w13, w13_scale, w2, w2_scale, topk_ids, topk_weights, out, h_dtype,
                               dev.type == "cuda"), config)
    return out
