"""`dsv3-export build`: compile a preset or checkpoint into an engine directory (dsv3_export.build)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dsv3_export.errors import EXIT_FAILURE, EXIT_USAGE, CliError

BACKEND_NAMES = ("onnxruntime", "torch", "tensorrt")


def _pass_list(passes: Optional[str]) -> tuple[str, ...] | None:
    if passes is None:
        return None
    if passes.strip().lower() == "none":
        return ()
    names = tuple(p.strip() for p in passes.split(",") if p.strip())
    if not names:
        raise CliError("--passes: give pass names separated by commas, or 'none'", EXIT_USAGE)
    from dsv3_export.passes.pipeline import PASS_NAMES

    unknown = [n for n in names if n not in PASS_NAMES]
    if unknown:
        raise CliError(f"--passes: unknown pass(es) {unknown}; available: {', '.join(PASS_NAMES)}", EXIT_USAGE)
    return names


def _tune_sizes(given: dict[str, Optional[str]]) -> dict[str, dict[str, int]]:
    """{kind: --tune-KIND's text} -> {kind: sizes} (dsv3_export.export.parse_tune_sizes)."""
    from dsv3_export.export import parse_tune_sizes

    sizes = {}
    for kind, text in given.items():
        if text is not None:
            try:
                sizes[kind] = parse_tune_sizes(kind, text)
            except ValueError as e:
                raise CliError(f"--tune-{kind} {e}", EXIT_USAGE) from None
    return sizes


def build(
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint directory (HF or DeepSeek layout)."),
    preset: Optional[str] = typer.Option(None, help="Built-in configuration with seeded random weights "
                                                    "(tiny, 16b, 671b). Default: tiny."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch | tensorrt"),
    precision: str = typer.Option("fp32", help="fp32 | bf16 | fp8"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    out: Path = typer.Option(Path("engine"), help="Engine directory to write (replaced atomically)."),
    passes: Optional[str] = typer.Option(None, help="Comma-separated passes to run (pipeline order kept), "
                                                    "or 'none'. Default: all."),
    dump_graphs: bool = typer.Option(False, "--dump-graphs", help="Write every intermediate program to OUT.graphs/."),
    verify_each_pass: bool = typer.Option(False, "--verify-each-pass",
                                          help="Run each pass's input and output on random inputs and compare."),
    seed: int = typer.Option(0, help="Seed of the preset's random weights."),
    max_batch_size: Optional[int] = typer.Option(None, help="Override the config's max_batch_size."),
    max_seq_len: Optional[int] = typer.Option(None, help="Override the config's max_seq_len."),
    tune_decode: Optional[str] = typer.Option(None, metavar="BATCH,CACHE_LEN",
                                              help="Sizes the decode program is exported at; the torch backend "
                                                   "tunes its GPU kernels there (TensorRT's opt shape). "
                                                   "Default: 64,1024 within max_batch_size and max_seq_len / 2."),
    tune_prefill: Optional[str] = typer.Option(None, metavar="BATCH,SEQLEN",
                                               help="Sizes the prefill program is exported (and tuned) at. "
                                                    "Default: 2,1024 within max_seq_len / 2."),
) -> None:
    """Compile a model into an engine directory. With no arguments: tiny preset -> onnxruntime cpu fp32 -> ./engine."""
    from dsv3_export.build import BuildOptions, build_engine
    from dsv3_export.checkpoint import CheckpointError
    from dsv3_export.engines.base import DEVICES, PRECISIONS, BackendUnavailable
    from dsv3_export.manifest import EngineDirError
    from dsv3_export.reference.args import ConfigError

    if checkpoint is not None and preset is not None:
        raise CliError("give only one of --checkpoint and --preset", EXIT_USAGE)
    for flag, value, allowed in (("--backend", backend, BACKEND_NAMES), ("--precision", precision, PRECISIONS),
                                 ("--device", device, DEVICES)):
        if value not in allowed:
            raise CliError(f"{flag} {value!r}: choose one of {', '.join(allowed)}", EXIT_USAGE)
    options = BuildOptions(
        preset=preset, checkpoint=checkpoint, backend=backend, precision=precision, device=device, out=out,
        passes=_pass_list(passes), dump_graphs=out.with_name(out.name + ".graphs") if dump_graphs else None,
        verify_each_pass=verify_each_pass, seed=seed, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
        tune=_tune_sizes({"decode": tune_decode, "prefill": tune_prefill}))
    try:
        build_engine(options)
    except BackendUnavailable as e:
        raise CliError(str(e), EXIT_FAILURE) from e
    except (CheckpointError, ConfigError, EngineDirError) as e:
        raise CliError(str(e), EXIT_FAILURE) from e
