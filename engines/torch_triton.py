"""Our Triton kernels (kernels/) as `triton_op`s, so that AOTInductor embeds them in CUDA packages.

Why a second registration: the dsv3:: ops (dsv3_export/ops) are Python `custom_op`s whose CUDA
implementations are Python launchers; a package calling them needs Python at run time. A
`torch.library.triton_op` whose body launches kernels through `wrap_triton` is traced by
torch.export into the kernel calls themselves, and AOTInductor compiles those kernels into the
package (TOOLCHAIN.md: measured on the H200, loadable from C++ with no op registration).

Lowered here (engines/torch_lower.py uses these on CUDA, ATen math for the rest):
    dsv3::moe_experts      -> dsv3_aoti::moe_experts      moe_align + 2 grouped GEMMs (SwiGLU and
                                                          routing-weight epilogues), kernels/moe.py
    dsv3::moe_experts_fp8  -> dsv3_aoti::moe_experts_fp8  the same with 1x128 act_quant (act_quant=True
                             only; weight-only fp8 lowers to ATen: the kernel has no bf16 x fp8 path)
Not lowered to a kernel: dsv3::mla_attention. kernels/mla_attention.py attends over a cache
that already holds the new keys (DeepSeek's write-then-attend); the engine's step contract keeps
new keys out of the cache (the runtime writes them after the step), so its ATen math is compiled
by Inductor instead. dsv3::fp8_linear likewise (its split-K launcher prunes configs with a hook
wrap_triton does not support); both are listed in the manifest's `lowerings`.

block_m (rows per expert block) is fixed per program, not chosen from the token count, because
the count is symbolic when the package is traced: 16 for decode (few tokens per expert), 64 for
prefill.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
from torch.library import triton_op, wrap_triton

from dsv3_export.kernels import fp8_quant as kq
from dsv3_export.kernels import moe as km
from dsv3_export.kernels._common import FP8_DTYPE, QUANT_BLOCK, is_interpreted

BLOCK_M = {"decode": 16, "prefill": 64}


def _launch(kernel, tuned, configs, grid: Callable, args: tuple, kwargs: dict) -> None:
    """wrap_triton(autotuned kernel) on the GPU; the first config under the CPU interpreter."""
    if tuned is not None:
        wrap_triton(tuned)[grid](*args, **kwargs)
        return
    cfg = configs[0]
    meta = {**kwargs, **cfg.kwargs}
    wrap_triton(kernel)[grid(meta)](*args, **kwargs, **cfg.kwargs)


def _act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> fp8 [M, K], fp32 scales [M, ceil(K/128)] (kernels/fp8_quant.py)."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, triton.cdiv(k, QUANT_BLOCK)), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, QUANT_BLOCK))  # noqa: E731
    _launch(kq._act_quant_kernel, kq._act_quant_tuned, kq.ACT_QUANT_CONFIGS, grid,
            (x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0)), dict(BLOCK_K=QUANT_BLOCK))
    return q, s


def _grouped_gemm(a, w, sorted_ids, expert_ids, npp, topk: int, out_dtype: torch.dtype, *, a_scale=None,
                  w_scale=None, topk_weights=None, swiglu: bool = False) -> torch.Tensor:
    """kernels/moe.py grouped_gemm's launch (checks done once by the caller's shapes)."""
    t, k = a.shape
    n = w.shape[1]
    fp8 = a_scale is not None
    n_out = n // 2 if swiglu else n
    out = torch.empty((t * topk, n_out), dtype=out_dtype, device=a.device)
    dummy = out
    args = (a, a_scale if fp8 else dummy, w, w_scale if w_scale is not None else dummy, out,
            topk_weights if topk_weights is not None else dummy, sorted_ids, expert_ids, npp,
            n_out, k, t * topk, topk, n_out if swiglu else 0,
            a.stride(0), a_scale.stride(0) if fp8 else 0, w.stride(0), w.stride(1),
            w_scale.stride(0) if w_scale is not None else 0, w_scale.stride(1) if w_scale is not None else 0,
            out.stride(0))
    flags = ({"FP8": fp8} if "FP8" in km._grouped_gemm_kernel.arg_names  # one fp8 flag, or one per operand
             else {"W_FP8": w_scale is not None, "A_FP8": fp8})
    kwargs = dict(**flags, SWIGLU=swiglu, MUL_WEIGHT=topk_weights is not None,
                  UPCAST=is_interpreted(km._grouped_gemm_kernel) and not fp8, SCALE_BLOCK=QUANT_BLOCK,
                  BLOCK_M=sorted_ids.shape[0] // expert_ids.shape[0],
                  BLOCK_K=QUANT_BLOCK if w_scale is not None else km.DENSE_BLOCK_K)
    grid = lambda meta: (expert_ids.shape[0], triton.cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    _launch(km._grouped_gemm_kernel, km._grouped_gemm_tuned, km.GROUPED_GEMM_CONFIGS, grid, args, kwargs)
    return out


def _combine(y: torch.Tensor, t: int, topk: int, dtype: torch.dtype) -> torch.Tensor:
    return y.view(t, topk, -1).sum(dim=1, dtype=torch.float32).to(dtype)  # [T, D]


@triton_op("dsv3_aoti::moe_experts", mutates_args={})
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, block_m: int) -> torch.Tensor:
    t, topk = topk_ids.shape
    sorted_ids, expert_ids, npp = km.moe_align(topk_ids, w13.shape[0], block_m)
    x = x.contiguous()
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    h = _grouped_gemm(x, w13, sorted_ids, expert_ids, npp, topk, x.dtype, swiglu=True)  # [T*k, I]
    y = _grouped_gemm(h, w2, sorted_ids, expert_ids, npp, 1, x.dtype,
                      topk_weights=topk_weights.contiguous())  # [T*k, D]
    return _combine(y, t, topk, x.dtype)


@triton_op("dsv3_aoti::moe_experts_fp8", mutates_args={})
def moe_experts_fp8(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, block_m: int) -> torch.Tensor:
    t, topk = topk_ids.shape
    sorted_ids, expert_ids, npp = km.moe_align(topk_ids, w13.shape[0], block_m)
    xq, xs = _act_quant(x.contiguous())
    h = _grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, topk, x.dtype, a_scale=xs, w_scale=w13_scale,
                      swiglu=True)  # [T*k, I]
    hq, hs = _act_quant(h)
    y = _grouped_gemm(hq, w2, sorted_ids, expert_ids, npp, 1, x.dtype, a_scale=hs, w_scale=w2_scale,
                      topk_weights=topk_weights.contiguous())  # [T*k, D]
    return _combine(y, t, topk, x.dtype)


def triton_lowerings(kind: str) -> dict[str, Callable]:
    """dsv3:: op name -> function with the op's signature calling a triton_op (for run_decompositions)."""
    from dsv3_export.engines.torch_lower import ATEN_LOWERINGS

    block_m = BLOCK_M[kind]

    def lower_moe(x, topk_weights, topk_ids, w13, w2):
        if x.dtype not in km.DENSE_DTYPES:  # fp32 engines: the dense kernel takes bf16/fp16 only
            return ATEN_LOWERINGS["dsv3::moe_experts"](x, topk_weights, topk_ids, w13, w2)
        return moe_experts(x, topk_weights, topk_ids, w13, w2, block_m)

    def lower_moe_fp8(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, act_quant):
        if not act_quant:  # weight-only fp8: no kernel for bf16 activations x fp8 weights
            return ATEN_LOWERINGS["dsv3::moe_experts_fp8"](x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale,
                                                           act_quant)
        return moe_experts_fp8(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, block_m)

    return {"dsv3::moe_experts": lower_moe, "dsv3::moe_experts_fp8": lower_moe_fp8}
