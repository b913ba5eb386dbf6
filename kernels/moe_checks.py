"""Argument checks of kernels/moe.py's grouped GEMM launcher (grouped_gemm).

Why a module of its own: fn names the caller in every error, and the checks are most of the lines
that are not kernel code. Sizes are compared only with sizes of the same call, so the checks also
hold for the traced lowerings that build the launches themselves.
"""

from __future__ import annotations

import torch

from dsv3_export.kernels._common import FP8_DTYPE, QUANT_BLOCK, cdiv, check_tensor

DENSE_DTYPES = (torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_operands(fn: str, a: torch.Tensor, w: torch.Tensor, topk: int, a_scale: torch.Tensor | None,
                   w_scale: torch.Tensor | None, topk_weights: torch.Tensor | None, fuse_swiglu: bool,
                   out_dtype: torch.dtype | None) -> tuple[int, torch.dtype]:
    """grouped_gemm's operand checks -> (output columns, output dtype)."""
    check_tensor(f"{fn}: a", a, dtypes=DENSE_DTYPES + (FP8_DTYPE,), ndim=2)
    dev = a.device
    check_tensor(f"{fn}: w", w, dtypes=DENSE_DTYPES + (FP8_DTYPE,), ndim=3, device=dev)
    a_fp8, w_fp8 = a.dtype == FP8_DTYPE, w.dtype == FP8_DTYPE
    if a_fp8 and not w_fp8 or not w_fp8 and w.dtype != a.dtype:
        raise TypeError(f"{fn}: a {a.dtype} with w {w.dtype} is not a supported pair "
                        "(same dense dtype, fp8 x fp8, or dense a x fp8 w)")
    t, k = a.shape
    e, n, kw = w.shape
    if kw != k:
        raise ValueError(f"{fn}: a is [T, K={k}] but w is [E, N, K={kw}]")
    if topk < 1:
        raise ValueError(f"{fn}: topk={topk} must be >= 1")
    if fuse_swiglu and n % 2:
        raise ValueError(f"{fn}: fuse_swiglu needs w rows [gate; up] (even N), got N={n}")
    k_blocks = cdiv(k, QUANT_BLOCK)
    if w_fp8:
        if w_scale is None:
            raise ValueError(f"{fn}: fp8 w needs w_scale [E, ceil(N/128), ceil(K/128)]")
        check_tensor(f"{fn}: w_scale", w_scale, dtypes=(torch.float32,), ndim=3, device=dev)
        if tuple(w_scale.shape) != (e, cdiv(n, QUANT_BLOCK), k_blocks) or w_scale.stride(2) != 1:
            raise ValueError(f"{fn}: w_scale must be [E, ceil(N/128), ceil(K/128)] = "
                             f"{(e, cdiv(n, QUANT_BLOCK), k_blocks)}, got {tuple(w_scale.shape)}")
    elif w_scale is not None:
        raise ValueError(f"{fn}: w_scale is only for fp8 w; w is {w.dtype}")
    if a_fp8:
        if a_scale is None:
            raise ValueError(f"{fn}: fp8 a needs a_scale [T, ceil(K/128)]")
        check_tensor(f"{fn}: a_scale", a_scale, dtypes=(torch.float32,), ndim=2, device=dev)
        if tuple(a_scale.shape) != (t, k_blocks) or a_scale.stride(1) != 1:
            raise ValueError(f"{fn}: a_scale must be [T, ceil(K/128)] = {(t, k_blocks)} with unit last "
                             f"stride, got {tuple(a_scale.shape)} strides {a_scale.stride()}")
    elif a_scale is not None:
        raise ValueError(f"{fn}: a_scale is only for fp8 a; a is {a.dtype}")
    if a.stride(1) != 1 or w.stride(2) != 1:
        raise ValueError(f"{fn}: a and w need unit stride along K, got {a.stride()} and {w.stride()}")
    if topk_weights is not None:
        check_tensor(f"{fn}: topk_weights", topk_weights, device=dev, contiguous=True,
                     dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if topk_weights.numel() != t * topk:
            raise ValueError(f"{fn}: topk_weights has {topk_weights.numel()} entries, need T*topk={t * topk}")
    out_dtype = out_dtype or (torch.bfloat16 if a_fp8 else a.dtype)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{fn}: out_dtype {out_dtype} not supported; expected one of {OUT_DTYPES}")
    return (n // 2 if fuse_swiglu else n), out_dtype


def check_alignment(sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                    dev: torch.device) -> int:
    """moe_align's three outputs as grouped_gemm takes them -> the block_m their sizes imply."""
    check_tensor("grouped_gemm: sorted_token_ids", sorted_token_ids, dtypes=(torch.int32,), ndim=1, device=dev,
                 contiguous=True)
    check_tensor("grouped_gemm: expert_ids", expert_ids, dtypes=(torch.int32,), ndim=1, device=dev, contiguous=True)
    check_tensor("grouped_gemm: num_tokens_post_pad", num_tokens_post_pad, dtypes=(torch.int32,), ndim=1,
                 device=dev)
    if expert_ids.numel() == 0 or sorted_token_ids.numel() % expert_ids.numel():
        raise ValueError(f"grouped_gemm: sorted_token_ids ({sorted_token_ids.numel()}) must be expert_ids "
                         f"({expert_ids.numel()}) blocks of block_m rows; pass moe_align's outputs unchanged")
    block_m = sorted_token_ids.numel() // expert_ids.numel()
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"grouped_gemm: inferred block_m={block_m} must be a power of 2 >= 16")
    return block_m

