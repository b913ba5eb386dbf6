"""Debugging aids for the pass pipeline: --dump-graphs and --verify-each-pass.

dump:   each program of the pipeline (the input, then the result of each pass) as readable text
        (`print_readable`, with shapes and dtypes) and an op histogram (json, and txt with the
        change against the previous stage), in `NN_<stage>/` folders.
verify: runs the same random inputs (fresh seed, printed on failure) through the program before
        and after a pass, eagerly (`ep.module()`; dsv3 ops run their CPU bodies), and names the
        first pass whose outputs drift beyond the tolerance of TOLERANCES.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from dsv3_export.passes.base import PassError
from dsv3_export.passes.graph_utils import op_histogram


@dataclass(frozen=True)
class Tolerance:
    max_rel_err: float | None = None  # ||after - before|| / ||before||, per output
    min_cosine: float | None = None  # cosine(after, before), per output (lossy passes)


# The one table: structural passes are judged by the program's compute dtype; lossy passes by
# their own entry (LOSSY_PASSES).
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(max_rel_err=1e-5),
    "float16": Tolerance(max_rel_err=5e-3),
    "bfloat16": Tolerance(max_rel_err=2e-2),
    "fp8": Tolerance(min_cosine=0.99),
}
LOSSY_PASSES = {"quantize_fp8_blockwise": "fp8"}

# Size of each dynamic dim in the random inputs: small, but not 1 (1 hides broadcasting bugs).
_DIM_RANGE = (2, 6)


def compute_dtype(program: ExportedProgram) -> torch.dtype:
    """The dtype of the program's first floating-point user input (the KV cache), else fp32."""
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        val = _placeholder(program, spec.arg.name).meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
            return val.dtype
    return torch.float32


def tolerance_for(pass_name: str, program: ExportedProgram) -> tuple[str, Tolerance]:
    key = LOSSY_PASSES.get(pass_name, str(compute_dtype(program)).removeprefix("torch."))
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance for {key!r}; TOLERANCES has {sorted(TOLERANCES)}")
    return key, TOLERANCES[key]


def _placeholder(program: ExportedProgram, name: str) -> torch.fx.Node:
    return next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)


def has_real_weights(program: ExportedProgram) -> bool:
    tensors = list(program.state_dict.values()) + [v for v in program.constants.values() if isinstance(v, torch.Tensor)]
    return all(t.device.type != "meta" for t in tensors)


def random_step_inputs(program: ExportedProgram, seed: int) -> tuple[torch.Tensor, ...]:
    """Random (tokens, start_pos, kv_cache) for a LatentCacheStep program (dsv3_export.step).

    Dynamic dims get sizes in _DIM_RANGE (within the program's range constraints); tokens are
    below the embedding's vocabulary; start_pos[row] is in [0, cache_len], so rows see cached
    positions and rows see none. Row 0 always sees the whole cache: a decode step whose rows all
    start at 0 attends to one key only, and softmax over one key hides any error in the scores.
    """
    gen = torch.Generator().manual_seed(seed)
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if names != ["tokens", "start_pos", "kv_cache"]:
        raise ValueError(f"random inputs need a step program (tokens, start_pos, kv_cache); this one takes {names}: "
                         "pass inputs= explicitly")
    sizes: dict[str, int] = {}

    def concrete(dim) -> int:
        if isinstance(dim, int):
            return dim
        key = str(dim)
        if key not in sizes:
            lo, hi = _DIM_RANGE
            for sym, rng in program.range_constraints.items():
                if str(sym) == key:
                    lo, hi = max(lo, int(rng.lower)), min(hi, int(rng.upper))
            sizes[key] = int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=gen))
        return sizes[key]

    tokens_node, start_node, cache_node = (_placeholder(program, n) for n in names)
    tokens_val, cache_val = tokens_node.meta["val"], cache_node.meta["val"]
    vocab = _vocab_size(tokens_node)
    tokens = torch.randint(0, vocab, [concrete(d) for d in tokens_val.shape], generator=gen)
    cache_shape = [concrete(d) for d in cache_val.shape]
    start_pos = torch.randint(0, cache_shape[2] + 1, (tokens.shape[0],), generator=gen)
    start_pos[0] = cache_shape[2]
    kv_cache = torch.randn(cache_shape, generator=gen).to(cache_val.dtype)
    return tokens, start_pos, kv_cache


def _vocab_size(tokens: torch.fx.Node) -> int:
    for user in tokens.users:
        if user.target == torch.ops.aten.embedding.default:
            return int(user.args[0].meta["val"].shape[0])
    raise ValueError("cannot find the embedding that reads `tokens`, so not the vocabulary size: pass inputs=")


def run_program(program: ExportedProgram, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = program.module()(*inputs)
    return [t.detach() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def drift(before: list[torch.Tensor], after: list[torch.Tensor]) -> list[dict[str, float]]:
    """Per output: relative error and cosine similarity of `after` against `before` (in float64)."""
    stats = []
    for b, a in zip(before, after):
        b64, a64 = b.double().flatten(), a.double().flatten()
        rel = ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()
        cos = torch.nn.functional.cosine_similarity(a64, b64, dim=0, eps=1e-30).item()
        stats.append({"rel_err": rel, "cosine": cos})
    return stats


def check_drift(pass_name: str, program: ExportedProgram, before: list[torch.Tensor], after: list[torch.Tensor],
                seed: int | None) -> list[dict[str, float]]:
    """Raise PassError naming the pass and the drift if `after` is not within tolerance of `before`."""
    key, tol = tolerance_for(pass_name, program)
    where = f" (inputs seed {seed})" if seed is not None else ""
    if len(before) != len(after):
        raise PassError(pass_name, f"program had {len(before)} outputs, now {len(after)}{where}")
    stats = drift(before, after)
    for i, (b, a, s) in enumerate(zip(before, after, stats)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise PassError(pass_name, f"output {i} changed from {b.dtype}{list(b.shape)} to {a.dtype}{list(a.shape)}{where}")
        bad = not math.isfinite(s["rel_err"]) or (tol.max_rel_err is not None and s["rel_err"] > tol.max_rel_err) \
            or (tol.min_cosine is not None and not s["cosine"] >= tol.min_cosine)
        if bad:
            raise PassError(pass_name, f"output {i} drifted: rel err {s['rel_err']:.3g}, cosine {s['cosine']:.6f}; "
                                       f"tolerance {key}: {tol}{where}")
    return stats


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


# --- dumps -------------------------------------------------------------------------------------
def dump_program(program: ExportedProgram, folder: Path, previous: Counter | None = None) -> Counter:
    """Write graph.txt, ops.json and ops.txt for `program` into `folder`; return its histogram."""
    folder.mkdir(parents=True, exist_ok=True)
    text = program.graph_module.print_readable(print_output=False, include_stride=False, include_device=True)
    (folder / "graph.txt").write_text(f"{program.graph_signature}\n\n{text}")
    hist = op_histogram(program.graph)
    (folder / "ops.json").write_text(json.dumps(dict(hist.most_common()), indent=1))
    lines = [f"{len(program.graph.nodes)} nodes, {sum(hist.values())} calls"]
    for op in sorted(set(hist) | set(previous or {}), key=lambda o: (-hist.get(o, 0), o)):
        delta = "" if previous is None else f"  ({hist.get(op, 0) - previous.get(op, 0):+d})"
        lines.append(f"{hist.get(op, 0):7d}  {op}{delta}")
    (folder / "ops.txt").write_text("\n".join(lines) + "\n")
    return hist
