"""The reference model: presets, config strictness, attention/MoE formulations, KV cache."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3_export.reference import ConfigError, ModelArgs, Transformer, count_parameters
from dsv3_export.reference.attention import MLA
from dsv3_export.reference.layers import rope_frequencies
from dsv3_export.reference.moe import MoE
from tests.conftest import TOLERANCES, rel_err


def tiny(**changes) -> ModelArgs:
    return ModelArgs.preset("tiny").replace(**changes)


def build(args: ModelArgs, seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(args, **kw).eval()


@pytest.mark.parametrize("preset,expected", [("16b", 15.7e9), ("671b", 671e9)])
def test_preset_builds_on_meta_with_expected_parameter_count(preset, expected):
    with torch.device("meta"):
        model = Transformer(ModelArgs.preset(preset), dtype=torch.bfloat16)
    n = count_parameters(model)
    assert abs(n - expected) / expected < 0.005, n


def test_16b_preset_has_deepseek_values_and_yarn_scale():
    args = ModelArgs.preset("16b")
    assert (args.dim, args.inter_dim, args.moe_inter_dim, args.n_layers) == (2048, 10944, 1408, 27)
    assert (args.n_routed_experts, args.n_shared_experts, args.n_activated_experts) == (64, 2, 6)
    assert args.mscale == 0.707 and args.yarn_enabled
    # DESIGN.md: softmax scale x1.5896 when max_seq_len > 4096 with mscale 0.707.
    assert args.softmax_scale / args.qk_head_dim**-0.5 == pytest.approx(1.5896, abs=1e-4)


def test_from_json_is_strict(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"dim": 256, "n_layers": 2}))
    assert ModelArgs.from_json(good).dim == 256
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dim": 256, "hiden_size": 3}))
    with pytest.raises(ConfigError, match=r"bad\.json.*hiden_size"):
        ModelArgs.from_json(bad)
    with pytest.raises(ConfigError, match="score_func"):
        ModelArgs(score_func="relu")
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelArgs.preset("7b")


def test_yarn_frequencies_blend_only_when_extended():
    base = tiny(max_seq_len=128)  # == original_seq_len: plain RoPE
    plain = rope_frequencies(base)
    yarn = rope_frequencies(tiny())
    assert not base.yarn_enabled and tiny().yarn_enabled
    assert torch.equal(plain, 1.0 / (base.rope_theta ** (torch.arange(0, 16, 2).float() / 16)))
    # Fast-rotating pairs keep their frequency, slow ones are divided by rope_factor.
    assert yarn[0] == pytest.approx(plain[0].item())
    assert yarn[-1] == pytest.approx(plain[-1].item() / tiny().rope_factor)


@pytest.mark.parametrize("q_lora_rank", [0, 48])
def test_naive_and_absorb_attention_agree(seed, q_lora_rank):
    tokens = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(seed))
    absorb = build(tiny(q_lora_rank=q_lora_rank), seed)
    naive = build(tiny(q_lora_rank=q_lora_rank, attn_impl="naive"), seed)
    assert isinstance(naive.layers[0].attn, MLA) and hasattr(naive.layers[0].attn, "k_cache")
    with torch.no_grad():
        a, n = absorb(tokens), naive(tokens)
    assert rel_err(a, n) < TOLERANCES["fp32_structural"]


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_prefill_then_16_decode_steps_equal_full_forward(seed, attn_impl):
    model = build(tiny(attn_impl=attn_impl), seed)
    tokens = torch.randint(0, 1000, (3, 21), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(tokens)
        model.reset_cache()
        steps = [model(tokens[:, :5], start_pos=0)]
        for pos in range(5, 21):
            steps.append(model(tokens[:, pos : pos + 1], start_pos=pos))
    assert rel_err(torch.cat(steps, dim=1), full) < TOLERANCES["fp32_structural"]


def test_chunked_prefill_at_nonzero_start_pos_matches_full_forward(seed):
    model = build(tiny(), seed)
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(tokens)
        model.reset_cache()
        first = model(tokens[:, :7])
        second = model(tokens[:, 7:], start_pos=7)
    assert rel_err(torch.cat([first, second], 1), full) < TOLERANCES["fp32_structural"]


@pytest.mark.parametrize("variant", [
    dict(),  # 16b-like: softmax, one group, no bias
    dict(score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, gate_bias=True, route_scale=2.5),
    dict(n_expert_groups=2, n_limited_groups=1),  # softmax with group-limited routing
])
def test_static_moe_equals_loop_moe(seed, variant):
    args = tiny(**variant)
    torch.manual_seed(seed)
    moe = MoE(args).eval()
    with torch.no_grad():  # MoE alone is not initialized by Transformer: draw its weights here
        for p in moe.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(37, args.dim)
    with torch.no_grad():
        moe.moe_impl = "loop"
        loop = moe(x)
        moe.moe_impl = "static"
        static = moe(x)
    assert rel_err(static, loop) < TOLERANCES["fp32_structural"]
    # The loop skips unrouted experts: the test must route to fewer than all experts per token.
    assert args.n_activated_experts < args.n_routed_experts


def test_gate_group_limited_routing_only_picks_kept_groups(seed):
    args = tiny(score_func="sigmoid", n_expert_groups=4, n_limited_groups=2, gate_bias=True)
    torch.manual_seed(seed)
    gate = MoE(args).gate
    with torch.no_grad():
        gate.weight.normal_(0, 1)
        gate.bias.normal_(0, 0.1)
        weights, idx = gate(torch.randn(50, args.dim))
    groups = idx // (args.n_routed_experts // args.n_expert_groups)
    assert all(len(set(row.tolist())) <= args.n_limited_groups for row in groups)
    # sigmoid routing renormalizes the weights, then scales them.
    assert torch.allclose(weights.sum(-1), torch.full((50,), args.route_scale), atol=1e-5)


def test_fp8_model_dequantizes_ragged_blocks(seed):
    args = tiny(dtype="fp8")
    model = build(args, seed)
    wkv_a = model.layers[0].attn.wkv_a
    assert wkv_a.weight.dtype == torch.float8_e4m3fn
    assert tuple(wkv_a.scale.shape) == (1, 2)  # 80 x 192 -> ceil(80/128) x ceil(192/128)
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(tokens)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_model_without_shared_experts_draws_weights_and_runs(seed, dtype):
    """n_shared_experts=0 (ModelArgs allows it; HF builds empty shared experts): drawing the empty w2's weights
    was a ZeroDivisionError (0 ** -0.5)."""
    model = build(tiny(n_shared_experts=0, dtype=dtype), seed)
    assert model.layers[1].ffn.shared_experts.w2.weight.shape == (192, 0)
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 3, dtype=torch.long))).all()


def test_forward_rejects_positions_past_the_cache():
    model = build(tiny(), 0)
    with pytest.raises(RuntimeError, match="max_seq_len"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=254)
