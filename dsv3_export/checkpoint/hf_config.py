"""HuggingFace DeepseekV2/V3 config.json <-> ModelArgs, refusing what our model cannot represent.

Semantics follow transformers 5.24's modeling_deepseek_v2.py / modeling_deepseek_v3.py (see
docs/hf_compat.md for every difference and why each rule below exists):
  * softmax scale: HF multiplies qk_head_dim^-0.5 by yarn_get_mscale(factor, mscale_all_dim)^2,
    so ModelArgs.mscale := rope_scaling.mscale_all_dim (0 when absent: no scaling).
  * HF also multiplies cos/sin by attention_factor = get_mscale(factor, mscale) /
    get_mscale(factor, mscale_all_dim) (or get_mscale(factor) when either is missing). Our model
    has no such factor, so anything but 1 is refused.
  * HF applies YaRN whenever rope_type == "yarn"; our model (DeepSeek's rule) only when
    max_seq_len > original_seq_len. Loading therefore needs max_seq_len > original.
  * V2 routing: softmax, greedy or group_limited_greedy, no normalization (HF 5.24 ignores
    norm_topk_prob for V2). V3 routing: sigmoid + e_score_correction_bias, top-2-sum group scores,
    normalized weights (norm_topk_prob must be true).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from dsv3_export.checkpoint.errors import CheckpointError
from dsv3_export.reference.args import ConfigError, ModelArgs

HF_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
DEFAULT_MAX_SEQ_LEN = ModelArgs().max_seq_len  # the KV cache length when the caller names none

# Keys that do not change inference logits (training, tokenizer, bookkeeping, parallelism).
_IGNORED_KEYS = frozenset({
    "architectures", "auto_map", "aux_loss_alpha", "bos_token_id", "eos_token_id", "pad_token_id",
    "dtype", "torch_dtype", "ep_size", "initializer_range", "output_router_logits",
    "pretraining_tp", "router_aux_loss_coef", "seq_aux", "transformers_version", "use_cache",
    "attention_dropout", "model_type", "num_nextn_predict_layers", "num_mtp_layers",
    "head_dim", "qk_head_dim", "return_dict", "output_hidden_states", "output_attentions",
    "tokenizer_class", "generation_config", "use_mtp",
})
# transformers' generic PretrainedConfig keys (4.x and 5.x), written by to_dict(): labels, generation
# defaults, output switches. None changes logits (pruned_heads would, but then shapes mismatch).
_GENERIC_KEYS = frozenset({
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
    "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder",
    "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores",
    "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
    "temperature", "tf_legacy_loss", "tie_encoder_decoder", "top_k", "top_p", "torchscript",
    "typical_p", "use_bfloat16",
})
# Keys read below; a key in neither set is refused so that nothing is silently dropped.
_READ_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "topk_method", "scoring_func", "routed_scaling_factor", "norm_topk_prob", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta",
    "rope_scaling", "rope_parameters", "rope_interleave", "max_position_embeddings", "hidden_act",
    "attention_bias", "mlp_bias", "moe_layer_freq", "tie_word_embeddings", "quantization_config",
})
_ROPE_KEYS = frozenset({
    "type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor",
})


# transformers 5.24's config-class defaults, used for keys a config.json leaves out (as HF does).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, first_k_dense_replace=0,
        kv_lora_rank=512, q_lora_rank=1536, n_group=None, n_routed_experts=64, n_shared_experts=2,
        qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None,
        topk_method="greedy", norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
        moe_intermediate_size=1407, tie_word_embeddings=False,
    ),
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
        num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_interleave=True, tie_word_embeddings=False, num_nextn_predict_layers=1,
    ),
}


@dataclass(frozen=True)
class HfLayout:
    """What the tensor-name mapping needs to know besides ModelArgs."""

    model_type: str
    rope_interleave: bool  # False: HF rotate_half layout, q/k rope rows must be de-permuted
    tie_word_embeddings: bool
    n_mtp_layers: int  # DeepSeek-V3's multi-token-prediction layers after the last layer (skipped)


# ModelArgs field -> the HF key it is read from, to name the HF key when ModelArgs refuses a value.
_HF_KEY_OF = dict(
    dim="hidden_size", inter_dim="intermediate_size", moe_inter_dim="moe_intermediate_size",
    n_layers="num_hidden_layers", n_dense_layers="first_k_dense_replace", n_heads="num_attention_heads",
    norm_eps="rms_norm_eps", n_activated_experts="num_experts_per_tok", route_scale="routed_scaling_factor",
    max_seq_len="max_position_embeddings (or the max_seq_len asked for)", n_expert_groups="n_group",
    n_limited_groups="topk_group", original_seq_len="rope_scaling.original_max_position_embeddings",
    rope_factor="rope_scaling.factor", rope_theta="rope_theta", beta_fast="rope_scaling.beta_fast",
    beta_slow="rope_scaling.beta_slow", mscale="rope_scaling.mscale_all_dim",
    block_size="quantization_config.weight_block_size",
)


def _number(value: Any, name: str, src: str) -> float:
    """A finite JSON number as float; anything else is refused naming the file and key (not float()'s error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{src}: {name}={value!r} must be a finite number")
    return float(value)


def _integer(value: Any, name: str, src: str) -> int:
    """A JSON integer (or an integral float such as 4096.0) as int; anything else names the file and key."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{src}: {name}={value!r} must be an integer")
    return value


def _falsy_number(value: Any) -> bool:
    """null or a numeric 0: what HF's `x or default` replaces (a false or "" is no number: refused later)."""
    return value is None or (type(value) in (int, float) and value == 0)


def _int_or(cfg: dict[str, Any], key: str, src: str, fallback: int, name: str | None = None) -> int:
    """cfg[key] as int, null or 0 meaning fallback (HF's `x or default` reading)."""
    value = cfg.get(key)
    if _falsy_number(value):
        return fallback
    return _integer(value, name or key, src)


def _flag(cfg: dict[str, Any], key: str, src: str, default: bool) -> bool:
    """A JSON boolean (null: false, as bool() read it); the string "false" must not read as true."""
    value = cfg.get(key, default)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CheckpointError(f"{src}: {key}={value!r} must be true or false")
    return value


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_args(cfg: dict[str, Any], src: str, max_seq_len: int) -> dict[str, Any]:
    """rope_scaling / rope_parameters -> ModelArgs yarn fields (YaRN on iff HF uses it)."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}  # transformers' priority
    if not isinstance(rope, dict):
        raise CheckpointError(f"{src}: rope_scaling must be an object, got {rope!r}")
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown:
        raise CheckpointError(f"{src}: rope_scaling key(s) {unknown} are not supported")
    where = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    theta_key = f"{where}.rope_theta" if "rope_theta" in rope else "rope_theta"
    theta = _number(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), theta_key, src)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = _number(rope.get("partial_rotary_factor", 1.0), f"{where}.partial_rotary_factor", src)
    if partial != 1.0:
        raise CheckpointError(f"{src}: {where}.partial_rotary_factor={partial} != 1 is not supported")
    if rope_type == "default":
        # YaRN off: DeepSeek's rule needs max_seq_len <= original_seq_len.
        return dict(rope_theta=theta, original_seq_len=max_seq_len)
    if rope_type != "yarn":
        raise CheckpointError(f"{src}: rope_scaling.rope_type={rope_type!r} is not supported (only 'yarn' or none)")
    original = rope.get("original_max_position_embeddings")
    if not original:
        raise CheckpointError(f"{src}: rope_scaling.original_max_position_embeddings is required for yarn")
    original = _integer(original, f"{where}.original_max_position_embeddings", src)
    if original < 1:
        raise CheckpointError(f"{src}: {where}.original_max_position_embeddings={original} must be >= 1")
    factor = rope.get("factor")
    if _falsy_number(factor):  # HF: factor or max_position / original
        factor = _integer(cfg["max_position_embeddings"], "max_position_embeddings", src) / original
    factor = _number(factor, f"{where}.factor", src)
    if factor < 1:
        raise CheckpointError(f"{src}: rope_scaling.factor={factor} < 1 is not supported")
    if rope.get("truncate", True) is not True:
        raise CheckpointError(f"{src}: rope_scaling.truncate=false is not supported (DeepSeek floors/ceils the ramp)")
    mscale, mscale_all_dim, attention_factor = (
        None if rope.get(k) is None else _number(rope[k], f"{where}.{k}", src)
        for k in ("mscale", "mscale_all_dim", "attention_factor"))
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    if abs(attention_factor - 1.0) > 1e-6:
        raise CheckpointError(
            f"{src}: rope_scaling.mscale={mscale} / mscale_all_dim={mscale_all_dim} (attention_factor="
            f"{attention_factor:.6f}) scale HF's cos/sin tables; our model (DeepSeek's) has no such factor. "
            "Only configs with mscale == mscale_all_dim (or an explicit attention_factor 1.0) load.")
    if max_seq_len <= original:
        raise CheckpointError(
            f"{src}: HF applies YaRN at every length, our model only when max_seq_len > "
            f"original_max_position_embeddings={original}; got max_seq_len={max_seq_len}. "
            f"Pass max_seq_len > {original}.")
    beta_fast = _int_or(rope, "beta_fast", src, 32, f"{where}.beta_fast")
    beta_slow = _int_or(rope, "beta_slow", src, 1, f"{where}.beta_slow")
    return dict(rope_theta=theta, original_seq_len=original, rope_factor=factor,
                beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale_all_dim or 0.0)


def _require(cfg: dict[str, Any], key: str, src: str, ok: bool, why: str) -> None:
    if not ok:
        raise CheckpointError(f"{src}: {key}={cfg.get(key)!r} is not supported: {why}")


def _routing_args(cfg: dict[str, Any], src: str, model_type: str) -> dict[str, Any]:
    n_experts = _integer(cfg.get("n_routed_experts"), "n_routed_experts", src)
    top_k = _integer(cfg.get("num_experts_per_tok"), "num_experts_per_tok", src)
    n_group, topk_group = _int_or(cfg, "n_group", src, 1), _int_or(cfg, "topk_group", src, 1)
    experts = dict(n_routed_experts=n_experts, n_activated_experts=top_k)
    scoring, method = cfg.get("scoring_func"), cfg.get("topk_method")
    if model_type == "deepseek_v2":
        _require(cfg, "scoring_func", src, scoring in (None, "softmax"), "DeepseekV2 routes with softmax")
        _require(cfg, "topk_method", src, method in (None, "greedy", "group_limited_greedy"),
                 "DeepseekV2 knows greedy and group_limited_greedy")
        if cfg.get("norm_topk_prob"):
            warnings.warn(f"{src}: norm_topk_prob=true is ignored, as transformers' DeepseekV2 router ignores it",
                          stacklevel=3)
        if method != "group_limited_greedy":
            n_group = topk_group = 1  # greedy ignores groups
        elif n_group >= 1 and top_k > topk_group * (n_experts // n_group):  # n_group < 1: ModelArgs names it
            # HF masks dropped groups with 0 (picks zero-weight experts); we mask with -inf.
            raise CheckpointError(f"{src}: num_experts_per_tok={top_k} exceeds the experts of topk_group="
                                  f"{topk_group} groups; HF and DeepSeek routing differ there")
        return dict(score_func="softmax", gate_bias=False, n_expert_groups=n_group, n_limited_groups=topk_group,
                    **experts)
    _require(cfg, "scoring_func", src, scoring in (None, "sigmoid"), "DeepseekV3 routes with sigmoid")
    _require(cfg, "topk_method", src, method in (None, "noaux_tc"), "DeepseekV3 routes with noaux_tc")
    _require(cfg, "norm_topk_prob", src, cfg.get("norm_topk_prob", True) is True,
             "our sigmoid router always normalizes the top-k weights")
    return dict(score_func="sigmoid", gate_bias=True, n_expert_groups=n_group, n_limited_groups=topk_group, **experts)


def _quant_args(cfg: dict[str, Any], src: str) -> dict[str, Any]:
    q = cfg.get("quantization_config")
    if q is None:
        return dict(dtype="bf16")
    ok = (isinstance(q, dict) and q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3"
          and q.get("activation_scheme", "dynamic") == "dynamic")
    block = q.get("weight_block_size") if isinstance(q, dict) else None
    if not ok or not (isinstance(block, list) and len(block) == 2 and block[0] == block[1]):
        raise CheckpointError(f"{src}: quantization_config={q!r} is not supported; only fp8 e4m3 with square "
                              "weight_block_size and dynamic activations (DeepSeek-V3's scheme)")
    if q.get("scale_fmt") is not None:  # DeepSeek-V3.1: "ue8m0"
        warnings.warn(f"{src}: quantization_config.scale_fmt={q['scale_fmt']!r} is not applied: the engines scale each "
                      "1x128 activation block by amax / 448 (DeepSeek-V3's act_quant), not by the power of two above it "
                      "(the weights and their scales load unchanged; activations round slightly differently)",
                      stacklevel=3)
    return dict(dtype="fp8", block_size=_integer(block[0], "quantization_config.weight_block_size", src))


def hf_config_to_args(cfg: dict[str, Any], src: str, max_seq_len: int | None = None) -> tuple[ModelArgs, HfLayout]:
    """HF config dict -> (ModelArgs, HfLayout). max_seq_len: KV cache length (default min(max_position_embeddings, 16384))."""
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{src}: model_type={model_type!r} is not one of {HF_MODEL_TYPES}")
    cfg = {**_HF_DEFAULTS[model_type], **cfg}
    unknown = sorted(k for k in set(cfg) - _READ_KEYS - _IGNORED_KEYS - _GENERIC_KEYS if not k.startswith("_"))
    if unknown:
        raise CheckpointError(f"{src}: unknown config key(s) {unknown} for {model_type}; refusing to guess their meaning")
    _require(cfg, "hidden_act", src, cfg.get("hidden_act", "silu") == "silu", "only SwiGLU (silu) MLPs")
    for key in ("attention_bias", "mlp_bias"):
        _require(cfg, key, src, not cfg.get(key, False), "our Linears have no bias")
    _require(cfg, "moe_layer_freq", src, cfg.get("moe_layer_freq", 1) == 1, "every layer after the dense ones is MoE")
    kv_heads = cfg.get("num_key_value_heads")
    _require(cfg, "num_key_value_heads", src, kv_heads in (None, cfg.get("num_attention_heads")),
             "MLA has one latent shared by all heads; num_key_value_heads must equal num_attention_heads")
    mpe = _integer(cfg.get("max_position_embeddings", DEFAULT_MAX_SEQ_LEN), "max_position_embeddings", src)
    seq = int(max_seq_len) if max_seq_len is not None else min(mpe, DEFAULT_MAX_SEQ_LEN)
    if cfg.get("num_experts_per_tok") is None:
        raise CheckpointError(f"{src}: num_experts_per_tok is required")
    values = _size_args(cfg, src)
    values.update(max_seq_len=seq, **_routing_args(cfg, src, model_type))
    values.update(_rope_args(cfg, src, seq))
    values.update(_quant_args(cfg, src))
    try:
        args = ModelArgs(**values)
    except ConfigError as e:
        hf_keys = ", ".join(_HF_KEY_OF.get(k, k) for k in e.keys)
        raise CheckpointError(f"{src}: {e} (HF key(s): {hf_keys})") from None
    mtp = _int_or(cfg, "num_nextn_predict_layers", src, 0) or _int_or(cfg, "num_mtp_layers", src, 0)
    layout = HfLayout(
        model_type=model_type,
        rope_interleave=model_type == "deepseek_v2" or _flag(cfg, "rope_interleave", src, True),
        tie_word_embeddings=_flag(cfg, "tie_word_embeddings", src, False), n_mtp_layers=mtp,
    )
    return args, layout


def _size_args(cfg: dict[str, Any], src: str) -> dict[str, Any]:
    """The ModelArgs sizes, each HF value type-checked under its own key (ranges: ModelArgs)."""
    required = dict(vocab_size="vocab_size", dim="hidden_size", inter_dim="intermediate_size",
                    moe_inter_dim="moe_intermediate_size", n_layers="num_hidden_layers",
                    n_heads="num_attention_heads", kv_lora_rank="kv_lora_rank", qk_nope_head_dim="qk_nope_head_dim",
                    qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim")
    values: dict[str, Any] = {ours: _integer(cfg.get(key), key, src) for ours, key in required.items()}
    values.update(
        n_dense_layers=_int_or(cfg, "first_k_dense_replace", src, 0),
        n_shared_experts=_int_or(cfg, "n_shared_experts", src, 0), q_lora_rank=_int_or(cfg, "q_lora_rank", src, 0),
        norm_eps=_number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", src),
        route_scale=_number(cfg.get("routed_scaling_factor", 1.0), "routed_scaling_factor", src),
    )
    return values


def args_to_hf_config(args: ModelArgs, weight_dtype: str) -> dict[str, Any]:
    """ModelArgs -> an HF config dict that transformers loads into a model with the same logits."""
    sigmoid = args.score_func == "sigmoid"
    if sigmoid and not args.has_gate_bias and args.n_expert_groups > 1:
        raise CheckpointError("cannot save as HF: sigmoid routing without gate bias but with n_expert_groups > 1 "
                              "(HF DeepseekV3 scores groups by top-2 sums, ours by max)")
    if not sigmoid and args.has_gate_bias:
        raise CheckpointError("cannot save as HF: softmax routing with a gate bias has no HF model type")
    if not sigmoid and args.n_expert_groups > 1 and \
            args.n_activated_experts > args.n_limited_groups * (args.n_routed_experts // args.n_expert_groups):
        raise CheckpointError("cannot save as HF: top-k exceeds the experts of the kept groups (HF masks with 0)")
    model_type = "deepseek_v3" if sigmoid else "deepseek_v2"
    cfg: dict[str, Any] = dict(
        architectures=["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"], model_type=model_type,
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        first_k_dense_replace=args.n_dense_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads, rms_norm_eps=args.norm_eps, n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts, num_experts_per_tok=args.n_activated_experts,
        n_group=args.n_expert_groups, topk_group=args.n_limited_groups,
        routed_scaling_factor=args.route_scale, norm_topk_prob=sigmoid,
        q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim, max_position_embeddings=args.max_seq_len, hidden_act="silu",
        attention_bias=False, tie_word_embeddings=False, dtype=weight_dtype,
    )
    if sigmoid:
        cfg.update(rope_interleave=True, topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=0)
    else:
        cfg.update(mlp_bias=False, topk_method="group_limited_greedy" if args.n_expert_groups > 1 else "greedy")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.yarn_enabled:
        rope.update(rope_type="yarn", factor=args.rope_factor, original_max_position_embeddings=args.original_seq_len,
                    beta_fast=args.beta_fast, beta_slow=args.beta_slow, mscale=args.mscale,
                    mscale_all_dim=args.mscale)
        if not args.mscale:
            rope["attention_factor"] = 1.0  # HF would otherwise scale cos/sin by get_mscale(factor)
    cfg["rope_parameters"] = rope
    if args.dtype == "fp8":
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [args.block_size, args.block_size]}
    return cfg
