"""The MoE's triton_ops: dsv3::moe_experts / moe_experts_fp8 as kernels/moe.py's alignment and grouped GEMMs.

    dsv3_aoti::moe_experts            moe_align + 2 grouped GEMMs (SwiGLU and routing-weight epilogues), bf16/fp16
    dsv3_aoti::moe_experts_fp8        the same with 1x128 act_quant of x and of h (W8A8)
    dsv3_aoti::moe_experts_fp8_quantized  the fp8 form from act_quant(x) computed by the caller (the decode
                                          program's split gate kernel, engines/torch_router.py)

engines/torch_triton.py triton_lowerings maps the dsv3:: ops here; the switches below are read when a program
is lowered (traced), so each package holds one form.
"""

from __future__ import annotations

import os

import torch
import triton
from torch.library import triton_op

from dsv3_export.engines import torch_launch
from dsv3_export.engines.torch_decode_gemv import gated
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels import moe as km
from dsv3_export.kernels.moe_align import align_gate

# moe_align's traced form in the packages (kernels/moe.py TRACED_ALIGN_FORMS), read when a program is
# lowered: `kernel` (default: one launch per MoE layer) or `aten` (Inductor's kernels for the ATen
# form). Measured on the H200 (4-layer 16b fp8 decode program): CUDA-graph step 0.708 ms with the
# kernel vs 0.739 ms aten, 1.05 vs 1.84 ms without a graph; per call 9.3 us vs 61 us (kernels.py).
MOE_ALIGN_ENV = "DSV3_TORCH_MOE_ALIGN"
MOE_ALIGN_DEFAULT = "kernel"
MOE_ALIGN_FORMS = {"kernel": "the Triton kernels (one program, or at block_m >= 64 three launches in parallel)",
                   "single": "the one-program Triton kernel at every block_m (the form before session 33)",
                   "aten": "Inductor's kernels for the ATen form"}


# The MoE's one-token direct mode (kernels/moe.py grouped_gemm_spec): `1` (default) at T = 1 the grouped
# GEMMs take each assignment's expert from topk_ids and moe_align's launch has an empty grid
# (kernels/moe_align.py align_gate), from the same program that aligns at T >= 2; `0` aligns at every T.
# Read when a program is lowered. Measured on the H200 (session 15, 27-layer 16b fp8 decode): 26 launches
# and ~115 us of moe_align fewer per batch-1 step; step 2.542-2.673 ms (3 builds) against 2.718 (1 build),
# within the build-to-build spread; batch 8 unchanged (4.496-4.543 against 4.516).
MOE_DIRECT_ENV = "DSV3_TORCH_MOE_DIRECT"


def moe_direct_on() -> bool:
    return env_choice(MOE_DIRECT_ENV, "1", {"1": "one token: no moe_align, experts from topk_ids",
                                            "0": "moe_align at every batch"}) == "1"


# The one-token grouped GEMMs' own configs (opt-in; session 22's H200 sweep found the batch-64 picks
# also the fastest at one token), read when a program is lowered:
# "up=BLOCK_N:WARPS:STAGES,down=BLOCK_N:WARPS:STAGES" (either may be left out; default none). Why: AOTInductor
# tunes the decode program once, at batch 64, where the grouped GEMMs run aligned; at batch 1 they run in direct
# mode (MOE_DIRECT_ENV) with the configs picked there (BLOCK_N 32 s5 up, 64 s4 down in 19 of the 20 16b builds of
# sessions 19-21), 658 us per step against a ~431 us weight-read floor. With a config here, a GEMM is two launches
# gated by the batch: the tuned kernel at T >= 2, the pinned one at T = 1 (an empty grid launches nothing). The same
# bits: BLOCK_N only splits the columns among programs (each output's K sum is the same).
MOE_DIRECT_CONFIGS_ENV = "DSV3_TORCH_MOE_DIRECT_CONFIGS"


def moe_direct_configs() -> dict[str, triton.Config]:
    """MOE_DIRECT_CONFIGS_ENV parsed: {"up" and/or "down": config}; a malformed value names the variable."""
    text = os.environ.get(MOE_DIRECT_CONFIGS_ENV, "").strip()
    configs: dict[str, triton.Config] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        gemm, _, spec = item.partition("=")
        numbers = spec.split(":")
        if gemm not in ("up", "down") or gemm in configs or len(numbers) != 3 or not all(n.isdigit() for n in numbers):
            raise ValueError(f"{MOE_DIRECT_CONFIGS_ENV}={text!r}: expected up=BLOCK_N:WARPS:STAGES and/or "
                             f"down=BLOCK_N:WARPS:STAGES, comma-separated (e.g. up=32:4:5,down=64:4:4)")
        block_n, warps, stages = map(int, numbers)
        if block_n < 16 or block_n & (block_n - 1) or warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 8:
            raise ValueError(f"{MOE_DIRECT_CONFIGS_ENV}: {item!r}: BLOCK_N must be a power of 2 >= 16, WARPS one of "
                             f"1, 2, 4, 8, 16 and STAGES in 1..8")
        configs[gemm] = triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    return configs


def _moe_routing(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """moe_align's (sorted_ids, expert_ids, npp) in the MOE_ALIGN_ENV form, and the grouped GEMMs'
    direct_ids: with MOE_DIRECT_ENV on, the contiguous topk_ids, and the alignment launches nothing
    at one token."""
    form = env_choice(MOE_ALIGN_ENV, MOE_ALIGN_DEFAULT, MOE_ALIGN_FORMS)
    return km.moe_routing(topk_ids, n_experts, block_m, moe_direct_on(), traced_form="aten" if form == "aten" else
                          "kernel", parallel=False if form == "single" else None)


def _grouped_gemm(a, w, routing, topk: int, out_dtype: torch.dtype, *, a_scale=None,
                  w_scale=None, topk_weights=None, swiglu: bool = False):
    """kernels/moe.py grouped_gemm's launch (checks done once by the caller's shapes); routing is
    _moe_routing's."""
    t = a.shape[0]
    n_out = w.shape[1] // 2 if swiglu else w.shape[1]
    out = torch.empty((t * topk, n_out), dtype=out_dtype, device=a.device)
    (sorted_ids, expert_ids, npp), direct_ids = routing
    spec = km.grouped_gemm_spec(a, a_scale, w, w_scale, out, topk_weights, sorted_ids, expert_ids, npp, topk, swiglu,
                                direct_ids)
    pinned = moe_direct_configs().get("up" if swiglu else "down") if direct_ids is not None else None
    if pinned is None:
        torch_launch.launch_spec(spec)
        return out
    aligned = align_gate(direct_ids.shape[0])  # 1 from two tokens on, 0 at one (MOE_DIRECT_CONFIGS_ENV)
    torch_launch.launch_spec(gated(spec, aligned))
    torch_launch.launch_spec(gated(km.grouped_gemm_pinned(spec, pinned), 1 - aligned))
    return out


# The MoE's combine (the k routed + shared slots of each token summed), read when a program is lowered: `adds`
# (default since session 19) the fp32 sum as k - 1 unrolled adds in slot order, pointwise in D, which Inductor
# fuses into the next residual add + RMSNorm kernel; `sum` one fp32 reduction over the slots, which Inductor
# emits as its own kernel (1.15 us per MoE layer in the 16b batch-1 profile). On the H200 (27-layer 16b fp8
# decode, with DSV3_TORCH_GATE_SPLIT and DSV3_TORCH_MERGE_UV: benchmarks/RESULTS.md session 19) the three took
# 79 launches off the batch-1 step. Prefill programs take the same form (not timed there).
MOE_COMBINE_ENV = "DSV3_TORCH_MOE_COMBINE"


def _combine(y: torch.Tensor, t: int, topk: int, dtype: torch.dtype) -> torch.Tensor:
    """y [T*k, D] in (token, slot) order -> [T, D]: the slots summed in fp32, cast to dtype."""
    y3 = y.view(t, topk, -1)
    form = env_choice(MOE_COMBINE_ENV, "adds", {"sum": "one fp32 reduction over the slots (its own kernel)",
                                               "adds": "unrolled fp32 adds in slot order (pointwise: fusable)"})
    if form == "sum":
        return y3.sum(dim=1, dtype=torch.float32).to(dtype)  # [T, D]
    acc = y3[:, 0].float()
    for slot in range(1, topk):  # topk: static (the op's top-k plus the shared experts' slots)
        acc = acc + y3[:, slot].float()
    return acc.to(dtype)  # [T, D]


@triton_op("dsv3_aoti::moe_experts", mutates_args={})
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, block_m: int) -> torch.Tensor:
    """The bf16/fp16 experts: moe_align, up GEMM with SwiGLU, down GEMM with the routing weights, sum
    over k -> [T, D]."""
    t, topk = topk_ids.shape
    routing = _moe_routing(topk_ids, w13.shape[0], block_m)
    x = x.contiguous()
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    h = _grouped_gemm(x, w13, routing, topk, x.dtype, swiglu=True)  # [T*k, I]
    y = _grouped_gemm(h, w2, routing, 1, x.dtype,
                      topk_weights=topk_weights.contiguous())  # [T*k, D]
    return _combine(y, t, topk, x.dtype)


@triton_op("dsv3_aoti::moe_experts_fp8", mutates_args={})
def moe_experts_fp8(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, block_m: int) -> torch.Tensor:
    """The W8A8 experts: moe_align, act_quant of x (1x128), up GEMM with SwiGLU, act_quant of h, down
    GEMM with the routing weights, sum over k -> [T, D]."""
    xq, xs = torch_launch.act_quant_launch(x.contiguous())
    return _moe_fp8(x, xq, xs, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, block_m)


@triton_op("dsv3_aoti::moe_experts_fp8_quantized", mutates_args={})
def moe_experts_fp8_quantized(x: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, topk_weights: torch.Tensor,
                              topk_ids: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                              w2_scale: torch.Tensor, block_m: int) -> torch.Tensor:
    """moe_experts_fp8 with act_quant(x) = (xq, xs) already computed (engines/torch_router.py: by the split
    gate kernel, from the same x); x gives the output dtype."""
    return _moe_fp8(x, xq, xs, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, block_m)


def _moe_fp8(x, xq, xs, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, block_m: int) -> torch.Tensor:
    """The W8A8 experts from act_quant(x): up GEMM with SwiGLU, act_quant of h, down GEMM, combine."""
    t, topk = topk_ids.shape
    routing = _moe_routing(topk_ids, w13.shape[0], block_m)
    h = _grouped_gemm(xq, w13, routing, topk, x.dtype, a_scale=xs, w_scale=w13_scale,
                      swiglu=True)  # [T*k, I]
    hq, hs = torch_launch.act_quant_launch(h)
    y = _grouped_gemm(hq, w2, routing, 1, x.dtype, a_scale=hs, w_scale=w2_scale,
                      topk_weights=topk_weights.contiguous())  # [T*k, D]
    return _combine(y, t, topk, x.dtype)

