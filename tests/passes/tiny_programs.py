"""Tiny-preset models and exported programs shared by the pass tests (exported once per process)."""

from __future__ import annotations

import functools

import torch
from torch.export import ExportedProgram

from dsv3_export.export import export_step
from dsv3_export.reference import ModelArgs, Transformer

MODEL_SEED = 0


@functools.cache
def tiny_model(dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(MODEL_SEED)
    return Transformer(ModelArgs.preset("tiny"), dtype=dtype).eval()


@functools.cache
def tiny_program(kind: str, dtype: torch.dtype = torch.float32) -> ExportedProgram:
    """Do not mutate: shared between tests (passes return new programs)."""
    return export_step(tiny_model(dtype), kind)


def step_inputs(kind: str, seed: int, dtype: torch.dtype = torch.float32, batch: int = 3, seqlen: int = 5,
                cache_len: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random tokens, distinct non-zero start positions per row, and a populated cache.

    Sizes are not powers of two, and not the sizes the programs were traced with.
    """
    args = tiny_model(dtype).args
    gen = torch.Generator().manual_seed(seed)
    s = 1 if kind == "decode" else seqlen
    tokens = torch.randint(0, args.vocab_size, (batch, s), generator=gen)
    start_pos = torch.tensor([0, cache_len // 2, cache_len][:batch] + [1] * max(0, batch - 3))
    width = args.kv_lora_rank + args.qk_rope_head_dim
    kv_cache = torch.randn(batch, args.n_layers, cache_len, width, generator=gen).to(dtype)
    return tokens, start_pos, kv_cache


def run(program: ExportedProgram, inputs) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(program.module()(*inputs))

