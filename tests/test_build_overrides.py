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
