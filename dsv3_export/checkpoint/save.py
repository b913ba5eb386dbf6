"""save_checkpoint: reference Transformer -> checkpoint directory (DeepSeek or HF layout).

Written into a temporary sibling directory and renamed into place, so a reader never sees half a
checkpoint. Large models are split into shards of at most `max_shard_bytes` with an HF-style
model.safetensors.index.json (both layouts load it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv3_export.atomic import atomic_directory
from dsv3_export.checkpoint.errors import CheckpointError
from dsv3_export.checkpoint.hf_config import args_to_hf_config
from dsv3_export.checkpoint.io import INDEX_FILE
from dsv3_export.checkpoint.names import ours_to_hf
from dsv3_export.reference.model import Transformer

LAYOUTS = ("deepseek", "hf")
DEFAULT_SHARD_BYTES = 5 * 2**30
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    tensors = {ours_to_hf(name): t for name, t in model.state_dict().items()}
    if model.args.score_func == "sigmoid" and not model.args.has_gate_bias:
        # HF's V3 router always has a correction bias; zeros reproduce ours (n_groups == 1 checked).
        for i in range(model.args.n_dense_layers, model.args.n_layers):
            tensors[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = torch.zeros(model.args.n_routed_experts)
    return tensors


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_checkpoint(model: Transformer, path: str | Path, layout: str = "deepseek", *,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write config.json + safetensors for `model` at `path`; returns the path.

    layout "deepseek": config.json holds ModelArgs (ModelArgs.from_json reads it), tensors our
    names, single file model0-mp1.safetensors (DeepSeek's generate.py name).
    layout "hf": a transformers DeepseekV2 (softmax routing) or DeepseekV3 (sigmoid) checkpoint
    with per-expert tensors, fp8 weights as weight + weight_scale_inv with quantization_config.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout={layout!r} is not one of {LAYOUTS}")
    if any(t.device.type == "meta" for t in model.state_dict().values()):
        raise CheckpointError("cannot save a model whose weights are on the meta device")
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path}: exists and is not empty (pass overwrite=True to replace it)")
    dense = model.embed.weight.dtype
    if layout == "hf":
        config = args_to_hf_config(model.args, _DTYPE_NAMES.get(dense, str(dense)))
        tensors = _hf_tensors(model)
        single = "model.safetensors"
    else:
        config = model.args.to_dict()
        tensors = dict(model.state_dict())
        single = "model0-mp1.safetensors"
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(tensors, str(tmp / single), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: tensors[n] for n in names}, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({n: file for n in names})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path
