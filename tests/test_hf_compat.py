"""HF compatibility: tiny random transformers DeepseekV2/V3 models -> load_checkpoint -> same logits.

Tolerance: fp32 on CPU, relative error ||ours - hf|| / ||hf|| < 1e-4 (measured ~7e-7). The
weights are re-drawn at unit-gain scales (HF's init is N(0, 0.02), which gives near-uniform
routing scores and hence near-ties between experts) so that routing decisions are robust.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dsv3_export.checkpoint import CheckpointError, load_checkpoint, preset_model, save_checkpoint  # noqa: E402
from dsv3_export.checkpoint.hf_config import hf_config_to_args  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

REL_TOL_FP32 = 1e-4
TOKENS_SHAPE = (2, 9)

YARN_V2 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
           "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
YARN_V3 = dict(YARN_V2, mscale=1.0, mscale_all_dim=1.0)


def common(**over):
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, moe_intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
                first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, attn_implementation="eager")
    base.update(over)
    return base


def v2_config(**over):
    kw = dict(n_shared_experts=2, q_lora_rank=None, rope_scaling=dict(YARN_V2))
    kw.update(over)
    return transformers.DeepseekV2Config(**common(**kw))


def v3_config(**over):
    kw = dict(n_shared_experts=1, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
              routed_scaling_factor=2.5, rope_scaling=dict(YARN_V3))
    kw.update(over)
    return transformers.DeepseekV3Config(**common(**kw))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-gain weights, norms near 1, a non-zero routing correction bias."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        else:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def hf_model(config, seed: int):
    cls = transformers.DeepseekV3ForCausalLM if config.model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed)
    return model


@torch.no_grad()
def compare(hf, ours, seed: int) -> float:
    tokens = torch.randint(0, hf.config.vocab_size, TOKENS_SHAPE, generator=torch.Generator().manual_seed(seed))
    expected = hf(tokens).logits
    got = ours(tokens)
    assert got.shape == expected.shape
    return rel_err(got, expected)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_logits_match_hf(tmp_path, topk_method):
    over = dict(topk_method=topk_method)
    if topk_method == "group_limited_greedy":
        over.update(n_group=4, topk_group=2)
    hf = hf_model(v2_config(**over), seed=1)
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path)
    assert ours.args.yarn_enabled and ours.args.mscale == pytest.approx(0.707)
    assert ours.args.q_lora_rank == 0 and ours.args.n_dense_layers == 1 and ours.args.n_shared_experts == 2
    err = compare(hf, ours, seed=2)
    assert err < REL_TOL_FP32, err


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_deepseek_v3_logits_match_hf(tmp_path, rope_interleave):
    """Sigmoid + random e_score_correction_bias, 4 groups keep 2, q_lora_rank > 0, normalized top-k.

    rope_interleave=False makes HF rotate_half; the loader must reorder the rope rows of wq_b and
    wkv_a (the error without reordering is ~1e-1).
    """
    hf = hf_model(v3_config(rope_interleave=rope_interleave), seed=3)
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path)
    gate = ours.layers[1].ffn.gate
    assert gate.bias is not None and gate.bias.abs().min() > 0
    assert ours.args.score_func == "sigmoid" and ours.args.n_expert_groups == 4 and ours.args.q_lora_rank == 24
    err = compare(hf, ours, seed=4)
    assert err < REL_TOL_FP32, err


def test_tied_embeddings_and_sharded_index(tmp_path):
    hf = hf_model(v2_config(tie_word_embeddings=True), seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_checkpoint(tmp_path)
    assert torch.equal(ours.head.weight, ours.embed.weight)
    assert compare(hf, ours, seed=6) < REL_TOL_FP32


def test_fused_expert_tensors_load(tmp_path):
    """transformers 5 keeps experts as gate_up_proj [E, 2I, D] / down_proj [E, D, I]; accept that on disk."""
    hf = hf_model(v3_config(), seed=7)
    hf.save_pretrained(tmp_path)
    fused = {n: t.contiguous() for n, t in hf.state_dict().items() if "rotary" not in n}
    assert any(n.endswith("experts.gate_up_proj") for n in fused)
    (tmp_path / "model.safetensors").unlink()
    save_file(fused, str(tmp_path / "model.safetensors"))
    assert compare(hf, load_checkpoint(tmp_path), seed=8) < REL_TOL_FP32


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_hf_layout_save_loads_in_transformers(tmp_path, score_func):
    """save_checkpoint(layout="hf") is a checkpoint transformers' from_pretrained reads correctly."""
    over = dict(score_func=score_func)
    if score_func == "sigmoid":
        over.update(gate_bias=True, n_expert_groups=4, n_limited_groups=2, q_lora_rank=40, route_scale=2.5)
    ours = preset_model("tiny", seed=9, **over)
    save_checkpoint(ours, tmp_path / "ckpt", layout="hf")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == ("deepseek_v3" if score_func == "sigmoid" else "deepseek_v2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    assert compare(hf, ours, seed=10) < REL_TOL_FP32


def test_mtp_layer_is_skipped(tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer after the last; it is not the LM."""
    hf = hf_model(v3_config(), seed=11)
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    extra = {n.replace("layers.2.", "layers.3."): t.clone() for n, t in tensors.items() if ".layers.2." in n}
    save_file({**tensors, **extra}, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert compare(hf, load_checkpoint(tmp_path), seed=12) < REL_TOL_FP32
    config["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.3\."):
        load_checkpoint(tmp_path)


def test_16b_softmax_scale_matches_hf_formula():
    """DeepSeek-V2-Lite's rope_scaling (factor 40, mscale = mscale_all_dim = 0.707): x1.5896."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    cfg = v2_config(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512, max_position_embeddings=163840,
                    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    args, _ = hf_config_to_args(cfg.to_dict(), "v2-lite")
    assert args.max_seq_len == 16384 and args.yarn_enabled
    assert args.softmax_scale / 192**-0.5 == pytest.approx(1.5896, abs=1e-4)
    assert args.softmax_scale == pytest.approx(yarn_apply_mscale(cfg.rope_parameters, 192**-0.5), rel=1e-12)


@pytest.mark.parametrize("change, key", [
    (dict(rope_scaling=dict(YARN_V2, mscale=1.0)), "mscale"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(some_new_feature=3), "some_new_feature"),
])
def test_unrepresentable_hf_config_is_refused(change, key):
    cfg = v2_config().to_dict()
    cfg.update(change)
    with pytest.raises(CheckpointError, match=key):
        hf_config_to_args(cfg, "config.json")


def test_a_scale_format_is_loaded_with_a_warning_that_it_is_not_applied():
    """DeepSeek-V3.1's quantization_config.scale_fmt "ue8m0" was ignored silently: its activation scales are powers of
    two, ours amax / 448."""
    cfg = v3_config().to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    with pytest.warns(UserWarning, match=r"scale_fmt='ue8m0' is not applied"):
        args, _ = hf_config_to_args(cfg, "config.json")
    assert args.dtype == "fp8" and args.block_size == 128


def test_v3_without_normalized_topk_is_refused():
    cfg = v3_config(norm_topk_prob=False).to_dict()
    with pytest.raises(CheckpointError, match="norm_topk_prob"):
        hf_config_to_args(cfg, "config.json")


def test_yarn_needs_max_seq_len_above_original(tmp_path):
    hf_model(v2_config(), seed=13).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="original_max_position_embeddings=128"):
        load_checkpoint(tmp_path, max_seq_len=128)
    assert load_checkpoint(tmp_path, max_seq_len=129).args.yarn_enabled


def test_no_rope_scaling_disables_yarn(tmp_path):
    hf = hf_model(v2_config(rope_scaling=None, max_position_embeddings=64), seed=14)
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path)
    assert not ours.args.yarn_enabled
    assert ours.args.softmax_scale == pytest.approx(ours.args.qk_head_dim**-0.5)
    assert compare(hf, ours, seed=15) < REL_TOL_FP32


def test_hf_fp8_checkpoint_matches_dequantized_hf(tmp_path):
    """DeepSeek-V3-style fp8: layer Linears as float8_e4m3fn + weight_scale_inv (w = q * s per 128x128 block,
    transformers' finegrained_fp8 convention), embed / lm_head / router / norms dense. Reference: HF
    on the dequantized weights (transformers' own fp8 loader needs accelerate, absent here)."""
    from dsv3_export.reference.fp8 import weight_dequant, weight_quant

    hf = hf_model(v3_config(hidden_size=160, intermediate_size=200, q_lora_rank=136), seed=16)
    hf.save_pretrained(tmp_path / "dense")
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        linear = name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")
        if linear and name.startswith("model.layers."):
            q, s = weight_quant(t)
            quantized[name], quantized[name.replace(".weight", ".weight_scale_inv")] = q, s
            dequantized[name] = weight_dequant(q, s, torch.float32)
        else:
            quantized[name] = dequantized[name] = t
    assert quantized["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)  # 40 x 160
    assert quantized["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (1, 2)  # ragged 40 x 160
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    shutil.copytree(tmp_path / "dense", tmp_path / "fp8")
    save_file(dequantized, str(tmp_path / "dense" / "model.safetensors"))
    save_file(quantized, str(tmp_path / "fp8" / "model.safetensors"))
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="eager").eval()
    ours = load_checkpoint(tmp_path / "fp8")
    assert ours.args.dtype == "fp8" and ours.layers[1].ffn.experts[0].w1.weight.dtype == torch.float8_e4m3fn
    assert compare(reference, ours, seed=17) < REL_TOL_FP32


# The published config.json files of deepseek-ai/DeepSeek-V2-Lite and deepseek-ai/DeepSeek-V3 (auto_map left out).
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


@pytest.mark.parametrize("config, preset", [(V2_LITE_CONFIG, "16b"), (V3_CONFIG, "671b")])
def test_published_hf_configs_give_our_presets(config, preset):
    """HF config conversion agrees with DeepSeek's own configs (config_16B.json, config_671B.json)."""
    from dsv3_export.reference import ModelArgs

    args, layout = hf_config_to_args(config, preset)
    want = ModelArgs.preset(preset)
    assert args.has_gate_bias == want.has_gate_bias and layout.rope_interleave
    assert args.replace(gate_bias=None) == want
    assert layout.n_mtp_layers == (1 if preset == "671b" else 0)


def test_missing_hf_keys_take_transformers_defaults():
    """A config.json that leaves keys out means transformers' class defaults, not ours."""
    args, layout = hf_config_to_args({"model_type": "deepseek_v3"}, "config.json")
    cfg = transformers.DeepseekV3Config()
    assert (args.n_expert_groups, args.n_limited_groups, args.route_scale) == (cfg.n_group, cfg.topk_group, 2.5)
    assert (args.dim, args.n_layers, args.q_lora_rank, args.n_dense_layers) == (7168, 61, 1536, 3)
    assert args.max_seq_len == cfg.max_position_embeddings == 4096 and not args.yarn_enabled
