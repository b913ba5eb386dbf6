"""fuse_shared_experts: fires once per MoE layer, each guard holds, idempotent, exact up to summation order.

Numerics: the fused program against the program before the pass (after rewrite_moe_grouped_gemm),
random inputs with a fresh seed: fp32 relative error < 1e-5 (TOLERANCES["fp32_structural"]),
bf16 < BF16_FUSED_TOLERANCE (below). fp8 chunks are compared bit for bit with the checkpoint's bytes.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

import dsv3_export.ops.moe  # noqa: F401
from dsv3_export.export import export_step
from dsv3_export.passes import pipeline
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.fuse_shared_experts import fuse_shared_experts
from dsv3_export.passes.rewrite_moe_grouped_gemm import rewrite_moe_grouped_gemm
from dsv3_export.reference import ModelArgs, Transformer
from tests.conftest import TOLERANCES, rel_err
from tests.passes.tiny_programs import run, step_inputs, tiny_program

aten = torch.ops.aten
MOE = torch.ops.dsv3.moe_experts.default
MOE_FP8 = torch.ops.dsv3.moe_experts_fp8.default
CONFIG = PassConfig()
E, I, D, S = 8, 96, 192, 192  # tiny: routed experts, moe_inter_dim, dim, shared intermediate (2 x 96)


def count(program, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in program.graph.nodes)


def _op(program, target=MOE):
    return next(n for n in program.graph.nodes if n.target is target)


@functools.cache
def fused(kind: str, dtype: torch.dtype = torch.float32) -> tuple:
    before = rewrite_moe_grouped_gemm(tiny_program(kind, dtype), CONFIG).program
    return before, fuse_shared_experts(before, CONFIG)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_fires_once_per_moe_layer_and_stacks_the_shared_chunks(kind):
    before, result = fused(kind)
    assert result.matches == 2 and count(result.program, MOE) == 2, result.notes
    assert count(result.program, aten.silu.default) == count(before, aten.silu.default) - 2
    sd, old = result.program.state_dict, before.state_dict
    assert not any("shared_experts" in name for name in sd)
    for layer in (1, 2):
        p = f"layers.{layer}.ffn"
        w13, w2 = sd[f"{p}.w13"], sd[f"{p}.w2"]
        assert w13.shape == (E + 2, 2 * I, D) and w2.shape == (E + 2, D, I)
        assert torch.equal(w13[:E], old[f"{p}.w13"]) and torch.equal(w2[:E], old[f"{p}.w2"])
        for c in range(2):  # chunk c: intermediate channels [cI, (c+1)I) of the shared MLP
            rows = slice(c * I, (c + 1) * I)
            assert torch.equal(w13[E + c, :I], old[f"{p}.shared_experts.w1.weight"][rows])
            assert torch.equal(w13[E + c, I:], old[f"{p}.shared_experts.w3.weight"][rows])
            assert torch.equal(w2[E + c], old[f"{p}.shared_experts.w2.weight"][:, rows])
    op = _op(result.program)
    ids, weights = op.args[2].meta["val"], op.args[1].meta["val"]
    assert ids.shape[1] == weights.shape[1] == 3 + 2  # top-3 routed + 2 shared, every token
    assert list(op.meta["nn_module_stack"].values())[-1][0] == "layers.1.ffn"


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_numerics_fp32(kind, seed):
    before, result = fused(kind)
    inputs = step_inputs(kind, seed)
    for got, want in zip(run(result.program, inputs), run(before, inputs)):
        assert rel_err(got, want) < TOLERANCES["fp32_structural"], f"seed={seed}"


# bf16: the fused program adds the shared experts' output in the grouped GEMMs' fp32 sum instead of as a
# separate bf16 MLP, so a layer's output differs by bf16 rounding, and the next layer's top-k can flip a
# near-tie expert. Measured over 61 seeds (session 15): 54 at 0.53-0.61% relative error, 7 at 1.3-3.2%
# (bimodal: discrete changes, as such a flip makes; seed 1843626246 gave 2.17% and failed the old 2% bound).
# A wrong fusion is far above it: the shared experts' down projection zeroed gave 48% (seed 3).
BF16_FUSED_TOLERANCE = 0.05


def test_bf16_program(seed):
    before, result = fused("prefill", torch.bfloat16)
    assert result.matches == 2
    inputs = step_inputs("prefill", seed, torch.bfloat16)
    for got, want in zip(run(result.program, inputs), run(before, inputs)):
        assert rel_err(got, want) < BF16_FUSED_TOLERANCE, f"seed={seed}"


def test_idempotent():
    _, result = fused("decode")
    again = fuse_shared_experts(result.program, CONFIG)
    assert again.matches == 0 and again.program is result.program


def test_routing_columns_are_the_shared_experts_with_weight_one(seed):
    """The op's routing inputs, evaluated: the top-3 routed experts, then ids E, E+1 with weight 1."""
    _, result = fused("decode")
    gm = result.program.module()
    calls = []

    def spy(x, topk_weights, topk_ids, w13, w2):
        calls.append((topk_weights.clone(), topk_ids.clone()))
        return MOE(x, topk_weights, topk_ids, w13, w2)

    for node in gm.graph.nodes:
        if node.target is MOE:
            node.target = spy
    gm.recompile()
    inputs = step_inputs("decode", seed)
    with torch.no_grad():
        gm(*inputs)
    t = inputs[0].numel()
    assert len(calls) == 2
    for weights, ids in calls:
        assert ids.shape == (t, 5) and torch.equal(ids[:, 3:], torch.tensor([[E, E + 1]]).expand(t, 2))
        assert torch.equal(weights[:, 3:], torch.ones(t, 2)) and (ids[:, :3] < E).all()


# --- fp8 checkpoint: the shared experts cut as stored ---------------------------------------------
@functools.cache
def fp8_fused(moe_inter_dim: int) -> tuple:
    torch.manual_seed(1)
    model = Transformer(ModelArgs.preset("tiny").replace(dtype="fp8", moe_inter_dim=moe_inter_dim)).eval()
    before = rewrite_moe_grouped_gemm(export_step(model, "prefill"), CONFIG).program
    return before, fuse_shared_experts(before, CONFIG)


@pytest.mark.parametrize("inter", [96, 128])
def test_fp8_shared_chunks_are_the_checkpoint_bytes(inter, seed):
    """96: chunks 128 wide (the stack's padded I'), the second only half real; 128: no padding."""
    before, result = fp8_fused(inter)
    assert result.matches == 2 and count(result.program, MOE_FP8) == 2, result.notes
    sd, old = result.program.state_dict, before.state_dict
    width, shared = 128, 2 * inter
    n = -(-shared // width)
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    p = "layers.2.ffn"
    w13, w2, s13, s2 = (sd[f"{p}.{k}"] for k in ("w13", "w2", "w13_scale", "w2_scale"))
    assert w13.shape == (E + n, 2 * width, D) and s13.shape == (E + n, 2, 2) and s2.shape == (E + n, 2, 1)
    w1_old, w3_old, w2_old = (old[f"{p}.shared_experts.{w}.weight"] for w in ("w1", "w3", "w2"))
    for c in range(n):
        real = min(width, shared - c * width)
        rows = slice(c * width, c * width + real)
        assert torch.equal(bits(w13[E + c, :real]), bits(w1_old[rows]))
        assert torch.equal(bits(w13[E + c, width:width + real]), bits(w3_old[rows]))
        assert torch.equal(bits(w2[E + c, :, :real]), bits(w2_old[:, rows]))
        assert not bits(w13[E + c, real:width]).any() and not bits(w2[E + c, :, real:]).any()
        assert torch.equal(s13[E + c, 0], old[f"{p}.shared_experts.w1.scale"][c])
        assert torch.equal(s2[E + c, :, 0], old[f"{p}.shared_experts.w2.scale"][:, c])
    assert _op(result.program, MOE_FP8).args[-1] is False  # still weight-only, as the checkpoint
    inputs = step_inputs("prefill", seed)
    for got, want in zip(run(result.program, inputs), run(before, inputs)):
        assert rel_err(got, want) < TOLERANCES["fp32_structural"], f"seed={seed}"


# --- guards: the layer is left alone, with the reason ---------------------------------------------
def _forward(extra):
    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, self.dim)
        return extra(self, x, self.forward_static(x)).view(shape)
    return forward


GUARDS = {
    "routed output used twice": (lambda m, x, y: y + m.shared_experts(x) + 0.5 * y, "not one add"),
    "shared MLP reads another input": (lambda m, x, y: y + m.shared_experts(x * 2.0), "the shared MLP reads"),
    "no shared MLP": (lambda m, x, y: y + 0.5 * x, "no shared MLP added"),
}


@pytest.mark.parametrize("case", list(GUARDS))
def test_guard(case, seed):
    extra, reason = GUARDS[case]
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny")).eval()
    ffn = model.layers[2].ffn
    ffn.forward = types.MethodType(_forward(extra), ffn)
    before = rewrite_moe_grouped_gemm(export_step(model, "decode"), CONFIG).program
    result = fuse_shared_experts(before, CONFIG)
    assert result.matches == 1, result.notes  # layer 1 fused, layer 2 left alone
    assert any(reason in note for note in result.notes), result.notes
    assert "layers.1.ffn.shared_experts.w1.weight" not in result.program.state_dict
    inputs = step_inputs("decode", seed)
    for got, want in zip(run(result.program, inputs), run(before, inputs)):
        assert rel_err(got, want) < TOLERANCES["fp32_structural"], f"seed={seed}"


def test_after_the_quantizer_the_layer_is_left_alone():
    """Activation-quantized experts are past the point where the shared Linears can join them."""
    program = pipeline.run_pipeline(tiny_program("decode"), PassConfig(precision="fp8"),
                                    passes=["rewrite_moe_grouped_gemm", "quantize_fp8_blockwise"])[0]
    result = fuse_shared_experts(program, PassConfig(precision="fp8"))
    assert result.matches == 0 and result.program is program
    assert sum("already quantized" in n for n in result.notes) == 2, result.notes


def test_pipeline_order():
    names = list(pipeline.PASS_NAMES)
    i = names.index("fuse_shared_experts")
    assert names.index("rewrite_moe_grouped_gemm") < i < names.index("quantize_fp8_blockwise")


def test_16b_meta_two_layers():
    """16b shapes: 2 shared experts of 1408 -> experts 64 and 65 of the stack, no padding."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.preset("16b").replace(n_layers=2))
    program = rewrite_moe_grouped_gemm(export_step(model, "decode"), CONFIG).program
    result = fuse_shared_experts(program, CONFIG)
    assert result.matches == 1
    sd = result.program.state_dict
    assert sd["layers.1.ffn.w13"].shape == (66, 2 * 1408, 2048) and sd["layers.1.ffn.w2"].shape == (66, 2048, 1408)
    assert sd["layers.1.ffn.w13"].device.type == "meta"
