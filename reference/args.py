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


# Cache sizes bound so that a typo cannot ask for an absurd KV cache (the caches are
# max_batch_size x max_seq_len rows per layer, allocated up front): 1 << 20 positions is over six
# times DeepSeek-V3's 163840-token context, 4096 rows far above any decode batch we build.
MAX_SEQ_LEN = 1 << 20
MAX_BATCH_SIZE = 4096


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model.

    keys: the configuration keys at fault, so that a reader of another format (HF's config.json)
    can name its own key for them.
    """

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


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
        # Types first: the range and relation rules below compare numbers.
        problems = _type_problems(self) or _range_problems(self) + _relation_problems(self)
        if problems:
            raise ConfigError("invalid ModelArgs: " + "; ".join(m for _, m in problems),
                              keys=tuple(dict.fromkeys(k for k, _ in problems)))

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
        try:
            return cls(**values)
        except ConfigError as e:  # name the file, not just the key
            raise ConfigError(f"{source}: {e}", keys=e.keys) from None

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


# Inclusive lower bounds: zero (or less) of these makes no model or no cache.
_AT_LEAST: dict[str, int | float] = dict(
    vocab_size=1, dim=1, inter_dim=1, moe_inter_dim=1, n_layers=1, n_dense_layers=0, n_heads=1,
    max_batch_size=1, max_seq_len=1, block_size=1, n_routed_experts=0, n_shared_experts=0,
    n_activated_experts=0, n_expert_groups=1, n_limited_groups=1, q_lora_rank=0, kv_lora_rank=1,
    qk_nope_head_dim=1, qk_rope_head_dim=2, v_head_dim=1, original_seq_len=1,
    beta_fast=1, beta_slow=1,  # YaRN divides by the rotation counts
    rope_factor=1.0,  # YaRN divides frequencies by it and takes its log (DeepSeek: 40; HF refuses < 1)
)
# Exclusive lower bounds: an epsilon of 0 divides by zero on a zero row, a negative one gives NaN;
# YaRN divides by log(rope_theta).
_ABOVE: dict[str, float] = dict(norm_eps=0.0, route_scale=0.0, rope_theta=1.0)
_AT_MOST: dict[str, int] = dict(max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE)
_CHOICES: dict[str, tuple[str, ...]] = dict(attn_impl=ATTN_IMPLS, score_func=SCORE_FUNCS, dtype=WEIGHT_DTYPES)


def _type_problem(kind: str, value: Any) -> str | None:
    """Why value is not of the field's annotated kind (bool is no int here; a float takes an int)."""
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be an integer"
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "must be a finite number"
    if kind == "str":
        return None if isinstance(value, str) else "must be a string"
    return None if value is None or isinstance(value, bool) else "must be true, false or null"


def _type_problems(args: ModelArgs) -> list[tuple[str, str]]:
    problems = []
    for f in fields(args):
        value = getattr(args, f.name)
        why = _type_problem(str(f.type), value)
        if why:
            problems.append((f.name, f"{f.name}={value!r} {why} (got {type(value).__name__})"))
    return problems


def _range_problems(args: ModelArgs) -> list[tuple[str, str]]:
    moe = args.n_dense_layers < args.n_layers  # MoE layers need experts to route to
    low = dict(_AT_LEAST, n_routed_experts=int(moe), n_activated_experts=int(moe))
    problems = []
    for name, lowest in low.items():
        if getattr(args, name) < lowest:
            problems.append((name, f"{name}={getattr(args, name)} must be >= {lowest}"))
    for name, bound in _ABOVE.items():
        if not getattr(args, name) > bound:
            problems.append((name, f"{name}={getattr(args, name)} must be > {bound}"))
    for name, highest in _AT_MOST.items():
        if getattr(args, name) > highest:
            problems.append((name, f"{name}={getattr(args, name)} must be <= {highest}"))
    for name, choices in _CHOICES.items():
        if getattr(args, name) not in choices:
            problems.append((name, f"{name}={getattr(args, name)!r} is not one of {choices}"))
    return problems


def _relation_problems(a: ModelArgs) -> list[tuple[str, str]]:
    problems = []
    if a.n_routed_experts % max(a.n_expert_groups, 1):
        problems.append(("n_routed_experts", f"n_routed_experts={a.n_routed_experts} is not divisible by "
                                             f"n_expert_groups={a.n_expert_groups}"))
    if a.n_limited_groups > a.n_expert_groups:
        problems.append(("n_limited_groups", f"n_limited_groups={a.n_limited_groups} must be in "
                                             f"[1, n_expert_groups={a.n_expert_groups}]"))
    if a.has_gate_bias and a.n_expert_groups > 1 and a.n_routed_experts // a.n_expert_groups < 2 \
            and a.n_dense_layers < a.n_layers:
        # Biased routing scores a group by the sum of its top-2 experts (DeepSeek's and HF's topk(2)); one expert
        # per group made every MoE forward fail with "selected index k out of range".
        problems.append(("n_expert_groups", f"n_expert_groups={a.n_expert_groups} leaves "
                                            f"{a.n_routed_experts // a.n_expert_groups} of n_routed_experts="
                                            f"{a.n_routed_experts} per group; routing with a gate bias scores a "
                                            "group by its top 2 experts, so each group needs 2 or more"))
    if a.n_activated_experts > a.n_routed_experts:
        problems.append(("n_activated_experts", f"n_activated_experts={a.n_activated_experts} > "
                                                f"n_routed_experts={a.n_routed_experts}"))
    elif a.n_expert_groups > 1 and a.n_dense_layers < a.n_layers and not a.n_routed_experts % a.n_expert_groups \
            and a.n_activated_experts > a.n_limited_groups * (a.n_routed_experts // a.n_expert_groups):
        # The router masks the dropped groups with -inf (DeepSeek's Gate): the top-k then picks among -inf ties, an
        # arbitrary choice that an engine's top-k makes differently (built and silently off the reference).
        problems.append(("n_activated_experts", f"n_activated_experts={a.n_activated_experts} exceeds the "
                                                f"{a.n_limited_groups * (a.n_routed_experts // a.n_expert_groups)} "
                                                f"experts of n_limited_groups={a.n_limited_groups} of "
                                                f"n_expert_groups={a.n_expert_groups} groups"))
    if a.qk_rope_head_dim % 2:
        problems.append(("qk_rope_head_dim", f"qk_rope_head_dim={a.qk_rope_head_dim} must be even"))
    if a.n_dense_layers > a.n_layers:
        problems.append(("n_dense_layers", f"n_dense_layers={a.n_dense_layers} must be in [0, n_layers={a.n_layers}]"))
    return problems


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
