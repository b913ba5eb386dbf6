"""Pure-torch references of kernels/moe.py (re-exported there): per-expert fp32 loops over the
experts that are used, one dense expert weight at a time (memory linear in the assignments)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3_export.reference import fp8 as fp8_ref


def _dense_expert(w: torch.Tensor, s: torch.Tensor | None, e: int) -> torch.Tensor:
    """Expert e of [E, N, K] (+ scales) -> fp32 [N, K]."""
    return w[e].float() if s is None else fp8_ref.weight_dequant(w[e], s[e], torch.float32)


def grouped_gemm_ref(a: torch.Tensor, w: torch.Tensor, topk_ids: torch.Tensor, topk: int, *,
                     a_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                     topk_weights: torch.Tensor | None = None, fuse_swiglu: bool = False,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row i of the output = f(a[i // topk] @ w[topk_ids.flatten()[i]]^T), fp32 math.

    A loop over the experts that are used, one fp32 expert weight at a time: memory
    O(T*topk*max(N, K) + N*K). (Gathering w[topk_ids] instead materializes a [T*topk, N, K]
    tensor: 528 GiB at T=4096, top-6, N=2816, K=2048, the OOM of the first H200 run.)
    """
    a_f = fp8_ref.act_dequant(a, a_scale) if a_scale is not None else a.float()
    experts = topk_ids.reshape(-1).long()  # [T*topk]
    y = torch.zeros((experts.numel(), w.shape[1]), dtype=torch.float32, device=a.device)  # [T*topk, N]
    for e in torch.unique(experts).tolist():
        rows = torch.nonzero(experts == e).squeeze(1)  # assignment ids routed to e
        y[rows] = a_f[rows // topk] @ _dense_expert(w, w_scale, e).T  # [n_e, N]
    if fuse_swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if topk_weights is not None:
        y = y * topk_weights.reshape(-1, 1).float()
    return y.to(out_dtype)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, act_quant: bool = True) -> torch.Tensor:
    """Per-expert loop in fp32; with fp8 weights and act_quant the activations are quantized where the kernel does."""
    fp8 = w13_scale is not None and act_quant
    inter = w13.shape[1] // 2
    xf = fp8_ref.act_dequant(*fp8_ref.act_quant(x)) if fp8 else x.float()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        gu = xf[tok] @ _dense_expert(w13, w13_scale, e).T  # [n_e, 2I]
        h = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)  # the kernel stores h in x.dtype
        hf = fp8_ref.act_dequant(*fp8_ref.act_quant(h)) if fp8 else h.float()
        y.index_add_(0, tok, (hf @ _dense_expert(w2, w2_scale, e).T) * topk_weights[tok, slot, None].float())
    return y.to(x.dtype)
