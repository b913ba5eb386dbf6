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
from typing import Iterator, NamedTuple

import torch
from torch.export import Dim, ExportedProgram

from dsv3_export.reference.args import ConfigError, ModelArgs
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


class TuneShape(NamedTuple):
    """The sizes a program is exported with, and so the sizes every kernel of an AOTInductor package
    is tuned at: AOTInductor's compile-time autotuning runs the program once on the export's example
    inputs and bakes one config per kernel into the package for every batch and cache length
    (TensorRT's "opt" shape of an optimization profile).

    batch: rows; seqlen: new tokens per row (decode: 1); cache_len: cache positions, all of them
    visible to decode (start_pos = cache_len), none to prefill (start_pos = 0)."""

    batch: int
    seqlen: int
    cache_len: int


# The default sizes: a full batch over a long cache for decode, a prompt of DEFAULT_TUNE_TOKENS for prefill,
# capped by the model's limits. Before, every program was exported (so tuned) at batch 2 over a cache of 5,
# where all configs time alike. H200, session 11, 4-layer 16b fp8 decode: one build tuned at 64 x 1024 ran
# batch 1 / 8 / 64 at 0.56 / 0.77 / 1.27 ms; five builds whose kernels kept configs timed at 2 x 5 ran
# 0.56-0.61 / 0.77-0.84 / 1.37-1.44 (one build each; the 64 x 1024 one on a later lease).
DEFAULT_TUNE_BATCH = 64
DEFAULT_TUNE_TOKENS = 1024
# The sizes that fill what the caller leaves open where they are not tuned over: prefill's cache (a prompt at
# start_pos 0 sees none of it) and a batch-2 prefill (torch.export specializes a batch of 1).
PREFILL_CACHE_LEN = 5
PREFILL_BATCH = 2


def default_tune_shape(args: ModelArgs, kind: str) -> TuneShape:
    """DEFAULT_TUNE_BATCH rows over a cache of DEFAULT_TUNE_TOKENS (decode) or prompts of that many tokens
    (prefill), within max_batch_size and half of max_seq_len; no two dynamic sizes equal."""
    tokens = max(3, min(DEFAULT_TUNE_TOKENS, args.max_seq_len // 2))
    if kind == "decode":
        batch = max(2, min(DEFAULT_TUNE_BATCH, args.max_batch_size))
        return TuneShape(batch, 1, tokens + (tokens == batch))
    cache_len = PREFILL_CACHE_LEN + (PREFILL_CACHE_LEN == tokens)
    return TuneShape(PREFILL_BATCH, tokens, cache_len)


def tune_shape(args: ModelArgs, kind: str, batch: int | None = None, seqlen: int | None = None,
               cache_len: int | None = None) -> TuneShape:
    """default_tune_shape(args, kind) with the given sizes, checked against the program's dynamic dims
    (ConfigError: a ValueError that names every problem)."""
    if kind not in PROGRAM_KINDS:
        raise ValueError(f"unknown program kind {kind!r}; kinds: {PROGRAM_KINDS}")
    base = default_tune_shape(args, kind)
    given = TuneShape(batch, seqlen, cache_len)  # None: the default's (0 is a size, refused below, not a default)
    shape = TuneShape(*(base_size if size is None else size for size, base_size in zip(given, base)))
    problems = []
    if not 2 <= shape.batch <= args.max_batch_size:
        problems.append(f"batch {shape.batch} is not in [2, max_batch_size={args.max_batch_size}] "
                        "(torch.export specializes a batch of 1)")
    if kind == "decode" and shape.seqlen != 1:
        problems.append(f"decode has one new token per row, not seqlen {shape.seqlen}")
    if kind == "prefill" and not 2 <= shape.seqlen <= args.max_seq_len:
        problems.append(f"prefill seqlen {shape.seqlen} is not in [2, max_seq_len={args.max_seq_len}]")
    # decode attends to all cache_len positions plus the new token, at position cache_len
    last = shape.cache_len + (shape.seqlen if kind == "decode" else 0)
    if not 2 <= shape.cache_len or last > args.max_seq_len:
        problems.append(f"cache_len {shape.cache_len} is not in [2, {args.max_seq_len - (kind == 'decode')}] "
                        f"(max_seq_len={args.max_seq_len})")
    dynamic = [shape.batch, shape.cache_len] + ([shape.seqlen] if kind == "prefill" else [])
    if len(set(dynamic)) < len(dynamic):
        problems.append(f"the dynamic sizes {dynamic} (batch, cache_len{', seqlen' if kind == 'prefill' else ''}) "
                        "must differ (torch.export would take equal sizes for one symbol)")
    if problems:
        raise ConfigError(f"{kind} tune shape {tuple(shape)}: " + "; ".join(problems))
    return shape


# The sizes a user gives per program (the rest follow from the program): build --tune-decode BATCH,CACHE_LEN and
# --tune-prefill BATCH,SEQLEN, benchmarks/torch_16b.py the same.
TUNE_FIELDS = {"decode": ("batch", "cache_len"), "prefill": ("batch", "seqlen")}


def parse_tune_sizes(kind: str, text: str) -> dict[str, int]:
    """'64,1024' -> {"batch": 64, "cache_len": 1024} for decode (TUNE_FIELDS); ValueError naming the form."""
    fields = TUNE_FIELDS[kind]
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(fields) or not all(p.isdigit() for p in parts):
        raise ValueError(f"{text!r}: give {','.join(f.upper() for f in fields)} as {len(fields)} integers, "
                         "e.g. 64,1024")
    return dict(zip(fields, map(int, parts)))


def example_inputs(model: Transformer, kind: str, shape: TuneShape | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs for tracing at `shape` (default: default_tune_shape). Random token ids (fixed seed): the
    MoE routes them to different experts, as real batches are, where equal ids would all pick the
    same experts for the autotuner's run."""
    args = model.args
    shape = shape or default_tune_shape(args, kind)
    device = model.embed.weight.device
    ids = torch.Generator().manual_seed(0)
    tokens = torch.randint(args.vocab_size, (shape.batch, shape.seqlen), generator=ids).to(device)
    first = shape.cache_len if kind == "decode" else 0
    start_pos = torch.full((shape.batch,), first, dtype=torch.int64, device=device)
    cache = empty_cache(args, shape.batch, shape.cache_len, model.dtype, device)
    return tokens, start_pos, cache


def dynamic_shapes(model: Transformer, kind: str) -> dict[str, dict[int, Dim]]:
    args = model.args
    batch = Dim("batch", min=1, max=args.max_batch_size)
    cache_len = Dim("cache_len", min=1, max=args.max_seq_len)
    tokens = {0: batch}
    if kind == "prefill":
        tokens[1] = Dim("seq", min=1, max=args.max_seq_len)
    return {"tokens": tokens, "start_pos": {0: batch}, "kv_cache": {0: batch, 2: cache_len}}


def export_step(model: Transformer, kind: str, step_factory=LatentCacheStep,
                shape: TuneShape | None = None) -> ExportedProgram:
    """Export one step program ("prefill" or "decode") of `model` (ATen IR, not yet decomposed).

    step_factory: the step module's class (debug_step.DebugLatentCacheStep adds per-stage outputs).
    shape: the example inputs' sizes (tune_shape; default: default_tune_shape)."""
    step = step_factory(model).eval()
    inputs = example_inputs(model, kind, shape)
    with static_moe(model), torch.no_grad():
        return torch.export.export(step, inputs, dynamic_shapes=dynamic_shapes(model, kind), strict=False)


@dataclass
class ExportedModel:
    """The programs of one model, by kind, and the model they came from."""

    model: Transformer
    programs: dict[str, ExportedProgram]


def export_model(model: Transformer, kinds: tuple[str, ...] = PROGRAM_KINDS) -> ExportedModel:
    return ExportedModel(model=model, programs={kind: export_step(model, kind) for kind in kinds})
