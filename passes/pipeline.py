"""The pass pipeline: one ordered tuple of passes, run with reports, dumps and verification.

    program, reports = run_pipeline(program, PassConfig(precision="bf16"),
                                    dump_dir=Path("graphs"), verify_each_pass=True)

Order matters (passes/README.md says why): fuse_mla_absorb matches the raw export IR, so it runs
before anything rewrites casts; fold_attention_weights runs right after it and computes each
attention's wkv_b once at build time (an fp8 checkpoint's dequantization would otherwise run every
step); the MoE rewrite runs before fp8 quantization so that the
quantizer sees grouped expert weights, and fuse_shared_experts right after it (it needs the op, and
the shared weights are then quantized as experts); fuse_shared_input_linears runs after the quantizer (fp8
weights are concatenated as quantized, bit-exact; it sees through the dense weights' casts);
cleanups run last and remove what the rewrites left dead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from torch.export import ExportedProgram

from dsv3_export.passes import debug
from dsv3_export.passes.base import PassConfig, PassError, PassResult
from dsv3_export.passes.cleanup import remove_noop_casts, remove_tensor_asserts, remove_unused_constants
from dsv3_export.passes.fold_attention_weights import fold_attention_weights
from dsv3_export.passes.fuse_mla_absorb import fuse_mla_absorb
from dsv3_export.passes.fuse_shared_experts import fuse_shared_experts
from dsv3_export.passes.fuse_shared_input_linears import fuse_shared_input_linears

PassFn = Callable[[ExportedProgram, PassConfig], PassResult]
log = logging.getLogger(__name__)


def _optional_pass(module: str) -> PassFn | None:
    """`dsv3_export.passes.<module>.<module>` if that module exists (it is being written)."""
    qualified = f"dsv3_export.passes.{module}"
    if importlib.util.find_spec(qualified) is None:
        return None
    fn = getattr(importlib.import_module(qualified), module, None)
    if fn is None:
        raise ImportError(f"{qualified} exists but defines no pass function {module}(program, config)")
    return fn


def _only_for_fp8(fn: PassFn | None) -> PassFn | None:
    if fn is None:
        return None

    def quantize_when_fp8(program: ExportedProgram, config: PassConfig) -> PassResult:
        if config.precision != "fp8":
            return PassResult(program, 0, [f"skipped: precision is {config.precision}, not fp8"])
        return fn(program, config)

    return quantize_when_fp8


PIPELINE: tuple[tuple[str, PassFn], ...] = tuple((name, fn) for name, fn in (
    ("fuse_mla_absorb", fuse_mla_absorb),
    ("fold_attention_weights", fold_attention_weights),
    ("rewrite_moe_grouped_gemm", _optional_pass("rewrite_moe_grouped_gemm")),
    ("fuse_shared_experts", fuse_shared_experts),
    ("quantize_fp8_blockwise", _only_for_fp8(_optional_pass("quantize_fp8_blockwise"))),
    ("fuse_shared_input_linears", fuse_shared_input_linears),
    ("remove_noop_casts", remove_noop_casts),
    ("remove_tensor_asserts", remove_tensor_asserts),
    ("remove_unused_constants", remove_unused_constants),
) if fn is not None)
PASS_NAMES = tuple(name for name, _ in PIPELINE)


@dataclass
class PassReport:
    name: str
    matches: int
    notes: list[str]
    nodes_before: int
    nodes_after: int
    seconds: float
    drift: list[dict[str, float]] | None = field(default=None)  # per output, with verify_each_pass

    def summary(self) -> str:
        verdict = f"{self.matches} match{'es' if self.matches != 1 else ''}" if self.matches else "no match"
        text = f"{self.name}: {verdict}, nodes {self.nodes_before} -> {self.nodes_after}, {self.seconds:.2f} s"
        if self.matches == 0 and self.notes:
            text += f" ({self.notes[0]})"
        return text


def select_passes(names: Sequence[str] | None) -> tuple[tuple[str, PassFn], ...]:
    """The pipeline restricted to `names` (kept in pipeline order), or all of it."""
    if names is None:
        return PIPELINE
    unknown = sorted(set(names) - set(PASS_NAMES))
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; available: {', '.join(PASS_NAMES)}")
    return tuple((n, fn) for n, fn in PIPELINE if n in set(names))


def run_pipeline(program: ExportedProgram, config: PassConfig, *, dump_dir: Path | str | None = None,
                 verify_each_pass: bool = False, inputs: tuple | None = None,
                 passes: Sequence[str] | None = None) -> tuple[ExportedProgram, list[PassReport]]:
    """Run the passes in order; return the final program and one report per pass.

    dump_dir: write every intermediate program there (see debug.dump_program); written to a
        temporary folder and renamed into place, also when a pass fails (that is when it helps).
    verify_each_pass: run inputs (given, or random with a fresh seed per pass) through the program
        before and after each pass; PassError at the first pass whose outputs drift.
    """
    steps = select_passes(passes)
    if verify_each_pass and not debug.has_real_weights(program):
        raise ValueError("verify_each_pass runs the program, but its weights are on the meta device")
    staging = _staging_dir(dump_dir)
    reports: list[PassReport] = []
    try:
        hist = debug.dump_program(program, staging / "00_input") if staging else None
        for index, (name, fn) in enumerate(steps, start=1):
            program, report, hist = _run_one(name, fn, program, config, verify_each_pass, inputs, staging, index, hist)
            reports.append(report)
            log.info("%s", report.summary())
    finally:
        if staging:
            (staging / "report.json").write_text(json.dumps([asdict(r) for r in reports], indent=1))
            _publish(staging, Path(dump_dir))
    return program, reports


def _run_one(name: str, fn: PassFn, program: ExportedProgram, config: PassConfig, verify: bool, inputs,
             staging: Path | None, index: int, hist: Counter | None):
    seed, before = None, None
    if verify:
        seed = None if inputs is not None else debug.fresh_seed()
        step_inputs = inputs if inputs is not None else debug.random_step_inputs(program, seed)
        before = debug.run_program(program, step_inputs)
    nodes_before = len(program.graph.nodes)
    start = time.perf_counter()
    try:
        result = fn(program, config)
    except PassError:
        raise
    except Exception as e:  # a crash inside a pass still names the pass
        raise PassError(name, f"failed with {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - start
    if not isinstance(result, PassResult):
        raise PassError(name, f"returned {type(result).__name__}, not a PassResult")
    stats = None
    if verify:
        after = debug.run_program(result.program, step_inputs)
        stats = debug.check_drift(name, program, before, after, seed)
    report = PassReport(name, result.matches, list(result.notes), nodes_before, len(result.program.graph.nodes),
                        seconds, stats)
    if staging:
        hist = debug.dump_program(result.program, staging / f"{index:02d}_{name}", previous=hist)
    return result.program, report, hist


def _staging_dir(dump_dir: Path | str | None) -> Path | None:
    if dump_dir is None:
        return None
    dump_dir = Path(dump_dir)
    dump_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dump_dir.name}.", dir=dump_dir.parent))


def _publish(staging: Path, dump_dir: Path) -> None:
    if dump_dir.exists():
        shutil.rmtree(dump_dir)
    staging.rename(dump_dir)
