"""ModelArgs: the one frozen description of a DeepSeek-V3-architecture model.

Field names follow DeepSeek's `inference/model.py` and its `configs/config_*.json`, so those
files load with `ModelArgs.from_json` unchanged. Loading is strict: an unknown key is an error,
never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ATTN_IMPLS = ("absorb", "naive")
SCORE_FUNCS = ("softmax", "sigmoid")
WEIGHT_DTYPES = ("bf16", "fp8")


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model."""


@dataclass(frozen=True)
class ModelArgs:
    # sizes
    vocab_size: int = 102400
    dim: int = 2048  # hidden size
    inter_dim: int = 10944  # dense MLP intermediate size
    moe_inter_dim: int = 1408  # per-expert intermediate size
    n_layers: int = 27
    n_dense_layers: int = 1  # the first n layers use the dense MLP, the rest MoE
    n_heads: int = 16
    norm_eps: float = 1e-6  # RMSNorm epsilon
    # runtime (cache) sizes
    max_batch_size: int = 8  # rows of the KV cache
    max_seq_len: int = 4096 * 4  # positions of the KV cache; also switches YaRN on (> original_seq_len)
    # weights
    dtype: str = "bf16"  # Linear weight storage: "bf16" (dense) or "fp8" (e4m3 + 128x128 fp32 scales)
    block_size: int = 128  # fp8 scale block edge
    # moe
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6  # top-k
    n_expert_groups: int = 1
    n_limited_groups: int = 1  # groups kept before the top-k (group-limited routing)
    score_func: str = "softmax"  # "softmax" or "sigmoid"
    route_scale: float = 1.0
    gate_bias: bool | None = None  # routing bias (e_score_correction_bias); None: DeepSeek's rule, dim == 7168
    # mla
    q_lora_rank: int = 0  # 0: direct query projection wq; > 0: wq_a -> q_norm -> wq_b
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attn_impl: str = "absorb"  # "absorb" (latent cache) or "naive" (full K/V cache)
    # yarn
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.attn_impl not in ATTN_IMPLS:
            problems.append(f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
        if self.score_func not in SCORE_FUNCS:
            problems.append(f"score_func={self.score_func!r} is not one of {SCORE_FUNCS}")
        if self.dtype not in WEIGHT_DTYPES:
            problems.append(f"dtype={self.dtype!r} is not one of {WEIGHT_DTYPES}")
        if self.n_routed_experts % max(self.n_expert_groups, 1):
            problems.append(f"n_routed_experts={self.n_routed_experts} is not divisible by n_expert_groups={self.n_expert_groups}")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            problems.append(f"n_limited_groups={self.n_limited_groups} must be in [1, n_expert_groups={self.n_expert_groups}]")
        if self.n_activated_experts > self.n_routed_experts:
            problems.append(f"n_activated_experts={self.n_activated_experts} > n_routed_experts={self.n_routed_experts}")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            problems.append(f"n_dense_layers={self.n_dense_layers} must be in [0, n_layers={self.n_layers}]")
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "max_batch_size", "max_seq_len", "block_size"):
            if getattr(self, f) <= 0:
                problems.append(f"{f}={getattr(self, f)} must be positive")
        if problems:
            raise ConfigError("invalid ModelArgs: " + "; ".join(problems))

    # derived values ------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_cache_width(self) -> int:
        """Values cached per token and layer in absorb mode: normalized latent + roped key (576 for 16b)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def has_gate_bias(self) -> bool:
        return self.dim == 7168 if self.gate_bias is None else self.gate_bias

    @property
    def yarn_enabled(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 when YaRN is on (DeepSeek's MLA.__init__)."""
        scale = self.qk_head_dim**-0.5
        if self.yarn_enabled:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    # construction ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelArgs":
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CI on 2 cores, but every feature on: YaRN (max_seq_len > original),
    # mscale, a dense first layer, shared experts, and sizes that are not multiples of 128.
    "tiny": dict(
        vocab_size=1000, dim=192, inter_dim=328, moe_inter_dim=96, n_layers=3, n_dense_layers=1,
        n_heads=4, max_batch_size=4, max_seq_len=256, n_routed_experts=8, n_shared_experts=2,
        n_activated_experts=3, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, original_seq_len=128, rope_factor=4.0, mscale=0.707,
    ),
    # DeepSeek's configs/config_16B.json (DeepSeek-V2-Lite shapes) with mscale 0.707.
    "16b": dict(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
        n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mscale=0.707,
    ),
    # DeepSeek's configs/config_671B.json (DeepSeek-V3).
    "671b": dict(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
        n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1,
        n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
        score_func="sigmoid", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, dtype="fp8",
    ),
}
