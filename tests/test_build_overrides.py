"""build_engine's config_overrides reach the preset model, every ModelArgs field included."""

from __future__ import annotations

import torch

from dsv3_export.build import BuildOptions, _load_model
from dsv3_export.reference.fp8 import FP8_DTYPE


def test_weight_dtype_override_draws_an_fp8_model():
    """ModelArgs.dtype is also the name of preset_model's compute-dtype argument: the override raised TypeError."""
    options = BuildOptions(preset="tiny", config_overrides=(("dtype", "fp8"), ("n_layers", 1)))
    model, source = _load_model(options, torch.float32)
    assert model.args.dtype == "fp8" and model.args.n_layers == 1
    assert model.layers[0].attn.wkv_b.weight.dtype == FP8_DTYPE
    assert model.embed.weight.dtype == torch.float32
    assert source["dtype"] == "fp8"


def test_the_diffs_reference_of_an_engine_built_with_the_weight_dtype_override_is_that_model():
    """dsv3-export diff draws the engine's recorded preset with its recorded overrides: the `dtype` one raised the
    same TypeError there (dsv3_export/reports/reference.py)."""
    from dsv3_export.manifest import Manifest
    from dsv3_export.reports.reference import load_reference

    options = BuildOptions(preset="tiny", config_overrides=(("dtype", "fp8"), ("n_layers", 1)))
    engine_model, source = _load_model(options, torch.float32)
    manifest = Manifest(model=engine_model.args.to_dict(), backend="onnxruntime", precision="fp8", device="cpu",
                        inputs=[], outputs=[], kv_cache={}, source=source)
    model, recorded = load_reference(manifest)
    assert recorded == {"preset": "tiny", "seed": source["seed"]}
    assert model.args.dtype == "fp8" and model.layers[0].attn.wkv_b.weight.dtype == FP8_DTYPE
    assert torch.equal(model.layers[0].attn.wkv_b.weight.view(torch.uint8),
                       engine_model.layers[0].attn.wkv_b.weight.view(torch.uint8))
