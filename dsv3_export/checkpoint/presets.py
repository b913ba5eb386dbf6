"""preset_model: a named ModelArgs preset with seeded random weights, leaving the caller's RNG alone;
preset_model_from: the same, from the overrides a build records."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.model import Transformer


def preset_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0, weight_dtype: str | None = None, **overrides: Any) -> Transformer:
    """Transformer(ModelArgs.preset(name).replace(**overrides)) with weights drawn under `seed`.

    dtype is the compute dtype; weight_dtype ("bf16" | "fp8") overrides ModelArgs.dtype, whose
    name the compute dtype argument already takes.

    The weights are drawn on `device` directly (no CPU copy of a large model), so the same seed
    gives the same weights on the same device type; the global RNG state is restored afterwards.
    """
    if weight_dtype is not None:
        overrides["dtype"] = weight_dtype
    args = ModelArgs.preset(name).replace(**overrides)
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.manual_seed(seed)
        with device:
            model = Transformer(args, dtype=dtype)
    return model.eval()


def preset_model_from(name: str, dtype: torch.dtype, device: str | torch.device, seed: int,
                      overrides: Mapping[str, Any], **kwargs: Any) -> Transformer:
    """preset_model with ModelArgs overrides as a build records them (--config overrides, the manifest's source):
    a `dtype` among them is ModelArgs.dtype, the weights' storage ("bf16" | "fp8"), i.e. preset_model's
    weight_dtype; passed through **overrides it collided with the compute dtype ("got multiple values")."""
    rest = {k: v for k, v in overrides.items() if k != "dtype"}
    return preset_model(name, dtype, device, seed=seed, weight_dtype=overrides.get("dtype"), **kwargs, **rest)
