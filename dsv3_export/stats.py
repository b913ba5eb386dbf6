"""Size arithmetic of a model configuration: parameters, active parameters, cache and weight bytes.

Counted on a meta-device model, so the numbers come from the same module tree that is compiled
(no second formula to drift) and a 671B configuration costs no memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dsv3_export.reference import ModelArgs, Transformer
from dsv3_export.reference.fp8 import scale_shape
from dsv3_export.reference.layers import Linear

# Modules never stored in fp8 (DeepSeek keeps them in bf16): checkpoint-name substrings.
HIGH_PRECISION_MODULES = ("embed", "gate", "norm", "head")


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    active_params_per_token: int  # excludes the embedding lookup, includes top-k routed experts
    routed_expert_params: int
    kv_values_per_token_absorbed: int  # all layers, latent + rope key
    kv_values_per_token_naive: int  # all layers, per-head K and V
    weight_bytes_bf16: int
    weight_bytes_fp8: int  # fp8 Linears + fp32 block scales, the rest bf16

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> tuple[int, int]:
        return self.kv_values_per_token_absorbed * bytes_per_value, self.kv_values_per_token_naive * bytes_per_value

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_bytes_per_token_bf16_absorbed"], d["kv_bytes_per_token_bf16_naive"] = self.kv_bytes_per_token(2)
        return d


def model_stats(args: ModelArgs) -> ModelStats:
    with torch.device("meta"):
        model = Transformer(args.replace(dtype="bf16", attn_impl="absorb"), dtype=torch.bfloat16)
    total = routed = fp8_bytes = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if ".experts." in name:
            routed += n
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or any(s in name for s in HIGH_PRECISION_MODULES):
            continue
        rows, cols = scale_shape(module.out_features, module.in_features, args.block_size)
        fp8_bytes += module.weight.numel() * (1 - 2) + rows * cols * 4  # 1 byte instead of 2, plus scales
    n_moe_layers = args.n_layers - args.n_dense_layers
    per_layer_routed = routed // n_moe_layers if n_moe_layers else 0
    inactive = n_moe_layers * per_layer_routed * (args.n_routed_experts - args.n_activated_experts) // max(args.n_routed_experts, 1)
    active = total - inactive - model.embed.weight.numel()
    return ModelStats(
        total_params=total,
        active_params_per_token=active,
        routed_expert_params=routed,
        kv_values_per_token_absorbed=args.n_layers * args.latent_cache_width,
        kv_values_per_token_naive=args.n_layers * args.n_heads * (args.qk_head_dim + args.v_head_dim),
        weight_bytes_bf16=total * 2,
        weight_bytes_fp8=total * 2 + fp8_bytes,
    )
