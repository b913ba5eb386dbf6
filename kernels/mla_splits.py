"""How many KV splits mla_decode cuts each row's cache into (kernels/mla_decode.py).

Two rules: choose_num_splits, on the host, for eager calls that know the batch and cache length;
and the runtime rule of the traced decode program (runtime_splits=True), where both are symbolic,
computed by the kernels themselves (_batch_splits, _row_splits) and mirrored by runtime_num_splits
for tests and benchmark notes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import cdiv, next_pow2, num_sms

# Upper bound on KV splits: each adds a [C] fp32 partial per head to merge.
MAX_SPLITS = 32
# Heads per decode program (the dots' N): at least 16, at most 64 (registers for the C-wide accumulator).
MIN_BLOCK_H, MAX_BLOCK_H = 16, 64
# Split sizing (choose_num_splits). Resident decode programs per SM: most decode configs take
# 93-130 KB of shared memory and 97-181 registers per thread on sm_90 (ptxas,
# tests/kernels/_sm90_compile.py), so 1-2 fit; 2 is the count the splits are sized for (with 1,
# the 256 programs of B=32 run as 2 nearly full waves). A split's partial output write ([H, C]
# fp32) costs about as much traffic as reading 32 cache rows (C + R = 576 bf16 each).
DECODE_PROGRAMS_PER_SM = 2
MIN_SPLIT_KEYS = 64
SPLIT_OVERHEAD_KEYS = 32
# The runtime split rule (runtime_splits=True, the traced decode program, where the batch and the
# cache length are symbolic): the grid has MAX_SPLITS split programs per (row, head block) and the
# kernels themselves use clamp(SPLIT_TARGET // (B x head blocks), RUNTIME_MIN_SPLITS, MAX_SPLITS) of
# them, SPLIT_TARGET = DECODE_PROGRAMS_PER_SM x #SMs, capped at one split per MIN_SPLIT_KEYS cached
# keys of the row, rounded up (runtime_num_splits). Rounded up, a capped row's chunks hold at most
# MIN_SPLIT_KEYS keys, a whole number of tiles for every BLOCK_N (1023 keys: 16 chunks of 64 = 2 tiles
# of 32; rounded down, 15 chunks of 69 = 3 tiles), and more than half as many. 132 SMs: B=32 -> 8
# (the count measured best in session 4), B=16 -> 16, B<=8 -> 32 (B=1 at context 1024: 16 by the key
# cap). RUNTIME_MIN_SPLITS is the fixed count the traced program used before: large batches keep it.
RUNTIME_MIN_SPLITS = 8


@triton.jit
def _batch_splits(programs, NUM_SPLITS, SPLIT_TARGET: tl.constexpr, MIN_SPLITS: tl.constexpr):
    """The runtime rule's splits before the per-row cap: SPLIT_TARGET programs over the `programs`
    (row, head block) pairs of the launch, clamped to [MIN_SPLITS, NUM_SPLITS] (runtime_num_splits)."""
    return tl.minimum(tl.maximum(SPLIT_TARGET // programs, MIN_SPLITS), NUM_SPLITS)


@triton.jit
def _clamped_load(ptr, row, HIGH):
    """ptr[row] clamped to [0, HIGH], int32 (clamped before the cast). The decode kernels read the step's start_pos
    through it as it is (int64, unclamped) for the cached keys (HIGH = the cache's length) and the query's rope row
    (HIGH = the tables' last row): the clamp here replaces the per-layer clamp kernels Inductor emitted for it (14
    launches per 27-layer 16b decode step). Values already in range (the eager callers' int32 lengths) come out
    unchanged."""
    return tl.minimum(tl.maximum(tl.load(ptr + row), 0), HIGH).to(tl.int32)


@triton.jit
def _row_splits(batch_splits, seqlen, MIN_KEYS: tl.constexpr):
    """At most one split per MIN_KEYS cached keys of the row (rounded up), at least one (empty rows too)."""
    return tl.minimum(batch_splits, tl.maximum(tl.cdiv(seqlen, MIN_KEYS), 1))


def choose_num_splits(batch: int, heads: int, max_seq: int, device: torch.device) -> int:
    """KV splits per (row, head block): the count with the least `waves x keys per program`.

    Decode is a stream over the cache, so its time is about (waves of programs) x (keys each
    program reads, plus its partial-output write, ~SPLIT_OVERHEAD_KEYS). A wave holds
    DECODE_PROGRAMS_PER_SM programs per SM. The old rule (programs ~ 2 x #SMs, rounded up) gave
    B=32 on 132 SMs 9 splits = 288 programs: a second wave of 24 for ~1.1 waves of work; this
    picks 8 (256 programs, one wave). Splits stay >= MIN_SPLIT_KEYS keys; ties go to fewer splits
    (less merging).
    """
    return _num_splits(batch, heads, max_seq, num_sms(device))


@functools.lru_cache(maxsize=4096)
def _num_splits(batch: int, heads: int, max_seq: int, sms: int) -> int:
    """choose_num_splits' search, memoized: the loop costs ~15 us of host time per decode call."""
    head_blocks = cdiv(heads, _block_h(heads))
    slots = DECODE_PROGRAMS_PER_SM * sms
    best, best_cost = 1, float("inf")
    for splits in range(1, max(1, min(MAX_SPLITS, max_seq // MIN_SPLIT_KEYS)) + 1):
        waves = cdiv(batch * head_blocks * splits, slots)
        chunk = cdiv(cdiv(max_seq, splits), MIN_SPLIT_KEYS) * MIN_SPLIT_KEYS
        cost = waves * (chunk + SPLIT_OVERHEAD_KEYS)
        if cost < best_cost:
            best, best_cost = splits, cost
    return best


def runtime_split_target(device: torch.device) -> int:
    """SPLIT_TARGET of the runtime rule: the decode programs one wave holds on `device`."""
    return DECODE_PROGRAMS_PER_SM * num_sms(device)


def runtime_num_splits(batch: int, heads: int, seqlen: int, device: torch.device) -> int:
    """The splits a row of `seqlen` cached keys uses under runtime_splits=True: the kernels' own
    rule (_batch_splits, _row_splits), here for tests and benchmark notes."""
    programs = batch * cdiv(heads, _block_h(heads))
    splits = min(max(runtime_split_target(device) // programs, RUNTIME_MIN_SPLITS), MAX_SPLITS)
    return min(splits, max(cdiv(seqlen, MIN_SPLIT_KEYS), 1))


def _block_h(heads: int) -> int:
    return min(max(MIN_BLOCK_H, next_pow2(heads)), MAX_BLOCK_H)
