"""preset_model: a named ModelArgs preset with seeded random weights, leaving the caller's RNG alone."""

from __future__ import annotations

from typing import Any

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
