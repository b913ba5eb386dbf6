"""fuse_mla_absorb: fires once per layer, skips what it must, is idempotent, keeps the numbers."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from dsv3_export.passes.base import PassConfig, PassError
from dsv3_export.passes.fuse_mla_absorb import MLA_OP, fuse_mla_absorb
from dsv3_export.passes.graph_utils import count_calls, op_histogram
from dsv3_export.step import absorbed_attention
from tests.conftest import TOLERANCES, rel_err
from tests.passes.tiny_programs import run, step_inputs, tiny_model, tiny_program

aten = torch.ops.aten
ATTENTION_OPS = (aten.einsum.default, aten.masked_fill.Scalar, aten.tril.default, aten.split_with_sizes.default)
KINDS = ("prefill", "decode")
DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_fires_once_per_layer_and_leaves_no_attention_ops(kind, dtype):
    program = tiny_program(kind, dtype)
    n_layers = tiny_model(dtype).args.n_layers
    result = fuse_mla_absorb(program, PassConfig())
    assert result.matches == n_layers
    assert count_calls(result.program.graph, [MLA_OP]) == n_layers
    assert count_calls(result.program.graph, [aten.einsum.default]) == 0  # the model's only einsums are attention's
    assert count_calls(result.program.graph, [aten.masked_fill.Scalar, aten.tril.default]) == 0
    # q/kv projections still split their outputs, the attention split is gone
    assert count_calls(result.program.graph, [aten.split_with_sizes.default]) == \
        count_calls(program.graph, [aten.split_with_sizes.default]) - n_layers
    for node in result.program.graph.nodes:
        if node.target == MLA_OP:
            assert node.meta["val"].dtype == dtype and node.meta["val"].dim() == 4
            assert "nn_module_stack" in node.meta  # provenance copied from the replaced subgraph
    assert count_calls(program.graph, [MLA_OP]) == 0, "the input program must not be modified"


@pytest.mark.parametrize("kind", KINDS)
def test_numerics_populated_cache_and_per_row_positions(kind, seed):
    program = tiny_program(kind)
    fused = fuse_mla_absorb(program, PassConfig()).program
    inputs = step_inputs(kind, seed)
    assert inputs[1].unique().numel() > 1 and inputs[1].max() > 0
    before, after = run(program, inputs), run(fused, inputs)
    for b, a in zip(before, after):
        assert rel_err(a, b) < TOLERANCES["fp32_structural"]


def test_numerics_bf16(seed):
    program = tiny_program("prefill", torch.bfloat16)
    fused = fuse_mla_absorb(program, PassConfig()).program
    inputs = step_inputs("prefill", seed, dtype=torch.bfloat16)
    for b, a in zip(run(program, inputs), run(fused, inputs)):
        assert rel_err(a, b) < TOLERANCES["bf16"]


def test_idempotent():
    once = fuse_mla_absorb(tiny_program("decode"), PassConfig()).program
    twice = fuse_mla_absorb(once, PassConfig(debug=True))
    assert twice.matches == 0
    assert twice.program is once
    assert twice.program.graph_module.code == once.graph_module.code
    assert any("no attention subgraph" in n for n in twice.notes)


def test_result_validates_and_round_trips_through_save(tmp_path):
    fused = fuse_mla_absorb(tiny_program("prefill"), PassConfig()).program
    fused.validate()
    torch.export.save(fused, tmp_path / "fused.pt2")
    loaded = torch.export.load(tmp_path / "fused.pt2")
    assert op_histogram(loaded.graph)["dsv3.mla_attention.default"] == tiny_model().args.n_layers


# --- negative cases: small programs around absorbed_attention ------------------------------------
H, DN, R, C, DV = 3, 8, 6, 10, 5


class Attention(torch.nn.Module):
    """absorbed_attention with wkv_b a parameter (as in the model), or a variant of its math."""

    def __init__(self, dtype=torch.float32, causal_new: bool = True):
        super().__init__()
        self.wkv_b = torch.nn.Parameter(torch.randn(H * (DN + DV), C, dtype=dtype), requires_grad=False)
        self.causal_new = causal_new

    def forward(self, q_nope, q_pe, kv_new, kv_cache, start_pos):
        if self.causal_new:
            return absorbed_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, self.wkv_b, 0.3)
        return _non_causal_variant(q_nope, q_pe, kv_new, kv_cache, start_pos, self.wkv_b, 0.3)


class AttentionWithInputWeight(torch.nn.Module):
    def forward(self, q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b):
        return absorbed_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, 0.3)


def _non_causal_variant(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, scale):
    """Same tail einsum as absorbed_attention, but new positions see each other both ways."""
    w = wkv_b.view(H, -1, C)  # [h, dn + dv, c]
    q = torch.cat([torch.einsum("bshd,hdc->bshc", q_nope, w[:, :DN]), q_pe], dim=-1)  # [b, s, h, c + r]
    scores = torch.einsum("bshk,btk->bsht", q, torch.cat([kv_cache, kv_new], dim=1)) * scale  # [b, s, h, T + s]
    probs = scores.softmax(dim=-1, dtype=torch.float32).type_as(q)
    out = torch.einsum("bsht,btc->bshc", probs, torch.cat([kv_cache, kv_new], dim=1)[..., :C])
    return torch.einsum("bshc,hdc->bshd", out, w[:, DN:])  # [b, s, h, dv]


def _export_attention(module, dtype=torch.float32, start_dtype=torch.int64, weight_input=False):
    b, s, t = 2, 3, 4
    inputs = [torch.randn(b, s, H, DN, dtype=dtype), torch.randn(b, s, H, R, dtype=dtype),
              torch.randn(b, s, C + R, dtype=dtype), torch.randn(b, t, C + R, dtype=dtype),
              torch.tensor([1, 2], dtype=start_dtype)]
    batch, seq, cache = Dim("batch", min=1, max=8), Dim("seq", min=1, max=64), Dim("cache", min=1, max=64)
    dynamic = [{0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: cache}, {0: batch}]
    if weight_input:
        inputs.append(torch.randn(H * (DN + DV), C, dtype=dtype))
        dynamic.append(None)
    return torch.export.export(module, tuple(inputs), dynamic_shapes=tuple(dynamic), strict=False)


def test_standalone_attention_fires():
    result = fuse_mla_absorb(_export_attention(Attention()), PassConfig())
    assert result.matches == 1


def test_program_without_attention_gives_zero_matches_and_a_reason():
    mlp = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU()), (torch.randn(2, 4),))
    result = fuse_mla_absorb(mlp, PassConfig())
    assert result.matches == 0 and result.program is mlp
    assert result.notes == ["no attention subgraph found (already fused, other math, or decomposed IR)"]


def test_different_math_is_a_near_miss_naming_the_node():
    result = fuse_mla_absorb(_export_attention(Attention(causal_new=False)), PassConfig(debug=True))
    assert result.matches == 0
    assert any("einsum" in n and "is not the tail of an attention subgraph" in n for n in result.notes)


@pytest.mark.parametrize("case, reason", [
    ("float64", "unsupported dtype torch.float64"),
    ("int32_start_pos", "start_pos is torch.int32"),
    ("weight_from_input", "wkv_b depends on the user input"),
])
def test_guards_skip_with_a_reason(case, reason):
    if case == "float64":
        program = _export_attention(Attention(torch.float64), dtype=torch.float64)
    elif case == "int32_start_pos":
        program = _export_attention(Attention(), start_dtype=torch.int32)
    else:
        program = _export_attention(AttentionWithInputWeight(), weight_input=True)
    result = fuse_mla_absorb(program, PassConfig(debug=True))
    assert result.matches == 0
    assert result.program is program
    assert any(reason in n for n in result.notes), result.notes


def test_program_without_fake_values_is_a_pass_error_naming_the_node():
    program = _export_attention(Attention())
    q_nope = next(n for n in program.graph.nodes if n.name == "q_nope")
    del q_nope.meta["val"]
    with pytest.raises(PassError) as err:
        fuse_mla_absorb(program, PassConfig())
    assert err.value.pass_name == "fuse_mla_absorb"
    assert err.value.node == "q_nope"
    assert "meta['val']" in str(err.value) and "fuse_mla_absorb" in str(err.value)


def test_fires_on_fp8_checkpoint_weights(seed):
    """An fp8 checkpoint's wkv_b is a dequant subgraph of weights only: still fused, same numbers."""
    from dsv3_export.export import export_step
    from dsv3_export.reference import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny").replace(dtype="fp8")).eval()
    program = export_step(model, "decode")
    result = fuse_mla_absorb(program, PassConfig())
    assert result.matches == model.args.n_layers
    inputs = step_inputs("decode", seed)
    for b, a in zip(run(program, inputs), run(result.program, inputs)):
        assert rel_err(a, b) < TOLERANCES["fp32_structural"]


def test_op_matches_its_reference_body_and_fake(seed):
    gen = torch.Generator().manual_seed(seed)
    b, s, t = 2, 3, 5
    args = (torch.randn(b, s, H, DN, generator=gen), torch.randn(b, s, H, R, generator=gen),
            torch.randn(b, s, C + R, generator=gen), torch.randn(b, t, C + R, generator=gen),
            torch.tensor([0, 4]), torch.randn(H * (DN + DV), C, generator=gen), 0.3)
    out = MLA_OP(*args)
    assert out.shape == (b, s, H, DV)
    assert torch.equal(out, absorbed_attention(*args))
    torch.library.opcheck(MLA_OP, args)  # schema, fake impl, and that the op does not alias its inputs


def test_op_module_that_fails_to_import_is_an_error(monkeypatch):
    import importlib

    import dsv3_export.ops as ops

    real_import = importlib.import_module

    def broken(name, *a, **k):
        if name == "dsv3_export.ops.mla":
            raise RuntimeError("boom")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match="dsv3 op module dsv3_export.ops.mla exists but failed to import: boom"):
        ops._register_all()


def test_naive_formulation_becomes_the_same_op(seed):
    """A naive-mode model exports step.naive_attention (per-head K/V expanded from the latent):
    the same function, so it is fused into the same op (absorbed math, ~1e-7 apart in fp32)."""
    from dsv3_export.export import export_step
    from dsv3_export.reference import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny").replace(attn_impl="naive")).eval()
    program = export_step(model, "decode")
    result = fuse_mla_absorb(program, PassConfig())
    assert result.matches == model.args.n_layers
    assert f"rewritten: {model.args.n_layers} naive" in result.notes
    assert count_calls(result.program.graph, [aten.einsum.default, aten.masked_fill.Scalar]) == 0
    inputs = step_inputs("decode", seed)
    for b, a in zip(run(program, inputs), run(result.program, inputs)):
        assert rel_err(a, b) < TOLERANCES["fp32_structural"]
    assert fuse_mla_absorb(result.program, PassConfig()).matches == 0
