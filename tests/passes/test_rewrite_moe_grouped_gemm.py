"""rewrite_moe_grouped_gemm: fires once per MoE layer, each guard holds, idempotent, exact in fp32.

Numerics: the rewritten program against the program before the pass, on random inputs (fresh
seed), fp32 relative error < 1e-5 (TOLERANCES["fp32_structural"]).
"""

from __future__ import annotations

import functools
import time
import types

import pytest
import torch
import torch.nn.functional as F

import dsv3_export.ops.moe  # noqa: F401
from dsv3_export.export import export_step
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.rewrite_moe_grouped_gemm import rewrite_moe_grouped_gemm
from dsv3_export.reference import ModelArgs, Transformer
from dsv3_export.reference.fp8 import weight_quant
from dsv3_export.reference.moe import MLP
from tests.conftest import TOLERANCES, rel_err
from tests.passes.tiny_programs import run, step_inputs, tiny_model, tiny_program

aten = torch.ops.aten
MOE = torch.ops.dsv3.moe_experts.default
MOE_FP8 = torch.ops.dsv3.moe_experts_fp8.default
CONFIG = PassConfig()


def count(program, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in program.graph.nodes)


def n_moe_layers(args: ModelArgs) -> int:
    return sum(args.is_moe_layer(i) for i in range(args.n_layers))


def prefill_inputs(seed: int, dtype=torch.float32, n_layers: int = 3):
    """Batch 2 x 128 prefill tokens (256 tokens through each MoE), empty cache."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (2, 128), generator=gen)
    return tokens, torch.zeros(2, dtype=torch.int64), torch.zeros(2, n_layers, 1, 80, dtype=dtype)


@functools.cache
def rewritten(kind: str) -> tuple:
    program = tiny_program(kind)
    return program, rewrite_moe_grouped_gemm(program, CONFIG)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_fires_once_per_moe_layer(kind):
    program, result = rewritten(kind)
    args = tiny_model().args
    assert result.matches == n_moe_layers(args) == 2
    new = result.program
    assert count(new, MOE) == 2
    assert count(program, aten.scatter.src) == 2 and count(new, aten.scatter.src) == 0
    assert count(new, aten.silu.default) == count(program, aten.silu.default) - 2 * args.n_routed_experts
    names = set(new.state_dict)
    assert not any(".experts." in n for n in names)
    assert {"layers.1.ffn.shared_experts.w1.weight", "layers.1.ffn.gate.weight"} <= names  # left alone
    E, I, D = args.n_routed_experts, args.moe_inter_dim, args.dim
    for layer in (1, 2):
        w13, w2 = new.state_dict[f"layers.{layer}.ffn.w13"], new.state_dict[f"layers.{layer}.ffn.w2"]
        assert w13.shape == (E, 2 * I, D) and w2.shape == (E, D, I)
        for e in (0, E - 1):
            expert = program.state_dict
            torch.testing.assert_close(w13[e, :I], expert[f"layers.{layer}.ffn.experts.{e}.w1.weight"], rtol=0, atol=0)
            torch.testing.assert_close(w13[e, I:], expert[f"layers.{layer}.ffn.experts.{e}.w3.weight"], rtol=0, atol=0)
            torch.testing.assert_close(w2[e], expert[f"layers.{layer}.ffn.experts.{e}.w2.weight"], rtol=0, atol=0)
    # the op node keeps the MoE's module path (debug dumps group by it)
    op = next(n for n in new.graph.nodes if n.target is MOE)
    assert list(op.meta["nn_module_stack"].values())[-1][0] == "layers.1.ffn"


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_numerics_fp32(kind, seed):
    program, result = rewritten(kind)
    for inputs in (step_inputs(kind, seed), prefill_inputs(seed) if kind == "prefill" else step_inputs(kind, seed + 1, batch=4)):
        before, after = run(program, inputs), run(result.program, inputs)
        for a, b in zip(after, before):
            assert rel_err(a, b) < TOLERANCES["fp32_structural"], f"seed={seed}"


def test_idempotent():
    _, result = rewritten("decode")
    again = rewrite_moe_grouped_gemm(result.program, CONFIG)
    assert again.matches == 0 and again.program is result.program


def test_op_matches_the_reference_moe_loop(seed):
    """dsv3::moe_experts == DeepSeek's eager per-expert loop (forward_loop), both CPU paths."""
    moe = tiny_model().layers[1].ffn
    x = torch.randn(37, moe.dim, generator=torch.Generator().manual_seed(seed))
    weights, indices = moe.gate(x)
    w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in moe.experts])
    w2 = torch.stack([e.w2.weight for e in moe.experts])
    expected = moe.forward_loop(x)
    assert rel_err(torch.ops.dsv3.moe_experts(x, weights, indices, w13, w2), expected) < 1e-6
    # D = 190: 760-byte rows are not 16-byte multiples -> the Python loop instead of _grouped_mm
    got = torch.ops.dsv3.moe_experts(x[:, :190], weights, indices, w13[..., :190].contiguous(), w2[:, :190].contiguous())
    ref = sum(F.linear(F.silu(x[:, :190] @ w13[e, :96, :190].T) * (x[:, :190] @ w13[e, 96:, :190].T), w2[e, :190])
              * torch.where(indices == e, weights, 0).sum(-1, keepdim=True) for e in range(w13.shape[0]))
    assert rel_err(got, ref) < 1e-6


def test_bf16_program(seed):
    program = tiny_program("prefill", torch.bfloat16)
    result = rewrite_moe_grouped_gemm(program, CONFIG)
    assert result.matches == 2
    inputs = prefill_inputs(seed, torch.bfloat16)
    for a, b in zip(run(result.program, inputs), run(program, inputs)):
        assert rel_err(a, b) < TOLERANCES["bf16"]


# --- fp8 checkpoint: experts stacked as they are -------------------------------------------------
@functools.cache
def fp8_programs():
    torch.manual_seed(1)
    model = Transformer(ModelArgs.preset("tiny").replace(dtype="fp8")).eval()
    program = export_step(model, "prefill")
    return program, rewrite_moe_grouped_gemm(program, CONFIG)


def test_fp8_experts_are_stacked_bit_identical(seed):
    program, result = fp8_programs()
    assert result.matches == 2 and count(result.program, MOE_FP8) == 2 and count(result.program, MOE) == 0
    op = next(n for n in result.program.graph.nodes if n.target is MOE_FP8)
    assert op.args[-1] is False  # weight-only: the checkpoint's semantics
    sd, old = result.program.state_dict, program.state_dict
    I, padded = 96, 128  # moe_inter_dim 96 is padded to one 128-row block per half
    w13, w2 = sd["layers.2.ffn.w13"], sd["layers.2.ffn.w2"]
    assert w13.dtype == torch.float8_e4m3fn and w13.shape == (8, 2 * padded, 192) and w2.shape == (8, 192, padded)
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    for e in range(8):
        p = f"layers.2.ffn.experts.{e}"
        assert torch.equal(bits(w13[e, :I]), bits(old[f"{p}.w1.weight"]))
        assert torch.equal(bits(w13[e, padded:padded + I]), bits(old[f"{p}.w3.weight"]))
        assert torch.equal(bits(w2[e, :, :I]), bits(old[f"{p}.w2.weight"]))
        assert not bits(w13[e, I:padded]).any() and not bits(w2[e, :, I:]).any()
        assert torch.equal(sd["layers.2.ffn.w13_scale"][e], torch.cat([old[f"{p}.w1.scale"], old[f"{p}.w3.scale"]]))
        assert torch.equal(sd["layers.2.ffn.w2_scale"][e], old[f"{p}.w2.scale"])
    inputs = prefill_inputs(seed)
    for a, b in zip(run(result.program, inputs), run(program, inputs)):
        assert rel_err(a, b) < TOLERANCES["fp32_structural"], f"seed={seed}"


# --- guards: each near-miss leaves its layer alone and says why ----------------------------------
def _export_two_layer_moe(patch) -> "torch.export.ExportedProgram":
    """1 dense + 2 MoE layers; `patch(model)` alters layer 2's MoE only."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny")).eval()
    patch(model)
    return export_step(model, "decode")


def _static_with_extra(extra):
    def forward_static(self, x):
        weights, indices = self.gate(x)
        routing = torch.zeros(x.size(0), self.n_routed_experts, dtype=x.dtype, device=x.device)
        routing = routing.scatter(1, indices, weights)  # [T, E]
        y = torch.zeros_like(x)
        partial = None
        for i, expert in enumerate(self.experts):
            y = y + expert(x) * routing[:, i, None]
            if i == 3:
                partial = y
        return extra(y, routing, partial)
    return forward_static


def _static_column_reused(self, x):
    weights, indices = self.gate(x)
    routing = torch.zeros(x.size(0), self.n_routed_experts, dtype=x.dtype, device=x.device)
    routing = routing.scatter(1, indices, weights)  # [T, E]
    y = torch.zeros_like(x)
    for i, expert in enumerate(self.experts):
        column = routing[:, i, None]  # [T, 1]
        y = y + expert(x) * column
        if i == 2:
            y = y + 0.25 * column  # column 2 also read outside its expert
    return y


GUARDS = {
    "routing column used elsewhere": (
        lambda m: setattr(m.layers[2].ffn, "forward_static", types.MethodType(_static_column_reused, m.layers[2].ffn)),
        "routing column 2 used elsewhere"),
    "routing used elsewhere": (
        lambda m: setattr(m.layers[2].ffn, "forward_static", types.MethodType(
            _static_with_extra(lambda y, r, p: y + r.sum(-1, keepdim=True)), m.layers[2].ffn)),
        "routing matrix also used by"),
    "partial sum used elsewhere": (
        lambda m: setattr(m.layers[2].ffn, "forward_static", types.MethodType(
            _static_with_extra(lambda y, r, p: y + 0.5 * p), m.layers[2].ffn)),
        "partial sum of experts"),
    "experts of different shapes": (
        lambda m: m.layers[2].ffn.experts.__setitem__(5, _random_mlp(m.args.dim, 64)),
        "experts of different shapes"),
}


def _random_mlp(dim: int, inter: int, fp8: bool = False) -> MLP:
    mlp = MLP(dim, inter, fp8=fp8)
    for lin in (mlp.w1, mlp.w2, mlp.w3):
        dense = torch.randn(lin.weight.shape) * lin.in_features**-0.5
        if fp8:
            lin.weight.data, lin.scale.data = weight_quant(dense)
        else:
            lin.weight.data = dense
    return mlp


@pytest.mark.parametrize("case", list(GUARDS))
def test_guard(case, seed):
    patch, reason = GUARDS[case]
    program = _export_two_layer_moe(patch)
    result = rewrite_moe_grouped_gemm(program, CONFIG)
    assert result.matches == 1, result.notes  # layer 1 still rewritten, layer 2 not
    assert any(reason in note for note in result.notes), result.notes
    assert count(result.program, MOE) == 1 and count(result.program, aten.scatter.src) == 1
    assert any(n.startswith("layers.2.ffn.experts.") for n in result.program.state_dict)
    assert not any(n.startswith("layers.1.ffn.experts.") for n in result.program.state_dict)
    inputs = step_inputs("decode", seed)
    for a, b in zip(run(result.program, inputs), run(program, inputs)):
        assert rel_err(a, b) < TOLERANCES["fp32_structural"]


def test_guard_mixed_fp8_and_dense_experts():
    def patch(model):
        model.layers[2].ffn.experts[0] = _random_mlp(model.args.dim, model.args.moe_inter_dim, fp8=True)
    result = rewrite_moe_grouped_gemm(_export_two_layer_moe(patch), CONFIG)
    assert result.matches == 1 and any("mix dense and fp8" in n for n in result.notes), result.notes


# --- 16b shapes on the meta device ----------------------------------------------------------------
def _meta_16b(n_layers: int):
    with torch.device("meta"):
        model = Transformer(ModelArgs.preset("16b").replace(n_layers=n_layers))
    return export_step(model, "decode")


def _check_16b(n_layers: int):
    program = _meta_16b(n_layers)
    start = time.perf_counter()
    result = rewrite_moe_grouped_gemm(program, CONFIG)
    seconds = time.perf_counter() - start
    print(f"16b meta, {n_layers} layers, {len(program.graph.nodes)} nodes: rewrite {seconds:.2f} s -> "
          f"{len(result.program.graph.nodes)} nodes")
    assert result.matches == n_layers - 1 == count(result.program, MOE)
    w13 = result.program.state_dict["layers.1.ffn.w13"]
    assert w13.device.type == "meta" and w13.shape == (64, 2 * 1408, 2048)
    assert not any(".experts." in n for n in result.program.state_dict)
    return seconds


def test_16b_meta_two_layers():
    _check_16b(2)

