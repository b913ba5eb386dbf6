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
# the 16b shapes wq+wkv_a and wo)
# run kernels/fp8_gemv.py at batch <= GEMV_MAX_ROWS: one launch that quantizes x in registers, instead of
# act_quant + the tile GEMM (+ its split-K partials). Larger batches run the tile path; both are in the one
# program, and the launches of the side that does not apply have an empty grid. `1` turns it on (read when a
# program is lowered). Off by default: on the H200 (session 13) the GEMV took 5.7 / 5.0 us (wq+wkv_a / wo,
# M=1, weights read from HBM) against 8.3 / 7.3 us for act_quant + GEMM + split-K sum; inside the 27-layer 16b
# decode step (where Inductor fuses the sum away) busy time 2.339 vs 2.338 ms, 54 launches fewer, step 2.624
# vs 2.644 ms at batch 1. Those packages compiled the GEMV with Inductor's default 4 warps / 3 stages, not
# GEMV_CONFIGS[0] (fixed since: kernels/fp8_gemv.py's one-config autotuner); to be re-measured.
DECODE_GEMV_ENV = "DSV3_TORCH_DECODE_GEMV"
DECODE_GEMV_CHOICES = {"1": f"fp8_gemv at batch <= {kv.GEMV_MAX_ROWS} for the small Linears, decode program",
                       "0": "act_quant + tile GEMM at every batch"}


def decode_gemv(kind: str) -> bool:
    return kind == "decode" and env_choice(DECODE_GEMV_ENV, "0", DECODE_GEMV_CHOICES) == "1"


def check_gemv_tune_batch(ep, kind: str) -> None:
    """With DECODE_GEMV_ENV on, the decode program must be traced (so tuned) at a batch above
    GEMV_MAX_ROWS: at the tracing batch Inductor times the tile GEMMs' and act_quant's configs, whose
    grids would be empty there, and the picks would hold for every batch."""
    if not decode_gemv(kind):
        return
    tokens = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs)
    batch = tokens.meta["val"].shape[0]
    hint = batch.node.hint if isinstance(batch, torch.SymInt) else batch
    if hint is not None and hint <= kv.GEMV_MAX_ROWS:
        raise ValueError(f"{DECODE_GEMV_ENV}=1: the decode program is traced at batch {hint}, where the GEMV takes "
                         f"the Linears and the tile GEMMs it would tune launch nothing; tune decode at a batch > "
                         f"{kv.GEMV_MAX_ROWS} (--tune-decode, default 64)")


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
