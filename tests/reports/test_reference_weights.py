"""The diff's reference model from a preset must be the engine's model on any device.

build_engine draws a preset's weights on the CPU; a CUDA generator gives other numbers for the same
seed, so a reference drawn on the GPU compared a CUDA engine with another model (seen on the H200:
logits rel. error 1.42 for a correct engine). No GPU here: the device is `meta`, and what is checked
is where the weights were drawn and that they are the CPU draw."""

from __future__ import annotations

import pytest
import torch

from dsv3_export.checkpoint import preset_model
from dsv3_export.checkpoint import presets
from dsv3_export.manifest import Manifest
from dsv3_export.reports.reference import load_reference


def _manifest(seed: int) -> Manifest:
    args = preset_model("tiny", torch.float32, "meta").args
    return Manifest(model=args.to_dict(), backend="onnxruntime", precision="fp32", device="cuda", inputs=[],
                    outputs=[], kv_cache={}, source={"preset": "tiny", "seed": seed})


@pytest.mark.parametrize("seed", [3, 11])
def test_preset_reference_is_drawn_on_the_cpu_then_moved(monkeypatch, seed):
    drawn_on: list[str] = []
    real = presets.preset_model

    def spy(name, dtype=torch.float32, device="cpu", *args, **kwargs):
        drawn_on.append(str(torch.device(device)))
        return real(name, dtype, device, *args, **kwargs)

    monkeypatch.setattr(presets, "preset_model", spy)
    monkeypatch.setattr("dsv3_export.checkpoint.preset_model", spy)
    model, source = load_reference(_manifest(seed), device="meta")
    assert drawn_on == ["cpu"]
    assert model.embed.weight.device.type == "meta"
    assert source == {"preset": "tiny", "seed": seed}
    cpu_model, _ = load_reference(_manifest(seed), device="cpu")
    want = real("tiny", torch.float32, "cpu", seed=seed, attn_impl="absorb").embed.weight
    torch.testing.assert_close(cpu_model.embed.weight, want, rtol=0, atol=0)
