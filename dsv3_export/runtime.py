"""Run an engine directory: forward (one call, like the reference model) and generate (prefill + decode).

    engine = load_engine("engine/")                  # manifest verified, then the backend loads
    logits = engine.forward(tokens)                  # [b, s] int64 -> [b, s, V] float32 (CPU tensor)
    ids = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)   # greedy; temperature / top_p

Backend independent: the backend gives a step function and the device its tensors live on
(engines/base.py); this module owns the KV cache (allocated once on that device, capacity = longest
prompt + max_new_tokens - 1: the last new token is not fed back), writes each step's new rows into it in place, and
samples.
On a step whose decode graphs are captured per cache buffer (engines/torch_step.py graphs_keyed_by_cache),
generate keeps its cache between calls instead, its capacity rounded up to GENERATE_CACHE_BUCKET positions.
Prompts of different lengths share one batch: they are right-padded and prefilled at position 0,
then every row decodes at its own position (start_pos per row); the padded rows' cache entries
are overwritten before any query can see them (step.py).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from dsv3_export.engines.base import StepFunction, get_backend
from dsv3_export.manifest import Manifest, verify_engine_dir
from dsv3_export.reference.args import ModelArgs
from dsv3_export.step import empty_cache, step_writing_cache

PAD_ID = 0  # right padding of shorter prompts; its logits and cache rows are never used
# generate's cache capacity on a step that captures decode graphs per cache buffer, rounded up to a multiple of this
# (at most max_seq_len): calls of nearby lengths then share one buffer and so one graph. Why: a cache allocated per
# call is a new address, and each call captured its decode graph again (two uncaptured warm-up runs, the capture and
# its instantiation: on the H200's 27-layer 16b step ~2.5 ms each run) inside the first token's time. The Triton MLA
# kernels read each row's first start_pos positions only (kernels/mla_decode_kernels.py), so there the longer
# buffer costs memory, not time; the ATen attention (fp32 engines, DSV3_TORCH_TRITON_OPS=0) attends over all of it.
GENERATE_CACHE_BUCKET = 256


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] -> token ids [b] (int64, on logits' device). temperature 0: argmax."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float().cpu()  # sampled on the CPU: reproducible
    # the row's max subtracted first: a tiny temperature then sends the others to -inf, not the max to inf (NaN)
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)  # [b, V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # mass before this token already >= top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


@dataclass
class Engine:
    manifest: Manifest
    step: StepFunction
    path: Path
    queue_ahead: bool = True  # greedy: step n+1 queued before token n is read (generate); False: one at a time
    _kept_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # generate's: one

    @cached_property
    def args(self) -> ModelArgs:
        return ModelArgs.from_dict(self.manifest.model)

    @property
    def device(self) -> torch.device:
        return self.step.device

    def new_cache(self, batch: int, length: int) -> torch.Tensor:
        a = self.args
        if length > a.max_seq_len:
            raise ValueError(f"{length} positions exceed the engine's max_seq_len={a.max_seq_len} "
                             "(its rotary tables end there)")
        return empty_cache(a, batch, length, self.step.cache_dtype, self.device)  # [b, L, T, w]

    def check_token_ids(self, ids: Sequence[int]) -> None:
        """Raise naming the first ids outside the vocabulary: an embedding lookup would wrap a negative id (ONNX
        Gather) or abort the process (AOTInductor's CPU kernels check indices inside an OpenMP region)."""
        vocab = self.args.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")

    @torch.no_grad()
    def forward(self, tokens) -> torch.Tensor:
        """tokens [b, s] of integers -> logits [b, s, V] float32 on the CPU, from a fresh cache."""
        tokens = torch.as_tensor(tokens)
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        tokens = tokens.to(torch.int64)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0:  # ONNX Runtime's binding refuses empty buffers, its row chunks a batch of 0
            raise ValueError(f"tokens must hold at least one row and one position, got shape {tuple(tokens.shape)}")
        self.check_token_ids(tokens.flatten().tolist())
        b, s = tokens.shape
        cache = self.new_cache(b, s)
        start = torch.zeros(b, dtype=torch.int64, device=self.device)
        logits, _ = self.step(tokens.to(self.device), start, cache)
        return logits.float().cpu()

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 eos_id: int | None = None) -> list[int] | list[list[int]]:
        """New token ids after each prompt (a list of ints -> a list; a list of lists -> one per prompt).

        Greedy when temperature == 0; otherwise temperature / nucleus (top_p) sampling with a
        torch.Generator seeded by `seed`. A row stops after emitting eos_id (included).
        """
        prompts, single = prompt_lists(prompt_ids)
        if not _is_id(max_new_tokens) or max_new_tokens < 1:  # 2.5 was a raw TypeError in range(); True counted as 1
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if eos_id is not None and not _is_id(eos_id):
            raise ValueError(f"eos_id must be an integer token id or None, got {eos_id!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not (math.isfinite(temperature) and temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        self.check_token_ids([t for p in prompts for t in p])
        generator = None
        if temperature > 0.0:
            generator = torch.Generator()
            if seed is None:
                generator.seed()  # its own random seed: the process's default generator is left alone
            else:
                generator.manual_seed(seed)

        b, lengths = len(prompts), [len(p) for p in prompts]
        longest = max(lengths)
        # the last new token is returned, never fed back: the steps write positions up to longest + max_new_tokens - 2
        cache = self._generate_cache(b, longest, longest + max_new_tokens - 1)
        padded = torch.tensor([p + [PAD_ID] * (longest - len(p)) for p in prompts], dtype=torch.int64)  # [b, S]
        pos = torch.zeros(b, dtype=torch.int64, device=self.device)
        # one-token prompts run the decode step: the same graph (the write in it) as every later token
        logits = step_writing_cache(self.step, padded.to(self.device), pos, cache)  # [b, S, V]
        last = torch.tensor(lengths, device=self.device) - 1
        next_logits = logits[torch.arange(b, device=self.device), last]  # [b, V]
        pos = last + 1
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        # Greedy tokens never leave the device: the next step is queued before the host reads this
        # token, so the host's bookkeeping and its launch of step n+1 overlap the device running step n
        # (one step is queued past an end-of-sequence stop and dropped). Sampling reads the logits on
        # the host (sample), so it runs one step at a time.
        ahead = self.queue_ahead and temperature <= 0.0
        token = sample(next_logits, temperature, top_p, generator)  # [b]
        for step_index in range(max_new_tokens):
            last = step_index == max_new_tokens - 1
            host = _HostCopy(token)  # queued before the next step, so it waits for this token only
            if ahead and not last:
                token, pos = self._decode(token, pos, cache, temperature, top_p, generator)
            for row, t in enumerate(host.values()):
                if not done[row]:
                    out[row].append(t)
                    done[row] = eos_id is not None and t == eos_id
            if all(done) or last:
                break
            if not ahead:
                token, pos = self._decode(token, pos, cache, temperature, top_p, generator)
        return out[0] if single else out

    def _generate_cache(self, batch: int, prompt: int, length: int) -> torch.Tensor:
        """generate's cache for `length` positions, whose first `prompt` the prefill writes: new_cache's, or on a step
        with graphs keyed by the cache buffer the one kept from the last call of this batch and capacity bucket
        (GENERATE_CACHE_BUCKET), zeroed past the prompt (as new: an attention that reads past each row's positions
        meets zeros, not an earlier call's rows). One generate at a time per Engine, on one stream: the kept buffer
        (and the captured graph's input buffers) are shared by its calls."""
        if not getattr(self.step, "graphs_keyed_by_cache", False) or length > self.args.max_seq_len:
            return self.new_cache(batch, length)  # (too long: new_cache's error)
        capacity = min(-(-length // GENERATE_CACHE_BUCKET) * GENERATE_CACHE_BUCKET, self.args.max_seq_len)
        key = (batch, capacity)
        if key in self._kept_cache:
            self._kept_cache[key][:, :, prompt:].zero_()
        else:
            self._kept_cache.clear()  # one kept: its graph holds it anyway (engines/torch_step.py MAX_GRAPHS)
            self._kept_cache[key] = self.new_cache(batch, capacity)
        return self._kept_cache[key]

    def _decode(self, token: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for tokens [b] at positions pos [b]: the cache written, -> (next tokens, pos + 1)."""
        logits = step_writing_cache(self.step, token[:, None], pos, cache)  # [b, 1, V]
        return sample(logits[:, 0], temperature, top_p, generator), pos + 1


def prompt_lists(prompt_ids) -> tuple[list[list[int]], bool]:
    """generate's prompts as lists of ints, and whether one prompt was given (a flat sequence of ids, or a 1-D tensor /
    array) rather than several (a sequence of sequences, or a 2-D tensor / array). Non-integer ids are refused, not
    truncated."""
    ndim = getattr(prompt_ids, "ndim", None)
    if ndim is not None:  # a torch tensor or numpy array: its shape says which
        if ndim not in (1, 2):
            raise ValueError(f"prompt ids must be 1-D (one prompt) or 2-D (one row per prompt), got {ndim}-D")
        single, rows = ndim == 1, prompt_ids.tolist()
    else:
        rows = list(prompt_ids)
        single = len(rows) > 0 and _is_id(rows[0])
    prompts = [rows] if single else [p.tolist() if hasattr(p, "tolist") else list(p) for p in rows]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for p in prompts:
        wrong = next((t for t in p if not _is_id(t)), None)
        if wrong is not None:
            raise ValueError(f"prompt ids must be integers, got {wrong!r} ({type(wrong).__name__})")
    return [[int(t) for t in p] for p in prompts], single


def _is_id(value) -> bool:
    """An integer token id: a Python / numpy integer or a 0-d integer tensor (not a bool, not a float)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class _HostCopy:
    """A device tensor's values on the host, copied without waiting for work queued after the copy
    (a pinned buffer and an event on CUDA; .tolist() would wait for the whole stream)."""

    def __init__(self, values: torch.Tensor):
        if values.is_cuda:
            self._buffer = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._buffer.copy_(values, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._buffer, self._done = values.clone(), None

    def values(self) -> list:
        if self._done is not None:
            self._done.synchronize()
        return self._buffer.tolist()


def load_engine(engine_dir: str | Path, check_hashes: bool = True) -> Engine:
    """Verify the engine directory (manifest, every file's size and sha256), then load its backend."""
    engine_dir = Path(engine_dir)
    manifest = verify_engine_dir(engine_dir, check_hashes=check_hashes)
    backend = get_backend(manifest.backend)
    return Engine(manifest=manifest, step=backend.load(engine_dir, manifest), path=engine_dir)
