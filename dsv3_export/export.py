"""torch.export of a reference Transformer into ATen-level programs for prefill and decode.

Both programs trace LatentCacheStep (see step.py for the signature and why the cache is an
explicit input/output). The MoE is traced in its shape-static form (the eager loop is
data-dependent and cannot be exported). Dynamic dims: batch (1..max_batch_size), cache length
(1..max_seq_len) and, for prefill, sequence length; decode has s = 1.

Works on the meta device: a model built under `torch.device("meta")` exports without any weight
being materialized (the 16b preset in well under a minute, see tests/test_export.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.export import Dim, ExportedProgram

from dsv3_export.reference.moe import MoE
from dsv3_export.reference.model import Transformer
from dsv3_export.step import LatentCacheStep, empty_cache

PROGRAM_KINDS = ("prefill", "decode")
INPUT_NAMES = ("tokens", "start_pos", "kv_cache")
OUTPUT_NAMES = ("logits", "new_kv")


@contextlib.contextmanager
def static_moe(model: Transformer) -> Iterator[None]:
    """Temporarily switch every MoE layer to its exportable static form."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [m.moe_impl for m in moes]
    for m in moes:
        m.moe_impl = "static"
    try:
        yield
    finally:
        for m, impl in zip(moes, saved):
            m.moe_impl = impl


def example_inputs(model: Transformer, kind: str, batch: int = 2, seqlen: int = 3,
                   cache_len: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs for tracing. Batch >= 2 and distinct sizes keep torch.export from specializing."""
    if kind not in PROGRAM_KINDS:
        raise ValueError(f"unknown program kind {kind!r}; kinds: {PROGRAM_KINDS}")
    args = model.args
    device = model.embed.weight.device
    s = 1 if kind == "decode" else seqlen
    tokens = torch.zeros(batch, s, dtype=torch.int64, device=device)
    start_pos = torch.zeros(batch, dtype=torch.int64, device=device)
    cache = empty_cache(args, batch, cache_len, model.dtype, device)
    return tokens, start_pos, cache


def dynamic_shapes(model: Transformer, kind: str) -> dict[str, dict[int, Dim]]:
    args = model.args
    batch = Dim("batch", min=1, max=args.max_batch_size)
    cache_len = Dim("cache_len", min=1, max=args.max_seq_len)
    tokens = {0: batch}
    if kind == "prefill":
        tokens[1] = Dim("seq", min=1, max=args.max_seq_len)
    return {"tokens": tokens, "start_pos": {0: batch}, "kv_cache": {0: batch, 2: cache_len}}


def export_step(model: Transformer, kind: str, step_factory=LatentCacheStep) -> ExportedProgram:
    """Export one step program ("prefill" or "decode") of `model` (ATen IR, not yet decomposed).

    step_factory: the step module's class (debug_step.DebugLatentCacheStep adds per-stage outputs)."""
    step = step_factory(model).eval()
    inputs = example_inputs(model, kind)
    with static_moe(model), torch.no_grad():
        return torch.export.export(step, inputs, dynamic_shapes=dynamic_shapes(model, kind), strict=False)


@dataclass
class ExportedModel:
    """The programs of one model, by kind, and the model they came from."""

    model: Transformer
    programs: dict[str, ExportedProgram]


def export_model(model: Transformer, kinds: tuple[str, ...] = PROGRAM_KINDS) -> ExportedModel:
    return ExportedModel(model=model, programs={kind: export_step(model, kind) for kind in kinds})
