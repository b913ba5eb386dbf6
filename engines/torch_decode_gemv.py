"""DSV3_TORCH_DECODE_GEMV: the decode program's small fp8 Linears take kernels/fp8_gemv.py at batch <= 2,
act_quant + the tile GEMM above, both in one program (engines/torch_triton.py fp8_linear).

Why gating, not two programs: a package is traced with a symbolic batch, so the lowering cannot branch
on it without a guard; instead every launch of both paths is in the program, each with its grid's first
dimension multiplied by a 0/1 expression of the batch (kernels/fp8_gemv.py gemv_gate). A zero first
dimension launches nothing, and a CUDA graph captured at one batch holds only the launches that run.
"""

from __future__ import annotations

import torch

from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels import fp8_gemv as kv
from dsv3_export.kernels._common import LaunchSpec

# Whether the decode program's small fp8 Linears that take x unquantized (kernels/fp8_gemv.py gemv_suits: at
# the 16b shapes wq+wkv_a and wo) run kernels/fp8_gemv.py at batch <= GEMV_MAX_ROWS: one launch that quantizes
# x in registers, instead of act_quant + the tile GEMM (+ its split-K partials). Larger batches run the tile
# path; both are in the one program, and the launches of the side that does not apply have an empty grid.
# Read when a program is lowered: `auto` (default) on, unless the decode program is traced (so tuned) at a
# batch <= GEMV_MAX_ROWS, where the tile path's kernels would be timed on empty grids (then off, and the
# manifest's lowering line says so); `1` on (such a trace is refused); `0` off.
# On by default since session 16, from 9 builds of the 27-layer 16b fp8 decode program on the H200 (CUDA
# graph, ms per step): batch 1 2.470-2.529 with it (4 builds) against 2.540-2.673 without (5 builds), the
# two ranges disjoint (means 2.491 / 2.607: -4.5%, 54 launches fewer); batch 8 4.551-4.670 against
# 4.496-4.663 (means 4.605 / 4.548: +1.3%, overlapping ranges; the GEMV's grid is empty there, so what
# differs is the rest of each build's autotune picks); batch 64 7.805 (1 build) against 8.098 / 8.555.
DECODE_GEMV_ENV = "DSV3_TORCH_DECODE_GEMV"
DECODE_GEMV_CHOICES = {
    "auto": f"fp8_gemv at batch <= {kv.GEMV_MAX_ROWS} for the small Linears of a decode program traced above "
            f"batch {kv.GEMV_MAX_ROWS}",
    "1": f"fp8_gemv at batch <= {kv.GEMV_MAX_ROWS} for the small Linears, decode program",
    "0": "act_quant + tile GEMM at every batch (and W_UV by head_gemm, the split-K sums by Inductor: "
         "DSV3_TORCH_HEAD_GEMV and DSV3_TORCH_SPLIT_K_SUM=auto follow this switch)"}


# The decode GEMV's weight rows prefetched into L2 before its griddepcontrol.wait (kernels/fp8_gemv.py PREFETCH_W):
# `auto` (default) where our kernels wait (DSV3_TRITON_GDC, so under the programmatic port the prefetch overlaps the
# producer's end), `1` always (without the wait: a prefetch at the kernel's start, the same bits), `0` never. Read
# when a program is lowered. On in every H200 build with the wait that was timed (sessions 25-26,
# benchmarks/RESULTS.md).
GEMV_PREFETCH_ENV = "DSV3_TORCH_GEMV_PREFETCH"


def gemv_prefetch_on() -> bool:
    return prefetch_before_wait(GEMV_PREFETCH_ENV, "the GEMV's weight rows into L2 before its wait")


def prefetch_before_wait(env: str, what: str) -> bool:
    """A weight-prefetch switch (this one, merge_uv's): `1` on, `0` off, `auto` (default) on where our kernels were
    compiled with the wait here (kernels/pdl.py GDC; imported when first asked)."""
    choice = env_choice(env, "auto", {"auto": "as DSV3_TRITON_GDC: with the wait", "1": what, "0": "no prefetch"})
    if choice != "auto":
        return choice == "1"
    from dsv3_export.kernels.pdl import GDC

    return bool(GDC)


def decode_gemv(kind: str, traced_batch: int | None = None) -> bool:
    """Whether a program of `kind` traced at `traced_batch` (None: not known, taken as the default tune
    batch) gets the GEMV path (DECODE_GEMV_ENV)."""
    if kind != "decode":
        return False
    return _gemv_applies(env_choice(DECODE_GEMV_ENV, "auto", DECODE_GEMV_CHOICES), traced_batch)


def _gemv_applies(choice: str, traced_batch: int | None) -> bool:
    if choice == "auto":
        return traced_batch is None or traced_batch > kv.GEMV_MAX_ROWS
    return choice == "1"


def traced_batch(ep) -> int | None:
    """The batch the exported step was traced at (the hint of its symbolic batch), None if unknown."""
    tokens = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs)
    batch = tokens.meta["val"].shape[0]
    return batch.node.hint if isinstance(batch, torch.SymInt) else batch


def program_decode_gemv(ep, kind: str) -> bool:
    """decode_gemv for the exported program ep; with DECODE_GEMV_ENV=1 the decode program must be traced
    (so tuned) at a batch above GEMV_MAX_ROWS: at the tracing batch Inductor times the tile GEMMs' and
    act_quant's configs, whose grids would be empty there, and the picks would hold for every batch."""
    if kind != "decode":
        return False
    batch = traced_batch(ep)
    choice = env_choice(DECODE_GEMV_ENV, "auto", DECODE_GEMV_CHOICES)
    if choice == "1" and batch is not None and batch <= kv.GEMV_MAX_ROWS:
        raise ValueError(f"{DECODE_GEMV_ENV}=1: the decode program is traced at batch {batch}, where the GEMV takes "
                         f"the Linears and the tile GEMMs it would tune launch nothing; tune decode at a batch > "
                         f"{kv.GEMV_MAX_ROWS} (--tune-decode, default 64), or leave the switch at auto")
    return _gemv_applies(choice, batch)


def gated(spec: LaunchSpec, gate) -> LaunchSpec | None:
    """spec with its grid's first dimension times gate (1 or 0; symbolic while traced): a zero first
    dimension launches nothing, in Triton's launcher and AOTInductor's (`if (grid_0 == 0) return;`).
    A Python 0 (eager) gives None, no launch at all: an autotuner would otherwise time its configs on
    the empty grid and cache the pick for this shape key."""
    if type(gate) is int:  # a Python int: decided now, no guard
        return spec if gate else None
    grid = spec.grid

    def gated_grid(meta):
        dims = grid(meta)
        return (dims[0] * gate, *dims[1:])

    return spec._replace(grid=gated_grid)
