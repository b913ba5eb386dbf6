"""`dsv3-export profile`: latency of one or more engines (dsv3_export.reports.profile)."""

from __future__ import annotations

from pathlib import Path

import typer

from dsv3_export.errors import EXIT_FAILURE, EXIT_USAGE, CliError


def int_list(flag: str, text: str) -> tuple[int, ...]:
    """The comma-separated positive integers of `flag`, each once in the order given (`--batch 1,1` timed the same
    configuration twice)."""
    try:
        values = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected integers separated by commas", EXIT_USAGE) from None
    if not values or any(v < 1 for v in values):
        raise CliError(f"{flag} {text!r}: expected positive integers", EXIT_USAGE)
    return tuple(dict.fromkeys(values))


def profile(
    engine_dir: Path = typer.Argument(..., help="Engine directory written by `dsv3-export build`."),
    out: Path = typer.Option(..., help="Report directory: report.json (raw samples), report.md, profile.png."),
    batch: str = typer.Option("1", help="Batch sizes, e.g. 1,8,64."),
    prompt_len: str = typer.Option("128", help="Prompt lengths, e.g. 128,1024."),
    decode_steps: int = typer.Option(64, help="Decode steps timed after each prefill."),
    warmup: int = typer.Option(1, help="Untimed runs per configuration."),
    repeats: int = typer.Option(3, help="Timed runs per configuration."),
    seed: int = typer.Option(0, help="Seed of the random prompt ids."),
    trace: bool = typer.Option(False, "--trace", help="Also write a per-op trace of one run (ONNX Runtime "
                                                      "profiling JSON or torch.profiler trace)."),
    compare: list[Path] = typer.Option([], "--compare", help="More engine directories, profiled side by side "
                                                              "(repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> int:
    """TTFT per prompt length and per-token decode latency (min/mean/median/p90/p99), tokens/s, peak memory."""
    import json

    from rich.console import Console

    from dsv3_export.engines.base import BackendUnavailable
    from dsv3_export.manifest import EngineDirError
    from dsv3_export.reports.files import ReportDirError
    from dsv3_export.reports.profile import ProfileOptions, write_profile_report

    options = ProfileOptions(
        engine_dirs=(engine_dir, *compare), out=out, batches=int_list("--batch", batch),
        prompt_lens=int_list("--prompt-len", prompt_len), decode_steps=decode_steps, warmup=warmup,
        repeats=repeats, seed=seed, trace=trace)
    console = Console(stderr=True)
    try:
        report, files = write_profile_report(options, console)
    except (EngineDirError, BackendUnavailable, ReportDirError) as e:
        raise CliError(str(e), EXIT_FAILURE) from e
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from e
    if json_out:
        print(json.dumps({"report": str(out), "engines": [
            {"label": e.label, "results": [{"batch": r.batch, "prompt_len": r.prompt_len, "skipped": r.skipped,
                                            "ttft_ms_median": r.ttft_ms.median if r.ttft_ms else None,
                                            "tpot_ms_median": r.tpot_ms.median if r.tpot_ms else None}
                                           for r in e.results]} for e in report.engines]}))
    console.print(f"wrote {', '.join(str(f) for f in files)}")
    problems = profile_problems(report)
    if problems:
        raise CliError(". ".join(problems), EXIT_FAILURE)
    return 0


def profile_problems(report) -> list[str]:
    """Why the profile is incomplete: configurations whose runs raised, engines with nothing measured."""
    from dsv3_export.reports.profile import failed_configs, unmeasured_engines

    problems = []
    failed = failed_configs(report)
    if failed:
        problems.append(f"{len(failed)} configuration(s) failed (recorded in the report): " + "; ".join(failed))
    skipped = unmeasured_engines(report)
    if skipped:
        problems.append("every configuration was skipped, nothing was measured (" + "; ".join(skipped) + ")")
    return problems
