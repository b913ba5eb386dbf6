"""Feed-forward layers: dense SwiGLU MLP, the router (Gate) and the Mixture of Experts.

MoE has two formulations of the same function:
  forward_loop    DeepSeek's per-expert loop (bincount(...).tolist(), `if count == 0`): only the
                  routed tokens go through each expert. Fast in eager mode; torch.export rejects it.
  forward_static  shape-static: every expert runs on every token and is weighted by a dense
                  [T, E] routing matrix that is zero off the top-k. Exports; the compiler's
                  rewrite_moe_grouped_gemm pass turns it back into sparse grouped GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.layers import Linear

MOE_IMPLS = ("loop", "static")


class MLP(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense FFN, each routed expert and the shared experts."""

    def __init__(self, dim: int, inter_dim: int, *, fp8: bool = False, dtype: torch.dtype = torch.float32,
                 block_size: int = 128):
        super().__init__()
        lin = dict(fp8=fp8, dtype=dtype, block_size=block_size)
        self.w1 = Linear(dim, inter_dim, **lin)
        self.w2 = Linear(inter_dim, dim, **lin)
        self.w3 = Linear(dim, inter_dim, **lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router: scores -> (optional bias, group-limited) top-k -> weights from the unbiased scores."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=dtype), requires_grad=False)
        if args.has_gate_bias:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, dim] -> weights [T, k] (x.dtype), expert indices [T, k] (int64)."""
        scores = F.linear(x, self.weight)  # [T, E]
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1, dtype=torch.float32)
        else:
            scores = scores.float().sigmoid()
        original_scores = scores
        if self.bias is not None:
            scores = scores + self.bias
        if self.n_groups > 1:
            grouped = scores.view(x.size(0), self.n_groups, -1)  # [T, G, E/G]
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]  # [T, topk_groups]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter(1, keep, False)  # [T, G]
            scores = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)  # [T, E]
        indices = torch.topk(scores, self.topk, dim=-1)[1]  # [T, k]
        weights = original_scores.gather(1, indices)  # [T, k]
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.route_scale
        return weights.type_as(x), indices


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32, moe_impl: str = "loop"):
        super().__init__()
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={moe_impl!r} is not one of {MOE_IMPLS}")
        self.dim = args.dim
        self.n_routed_experts = args.n_routed_experts
        self.moe_impl = moe_impl
        mlp = dict(fp8=args.dtype == "fp8", dtype=dtype, block_size=args.block_size)
        self.gate = Gate(args, dtype)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim, **mlp) for _ in range(args.n_routed_experts))
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, **mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)  # [T, dim]
        routed = self.forward_loop(x) if self.moe_impl == "loop" else self.forward_static(x)
        return (routed + self.shared_experts(x)).view(shape)

    def forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.gate(x)  # [T, k]
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts).tolist()
        for i, expert in enumerate(self.experts):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += expert(x[idx]) * weights[idx, top, None]
        return y

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.gate(x)  # [T, k]
        routing = torch.zeros(x.size(0), self.n_routed_experts, dtype=x.dtype, device=x.device)
        routing = routing.scatter(1, indices, weights)  # [T, E], zero off the top-k
        y = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            y = y + expert(x) * routing[:, i, None]
        return y
