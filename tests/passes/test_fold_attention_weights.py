"""fold_attention_weights: an fp8 checkpoint's wkv_b dequantization leaves the step, exactly.

The tiny preset with fp8 weights (as DeepSeek's checkpoints store them): the exported step
dequantizes each layer's wkv_b (e4m3 + 128x128 scales; 256 x 64, ragged against the 128 block)
on every call. After the pass, each of the 3 dsv3::mla_attention nodes reads a parameter, the
dequantization ops are gone, and the outputs are bit-identical (the fold runs the same ATen ops
on the same tensors, on the same device).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dsv3_export.checkpoint import preset_model
from dsv3_export.export import export_step
from dsv3_export.passes import pipeline
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.fold_attention_weights import MLA, WKV_B_ARG, fold_attention_weights
from tests.passes.tiny_programs import run, step_inputs, tiny_program

FP8 = torch.float8_e4m3fn


@functools.cache
def absorbed(kind: str, weights: str):
    """The tiny step after fuse_mla_absorb, with fp8 (checkpoint) or bf16 weights, bf16 compute."""
    if weights == "fp8":
        program = export_step(preset_model("tiny", torch.bfloat16, seed=0, weight_dtype="fp8"), kind)
    else:
        program = tiny_program(kind, torch.bfloat16)
    return pipeline.run_pipeline(program, PassConfig(precision="bf16"), passes=["fuse_mla_absorb"])[0]


def wkv_b_inputs(program) -> list[torch.fx.Node]:
    return [n.args[WKV_B_ARG] for n in program.graph.nodes if n.op == "call_function" and n.target is MLA]


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_folds_fp8_wkv_b_bit_exactly(kind, seed):
    program = absorbed(kind, "fp8")
    before = wkv_b_inputs(program)
    assert len(before) == 3 and all(n.op == "call_function" for n in before)  # computed every step
    result = fold_attention_weights(program, PassConfig(precision="bf16"))
    assert result.matches == 3, result.notes
    after = wkv_b_inputs(result.program)
    assert all(n.op == "placeholder" for n in after)
    sd = result.program.state_dict
    for i in range(3):
        folded = sd[f"layers.{i}.attn.wkv_b.folded"]
        assert folded.dtype == torch.bfloat16 and folded.shape == (4 * (32 + 32), 64)
        assert f"layers.{i}.attn.wkv_b.weight" not in sd and f"layers.{i}.attn.wkv_b.scale" not in sd
    assert not any(t.dtype == FP8 and t.shape == (256, 64) for t in sd.values())
    inputs = step_inputs(kind, seed, torch.bfloat16)
    for got, want in zip(run(result.program, inputs), run(program, inputs)):
        assert torch.equal(got, want), f"seed={seed}: max diff {(got.float() - want.float()).abs().max()}"


def test_dense_wkv_b_is_left_alone():
    result = fold_attention_weights(absorbed("decode", "bf16"), PassConfig(precision="bf16"))
    assert result.matches == 0 and "already a parameter" in result.notes[0]


def test_in_the_pipeline_after_the_attention_fusion():
    names = pipeline.PASS_NAMES
    order = [names.index(n) for n in ("fuse_mla_absorb", "fold_attention_weights", "quantize_fp8_blockwise")]
    assert order == sorted(order)


def test_second_run_finds_nothing_left():
    once = fold_attention_weights(absorbed("decode", "fp8"), PassConfig(precision="bf16")).program
    again = fold_attention_weights(once, PassConfig(precision="bf16"))
    assert again.matches == 0 and "already a parameter" in again.notes[0]


class _Attention(torch.nn.Module):
    """One dsv3::mla_attention whose wkv_b is computed from weights only, or also from an input or a
    buffer the step mutates (h=4, dn=16, dv=12, c=40, r=8)."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source
        self.w = torch.nn.Parameter(torch.randn(4 * (16 + 12), 40), requires_grad=False)
        self.s = torch.nn.Parameter(torch.rand(1, 40) + 0.5, requires_grad=False)
        self.register_buffer("steps", torch.ones(1))

    def forward(self, q_nope, q_pe, kv_new, kv_cache, start_pos):
        wkv_b = self.w * self.s
        if self.source == "input":
            wkv_b = wkv_b * q_nope.mean()
        elif self.source == "buffer":
            wkv_b = wkv_b * self.steps
            self.steps.add_(1)
        return torch.ops.dsv3.mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, 0.25)


@pytest.mark.parametrize("source,folds", [("weights", True), ("input", False), ("buffer", False)])
def test_folds_only_what_cannot_change_between_steps(source, folds, seed):
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(2, 1, 4, 16, generator=g), torch.randn(2, 1, 4, 8, generator=g),
            torch.randn(2, 1, 48, generator=g), torch.randn(2, 7, 48, generator=g), torch.tensor([3, 7]))
    program = torch.export.export(_Attention(source), args, strict=False)
    result = fold_attention_weights(program, PassConfig(precision="fp32"))
    assert result.matches == int(folds), result.notes
    if not folds:
        assert {"input": "reads the input", "buffer": "which the step updates"}[source] in result.notes[0]
        return
    assert "w" not in result.program.state_dict and "s" not in result.program.state_dict
    fresh = _Attention(source)
    fresh.load_state_dict({"w": program.state_dict["w"], "s": program.state_dict["s"], "steps": torch.ones(1)})
    want = fresh(*args)
    assert torch.equal(result.program.module()(*args), want)
