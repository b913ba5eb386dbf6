"""`dsv3-export diff`: accuracy report of an engine against the reference model (dsv3_export.reports.diff)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dsv3_export.errors import EXIT_ACCURACY, EXIT_FAILURE, EXIT_USAGE, CliError


def read_token_file(path: Path) -> list[list[int]]:
    """One prompt per non-empty line, ids separated by spaces or commas."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CliError(f"--token-file {path}: {e.strerror or e}", EXIT_USAGE) from e
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        try:
            prompts.append([int(t) for t in parts])
        except ValueError:
            raise CliError(f"--token-file {path}:{n}: expected integer token ids", EXIT_USAGE) from None
    if not prompts:
        raise CliError(f"--token-file {path}: no prompts (one per line)", EXIT_USAGE)
    return prompts


def check_tolerance(flag: str, value: float | None) -> None:
    """A negative or NaN tolerance fails every comparison: a usage error, not an accuracy verdict (exit 3)."""
    if value is not None and not value >= 0:
        raise CliError(f"{flag} {value}: a tolerance must be a number >= 0", EXIT_USAGE)


def check_tol_override(text: str) -> None:
    """--tol PATTERN:key=value,...: parsed, and every value a tolerance (min_cosine may be negative, not NaN or > 1)."""
    from dsv3_export.reports.tolerances import parse_override

    try:
        _, values = parse_override(text)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from e
    for key, value in values.items():
        if value != value or (key != "min_cosine" and value < 0):
            raise CliError(f"--tol {text!r}: {key}={value} must be a number >= 0", EXIT_USAGE)
        if key == "min_cosine" and value > 1:  # a cosine never exceeds 1: every output would fail (exit 3)
            raise CliError(f"--tol {text!r}: {key}={value} must be at most 1", EXIT_USAGE)


def check_numbers(gen_steps: int, atol: float | None, rtol: float | None, tol: list[str]) -> None:
    """Refuse bad numbers before the engine and the reference are loaded, naming the flag."""
    if gen_steps < 0:
        raise CliError(f"--gen-steps {gen_steps}: must be >= 0 (0: no greedy comparison)", EXIT_USAGE)
    check_tolerance("--atol", atol)
    check_tolerance("--rtol", rtol)
    for t in tol:
        check_tol_override(t)


def diff(
    engine_dir: Path = typer.Argument(..., help="Engine directory written by `dsv3-export build`."),
    out: Path = typer.Option(..., help="Report directory: report.json, report.md, PNG plots."),
    reference: Optional[Path] = typer.Option(None, help="Reference checkpoint directory. Default: the engine's source."),
    preset: Optional[str] = typer.Option(None, help="Reference preset (seeded random weights) instead of a checkpoint."),
    weight_seed: Optional[int] = typer.Option(None, help="Seed of --preset's weights (default: the engine's, else 0)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Token ids, e.g. 1,2,3; several: 1,2;3,4"),
    token_file: Optional[Path] = typer.Option(None, help="Prompts, one per line (ids separated by spaces/commas)."),
    seed: int = typer.Option(0, help="Seed of the random prompts (and of the bootstrap)."),
    batch: int = typer.Option(2, help="Random prompts: how many."),
    seq_len: int = typer.Option(32, help="Random prompts: length."),
    gen_steps: int = typer.Option(16, help="Greedy steps compared (0: none)."),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="Compare every stage's hidden state "
                                                                      "(builds a debug engine)."),
    debug_engine: Optional[Path] = typer.Option(None, help="Keep the debug engine here and reuse it next time."),
    atol: Optional[float] = typer.Option(None, help="Absolute tolerance for every output (overrides the table)."),
    rtol: Optional[float] = typer.Option(None, help="Relative tolerance for every output (overrides the table)."),
    tol: list[str] = typer.Option([], "--tol", help="Per-output tolerance, e.g. 'layers.*:rtol=0.1' or "
                                                    "'logits:atol=1e-3,min_cosine=0.999' (repeatable)."),
    reference_device: Optional[str] = typer.Option(None, help="cpu | cuda (default: the engine's device)."),
    json_out: bool = typer.Option(False, "--json", help="Print the verdict as JSON on stdout."),
) -> int:
    """Compare an engine with the reference model: per-stage errors, logit KL, greedy tokens. Exit 3: over tolerance."""
    import json
    import sys

    from rich.console import Console

    from dsv3_export.checkpoint import CheckpointError
    from dsv3_export.commands.generate import parse_prompts
    from dsv3_export.engines.base import BackendUnavailable
    from dsv3_export.manifest import EngineDirError
    from dsv3_export.reports.debug_engine import DebugEngineError
    from dsv3_export.reports.diff import DiffOptions, run_diff, write_diff_report
    from dsv3_export.reports.files import ReportDirError, check_replaceable
    from dsv3_export.reports.reference import ReferenceError

    if prompt_ids is not None and token_file is not None:
        raise CliError("give only one of --prompt-ids and --token-file", EXIT_USAGE)
    if reference is not None and preset is not None:
        raise CliError("give only one of --reference and --preset", EXIT_USAGE)
    if reference_device not in (None, "cpu", "cuda"):
        raise CliError(f"--reference-device {reference_device!r}: choose cpu or cuda", EXIT_USAGE)
    if reference_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--reference-device cuda: no CUDA device here (torch.cuda.is_available() is False)",
                           EXIT_FAILURE)
    check_numbers(gen_steps, atol, rtol, tol)
    if layers and debug_engine is not None:
        kept, report_dir = debug_engine.absolute().resolve(), out.absolute().resolve()
        if kept == report_dir or report_dir in kept.parents:
            raise CliError(f"--debug-engine {debug_engine}: inside --out {out}, which the report replaces; "
                           "keep it elsewhere", EXIT_USAGE)
    prompts = parse_prompts(prompt_ids) if prompt_ids is not None else (
        read_token_file(token_file) if token_file is not None else None)
    options = DiffOptions(
        engine_dir=engine_dir, out=out, reference=reference, preset=preset, weight_seed=weight_seed, seed=seed,
        batch=batch, seq_len=seq_len, prompts=tuple(map(tuple, prompts)) if prompts else None, gen_steps=gen_steps,
        layers=layers, debug_engine=debug_engine, atol=atol, rtol=rtol, tol=tuple(tol),
        reference_device=reference_device)
    console = Console(stderr=True, quiet=not sys.stderr.isatty())
    try:
        check_replaceable(out)
        report = run_diff(options, console)
        files = write_diff_report(report, out)
    except (EngineDirError, BackendUnavailable, DebugEngineError, CheckpointError, ReportDirError) as e:
        raise CliError(str(e), EXIT_FAILURE) from e
    except (ReferenceError, ValueError) as e:
        raise CliError(str(e), EXIT_USAGE) from e
    v = report["verdict"]
    if json_out:
        print(json.dumps({"passed": v["passed"], "first_failing": v["first_failing"],
                          "failing_outputs": v["failing_outputs"], "report": str(out)}))
    err = Console(stderr=True)
    err.print(f"wrote {', '.join(str(f) for f in files)}")
    if not v["passed"]:
        raise CliError(f"engine over tolerance; first failing output: {v['first_failing']} "
                       f"({'; '.join(v['failures'][0]['reasons'])}); see {out / 'report.md'}", EXIT_ACCURACY)
    err.print(f"[green]passed[/green]: every output within tolerance ({len(report['outputs'])} outputs)")
    return 0
