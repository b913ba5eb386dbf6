"""A checkpoint's config.json with wrong types or absurd values is refused naming the file and the key.

Before, such configs gave raw TypeError / ValueError / allocator errors naming neither, or loaded and
built an engine with NaN logits (norm_eps < 0) or no routed experts (n_activated_experts = 0).
"""

from __future__ import annotations

import json

import pytest

from dsv3_export.checkpoint import CheckpointError, load_args
from dsv3_export.checkpoint.hf_config import args_to_hf_config, hf_config_to_args
from dsv3_export.cli import main
from dsv3_export.reference.args import PRESETS, ConfigError, ModelArgs


def write_config(directory, config):
    """A checkpoint directory holding only config.json: load_args reads no weights."""
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def deepseek_config(**change):
    return dict(ModelArgs.preset("tiny").to_dict(), **change)


V3_ROUTING = dict(model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                  n_group=4, topk_group=2, rope_interleave=True)


def hf_config(**change):
    return dict(args_to_hf_config(ModelArgs.preset("tiny"), "bfloat16"), **change)


@pytest.mark.parametrize("change, key", [
    (dict(dim="192"), "dim"),
    (dict(vocab_size=None), "vocab_size"),
    (dict(dim=192.5), "dim"),
    (dict(n_layers=True), "n_layers"),
    (dict(rope_factor=0), "rope_factor"),
    (dict(moe_inter_dim=-1), "moe_inter_dim"),
    (dict(max_seq_len=1_000_000_000), "max_seq_len"),
    (dict(max_batch_size=100_000_000), "max_batch_size"),
    (dict(norm_eps=-1), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(n_activated_experts=0), "n_activated_experts"),
    (dict(dim=-5), "dim"),
    (dict(rope_theta=1.0), "rope_theta"),
    (dict(score_func=["softmax"]), "score_func"),
    (dict(gate_bias="false"), "gate_bias"),
    # biased routing scores a group by its top-2 experts: one per group failed in every MoE forward
    (dict(score_func="sigmoid", gate_bias=True, n_expert_groups=8, n_limited_groups=4), "n_expert_groups"),
    # top-k beyond the kept groups' experts picks among -inf ties: the engine's choice differed from the reference's
    (dict(score_func="sigmoid", gate_bias=True, n_expert_groups=4, n_limited_groups=1), "n_activated_experts"),
    (dict(n_expert_groups=4, n_limited_groups=1), "n_activated_experts"),
])
def test_bad_deepseek_config_names_file_and_key(tmp_path, change, key):
    ckpt = write_config(tmp_path / "ckpt", deepseek_config(**change))
    with pytest.raises(ConfigError, match=rf"config\.json: invalid ModelArgs: {key}="):
        load_args(ckpt)


def test_info_config_with_zero_rope_factor_exits_1_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(deepseek_config(rope_factor=0)))
    assert main(["info", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "rope_factor=0" in err


@pytest.mark.parametrize("change, key", [
    (dict(max_position_embeddings="abc"), "max_position_embeddings"),
    (dict(rms_norm_eps="x"), "rms_norm_eps"),
    (dict(hidden_size="192"), "hidden_size"),
    (dict(n_routed_experts=None, topk_method="group_limited_greedy"), "n_routed_experts"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(moe_intermediate_size=-1), "moe_intermediate_size"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(hf_config(**V3_ROUTING), n_group=8, topk_group=4), "n_group"),  # one expert per group (tiny has 8)
    (dict(hf_config(**V3_ROUTING), topk_group=1), "num_experts_per_tok"),  # top-3 of the 2 experts of 1 kept group
])
def test_bad_hf_config_names_file_and_hf_key(tmp_path, change, key):
    ckpt = write_config(tmp_path / "ckpt", hf_config(**change))
    with pytest.raises(CheckpointError, match=rf"config\.json: .*{key}"):
        load_args(ckpt)


def test_hf_rope_factor_of_wrong_type_names_the_key(tmp_path):
    cfg = hf_config()
    cfg["rope_parameters"] = dict(cfg["rope_parameters"], factor="4")
    with pytest.raises(CheckpointError, match=r"config\.json: rope_parameters\.factor='4' must be a finite number"):
        load_args(write_config(tmp_path / "ckpt", cfg))


def test_hf_integral_floats_still_load():
    """4096.0 in an HF config is read as 4096, as int() read it before."""
    cfg = hf_config(max_position_embeddings=256.0)
    cfg["rope_parameters"] = dict(cfg["rope_parameters"], original_max_position_embeddings=128.0, beta_fast=32.0)
    args, _ = hf_config_to_args(cfg, "config.json")
    assert (args.max_seq_len, args.original_seq_len, args.beta_fast) == (256, 128, 32)
    assert type(args.beta_fast) is int


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip(tmp_path, name):
    """Every preset, and its DeepSeek- and HF-layout config.json, passes the new checks unchanged."""
    args = ModelArgs.preset(name)
    assert load_args(write_config(tmp_path / "ds", args.to_dict())) == args
    hf_args, _ = hf_config_to_args(args_to_hf_config(args, "bfloat16"), "config.json")
    same = dict(gate_bias=None, max_batch_size=args.max_batch_size)  # an HF config holds no batch size
    assert hf_args.replace(**same) == args.replace(**same)


def test_group_routing_with_two_experts_per_group_still_runs(tmp_path):
    """The edge that stays allowed: 2 experts per group (8 experts, 4 groups), biased sigmoid routing."""
    import torch

    from dsv3_export.checkpoint import preset_model

    model = preset_model("tiny", score_func="sigmoid", gate_bias=True, n_expert_groups=4, n_limited_groups=2)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, dtype=torch.long)).isfinite().all()
    args, _ = hf_config_to_args(hf_config(**V3_ROUTING), "config.json")
    assert (args.n_expert_groups, args.n_limited_groups, args.has_gate_bias) == (4, 2, True)


def test_ints_are_accepted_where_floats_are_expected():
    """DeepSeek's config_671B.json writes rope_factor 40 and route_scale 2.5; an int float field stays valid."""
    assert ModelArgs.from_dict({"rope_factor": 40, "rope_theta": 10000, "norm_eps": 1}).rope_factor == 40
    assert ModelArgs(max_seq_len=1 << 20, max_batch_size=4096).max_seq_len == 1 << 20
