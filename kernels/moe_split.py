"""Split-K for the MoE's one-token grouped GEMMs (direct mode): the planes rule, the SwiGLU reduce, the flow.

Why: at T = 1 the 16b model's MoE is 8 assignments (6 routed + 2 shared experts), each a GEMV over
its expert's weight, and the grouped GEMMs' grids are 8 x ceil(N / BLOCK_N) programs: 176 for the up
GEMM and 256 for the down GEMM at BLOCK_N = 64, under a wave of the H200's 132 SMs. Nsight Compute
(session 12) found them at 0.33-0.53 waves and 45-60% of DRAM peak, its first rule "grid too small",
with the K loops' (16 and 11 steps) pipeline fill and drain exposed. Cutting K over a third grid
axis multiplies the programs by split_k and moves the same weight bytes.

The products then have to be summed before what needs whole sums:
  up (SwiGLU): the GEMM writes the raw [gate | up] fp32 partials, plane s for K chunk s, and
      _swiglu_partials_kernel sums the planes in order, applies SwiGLU, rounds to the activation
      dtype as the GEMM's epilogue does, and (W8A8) quantizes 1x128 with act_quant's arithmetic: it
      takes the place of the act_quant launch of h, so the step has no extra launch.
  down (x routing weight): plane s takes K chunk s's product x the weight; the combine's sum over
      the top-k slots (an Inductor kernel in the packages) sums over the planes too.
One program serves every batch: above one token the planes are 1 (split_planes, symbolic while
traced, no guard), the GEMMs take the aligned path with its whole K loop, the up GEMM's SwiGLU
epilogue writes h and act_quant quantizes it, and the reduce kernel's grid is empty (kernels/_common.py
gated); at one token the reverse. The down GEMM's output is fp32 at every batch (one plane above one
token), where the unsplit flow rounds each slot's product to the activation dtype before the sum.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import QUANT_BLOCK, LaunchSpec, cdiv, gated
from dsv3_export.kernels import fp8_quant as kq
from dsv3_export.kernels.fp8_quant import quantize_rows
from dsv3_export.kernels.moe import grouped_gemm_spec
from dsv3_export.kernels.moe_align import align_gate
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

# One config, no autotuner: in the decode package this kernel's grid is empty at the batch the program is
# tuned at (64), where an autotuner would time its configs on nothing. A row per program, 128 columns
# (the quantization block): the 16b step's 8 rows x 11 blocks are 88 programs of 4 x S KB.
SWIGLU_PARTIALS_CONFIGS = [triton.Config({"BLOCK_M": 1}, num_warps=1, num_stages=1)]


def split_planes(n_tokens, split_k: int):
    """Partial planes of a split-K flow: split_k at one token, 1 above (no split), 1 + (split_k - 1) x
    (1 - align_gate(T)): a symbolic expression of the batch while traced, no guard."""
    return 1 + (split_k - 1) * (1 - align_gate(n_tokens))


@waits_for_producer
@triton.jit
def _swiglu_partials_kernel(
    p_ptr, h_ptr, q_ptr, s_ptr,
    ROWS, N_OUT,
    stride_pk, stride_pm, stride_hm, stride_qm, stride_sm,
    PLANES: tl.constexpr, QUANT: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """h = silu(gate) * up of the summed planes p [PLANES, ROWS, 2 x N_OUT] (gate | up), rounded to h's
    dtype; QUANT: q, s = act_quant(h) (1x128, BLOCK_N = 128) and h is not written."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < ROWS) & (offs_n[None, :] < N_OUT)
    rows = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
    gate = tl.load(rows, mask=mask, other=0.0)
    up = tl.load(rows + N_OUT, mask=mask, other=0.0)
    for s in tl.static_range(1, PLANES):  # plane order: the same sum on every run
        gate += tl.load(rows + s * stride_pk, mask=mask, other=0.0)
        up += tl.load(rows + s * stride_pk + N_OUT, mask=mask, other=0.0)
    h = (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty)  # the GEMM epilogue's rounding
    if QUANT:
        q, s = quantize_rows(h.to(tl.float32), SCALE_RECIPROCAL)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_n[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + offs_m * stride_sm + tl.program_id(1), s, mask=offs_m < ROWS)
    else:
        tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :], h, mask=mask)


def swiglu_partials_spec(parts: torch.Tensor, planes: int, h: torch.Tensor, q: torch.Tensor | None = None,
                         s: torch.Tensor | None = None, scale_reciprocal: bool = True) -> LaunchSpec:
    """The reduce of parts' first `planes` planes ([>= planes, R, 2 x N] fp32) into h [R, N], or, with
    q and s, into act_quant(h): q fp8 [R, N], s fp32 [R, ceil(N/128)] (scale_reciprocal: act_quant's
    scale rounding, True as torch's on CUDA)."""
    rows, n_out = h.shape
    quant = q is not None
    grid = lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(n_out, QUANT_BLOCK))  # noqa: E731
    args = (parts, h, q if quant else h, s if quant else parts, rows, n_out, parts.stride(0), parts.stride(1),
            h.stride(0), q.stride(0) if quant else 0, s.stride(0) if quant else 0)
    kwargs = dict(PLANES=planes, QUANT=quant, SCALE_RECIPROCAL=scale_reciprocal, BLOCK_N=QUANT_BLOCK)
    return LaunchSpec(_swiglu_partials_kernel, None, SWIGLU_PARTIALS_CONFIGS, grid, args, kwargs)


def swiglu_partials_ref(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """parts [S, R, 2N] fp32 -> silu(gate) * up of the plane sum, in dtype."""
    gate, up = parts.sum(dim=0).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(dtype)


def combine_planes(y: torch.Tensor, n_tokens, topk: int, dtype: torch.dtype) -> torch.Tensor:
    """The down GEMM's fp32 planes [S, T*k, D] summed over the planes and the k slots -> [T, D] in dtype."""
    return y.view(y.shape[0], n_tokens, topk, y.shape[-1]).sum(dim=(0, 2), dtype=torch.float32).to(dtype)


def split_experts(run: Callable[[LaunchSpec | None], None], x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, routing, topk: int, split_k: int | tuple[int, int], *,
                  w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  act_quant: bool = True) -> torch.Tensor:
    """The experts with the one-token split-K -> [T, D] in x.dtype; the launches go through `run` (the
    eager launcher, or a lowering's wrap_triton launch), so fused_moe and the packages run the same flow.

    x [T, D] contiguous; w13 [E, 2I, D], w2 [E, D, I] (bf16/fp16, or fp8 with the scales: act_quant=True
    quantizes the activations 1x128, W8A8; False keeps them in x.dtype, W8A16); routing is
    kernels/moe.py moe_routing's for direct=True (its direct_ids are required); topk_weights [T, k]
    contiguous. split_k: K chunks of both GEMMs at one token, or (up, down).
    """
    (sorted_ids, expert_ids, npp), direct_ids = routing
    if direct_ids is None:
        raise ValueError("split_experts: the split-K runs in the direct mode only; routing has no direct_ids")
    t = x.shape[0]
    rows, inter, dim = t * topk, w13.shape[1] // 2, w2.shape[1]
    split_up, split_down = (split_k, split_k) if isinstance(split_k, int) else split_k
    one_token, aligned = 1 - align_gate(t), align_gate(t)
    fp8 = w13_scale is not None and act_quant
    rec = x.is_cuda  # act_quant's scale rounding as torch's on x's device
    dev = x.device
    a, a_s = x, None
    if fp8:
        a, a_s = kq.act_quant_outputs(t, x.shape[1], dev)
        run(kq.act_quant_spec(x, a, a_s, rec))
    h = torch.empty((rows, inter), dtype=x.dtype, device=dev)  # the aligned path's SwiGLU output
    parts = torch.empty((split_planes(t, split_up), rows, 2 * inter), dtype=torch.float32, device=dev)
    run(grouped_gemm_spec(a, a_s, w13, w13_scale, h, None, sorted_ids, expert_ids, npp, topk, True, direct_ids,
                          parts))
    if fp8:
        hq, hs = kq.act_quant_outputs(rows, inter, dev)
        run(gated(kq.act_quant_spec(h, hq, hs, rec), aligned))
        run(gated(swiglu_partials_spec(parts, split_up, h, hq, hs, rec), one_token))
        a, a_s = hq, hs
    else:
        run(gated(swiglu_partials_spec(parts, split_up, h), one_token))
        a, a_s = h, None
    y = torch.empty((split_planes(t, split_down), rows, dim), dtype=torch.float32, device=dev)
    run(grouped_gemm_spec(a, a_s, w2, w2_scale, y[0], topk_weights, sorted_ids, expert_ids, npp, 1, False,
                          direct_ids, y))
    return combine_planes(y, t, topk, x.dtype)
