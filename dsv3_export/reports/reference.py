"""The reference side of `diff`: the eager reference model, its per-stage outputs and greedy tokens.

    model, source = load_reference(manifest, checkpoint=None, preset=None, seed=None, device="cpu")
    logits, hidden = reference_stages(model, tokens)   # [b, s, V], [b, L + 2, s, dim] (CPU, float32)
    ids = reference_generate(model, prompts, 16)       # greedy, with the model's own KV cache

The reference runs in float32 (whatever the engine's precision: the gap to an fp32 model is what
the tolerance table bounds) with the eager MoE loop, i.e. DeepSeek's own computation. Stage
outputs come from forward hooks on the modules debug_step.stage_names names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsv3_export.debug_step import stage_names
from dsv3_export.manifest import Manifest
from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.model import Transformer

# Runtime settings that may differ between an engine's config and its source's.
RUNTIME_KEYS = ("max_batch_size", "max_seq_len", "attn_impl")


class ReferenceError(ValueError):
    """The reference cannot be compared with the engine (missing, or another model)."""


def load_reference(manifest: Manifest, checkpoint: Path | None = None, preset: str | None = None,
                   seed: int | None = None, device: str = "cpu",
                   max_batch_size: int | None = None) -> tuple[Transformer, dict[str, Any]]:
    """The reference: --reference CHECKPOINT, --preset NAME, or (neither) the engine's recorded source.

    max_batch_size: rows the reference runs at once (its KV-cache buffers are allocated for
    max_batch_size x max_seq_len: 2 GB per row for the 16b model in fp32). max_seq_len stays the
    engine's, since it switches YaRN on or off. A preset's weights are drawn on the CPU whatever
    `device` is (as the build drew them), so the host holds the fp32 model once (16b: ~62 GB)."""
    if checkpoint is not None and preset is not None:
        raise ReferenceError("give only one of --reference and --preset")
    source = manifest.source
    if checkpoint is None and preset is None:
        if "checkpoint" in source:
            checkpoint = Path(source["checkpoint"])
        elif "preset" in source:
            preset = source["preset"]
            seed = int(source.get("seed", 0)) if seed is None else seed
        else:
            raise ReferenceError("the engine's manifest records no source; pass --reference CHECKPOINT or --preset NAME")
    rows = manifest.model["max_batch_size"]
    rows = rows if max_batch_size is None else min(max_batch_size, rows)
    runtime = {"max_batch_size": rows, "max_seq_len": manifest.model["max_seq_len"]}
    if checkpoint is not None:
        return _checkpoint_reference(Path(checkpoint), manifest, device, runtime)
    return _preset_reference(preset, 0 if seed is None else seed, manifest, device, runtime)


def _checkpoint_reference(checkpoint: Path, manifest: Manifest, device: str,
                          runtime: dict[str, Any]) -> tuple[Transformer, dict[str, Any]]:
    """The checkpoint's config is checked against the engine's model before any weight is read
    (a 16b checkpoint against a tiny engine would otherwise load tens of GB first)."""
    from dsv3_export.checkpoint import load_args, load_checkpoint

    if not checkpoint.is_dir():
        raise ReferenceError(f"reference checkpoint {checkpoint}: not a directory")
    args = load_args(checkpoint, runtime["max_seq_len"])
    check_same_model(args.to_dict(), manifest.model)
    model = load_checkpoint(checkpoint, torch.float32, device, attn_impl="absorb", **runtime)
    return model, {"checkpoint": str(checkpoint.absolute())}


def _preset_reference(preset: str, seed: int, manifest: Manifest, device: str,
                      runtime: dict[str, Any]) -> tuple[Transformer, dict[str, Any]]:
    """The preset's ModelArgs are checked against the engine's model before its weights are drawn
    (drawing the 16b preset for a tiny engine was OOM-killed before the mismatch was seen)."""
    from dsv3_export.checkpoint.presets import preset_model_from
    from dsv3_export.reports.debug_engine import preset_overrides

    source = manifest.source
    if source.get("preset") == preset:  # the engine's own preset: its config overrides too (e.g. n_layers)
        runtime = {**preset_overrides(source), **runtime}
    args = ModelArgs.preset(preset).replace(attn_impl="absorb", **runtime)
    check_same_model(args.to_dict(), manifest.model)
    # Drawn on the CPU, as build_engine draws a preset's weights, then moved: the same seed
    # gives other numbers on a CUDA generator, i.e. another model than the engine's.
    model = preset_model_from(preset, torch.float32, "cpu", seed, runtime, attn_impl="absorb").to(device)
    return model, {"preset": preset, "seed": seed}


def check_same_model(ref: dict[str, Any], engine: dict[str, Any]) -> None:
    differ = sorted(k for k in set(ref) | set(engine) if k not in RUNTIME_KEYS and ref.get(k) != engine.get(k))
    if differ:
        shown = ", ".join(f"{k}: reference {ref.get(k)!r} vs engine {engine.get(k)!r}" for k in differ[:6])
        raise ReferenceError(f"the reference is another model than the engine's ({shown})")


@torch.no_grad()
def reference_stages(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, s] -> logits [b, s, V], hidden [b, L + 2, s, dim] (float32 CPU), from position 0."""
    names = stage_names(model.args.n_layers)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out.detach()))
               for n in names]
    try:
        device = model.embed.weight.device
        logits = model(tokens.to(device), start_pos=0)
    finally:
        for h in handles:
            h.remove()
    hidden = torch.stack([captured[n].float().cpu() for n in names], dim=1)  # [b, L + 2, s, dim]
    return logits.float().cpu(), hidden


@torch.no_grad()
def reference_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens after each prompt (one prompt at a time, through the model's own KV cache)."""
    device = model.embed.weight.device
    out: list[list[int]] = []
    for prompt in prompts:
        tokens = torch.tensor([prompt], dtype=torch.int64, device=device)  # [1, s]
        logits = model(tokens, start_pos=0)
        ids = []
        pos = len(prompt)
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)  # [1]
            ids.append(int(token))
            if step == max_new_tokens - 1:
                break
            logits = model(token[:, None], start_pos=pos)
            pos += 1
        out.append(ids)
    return out
