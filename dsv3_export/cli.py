"""`dsv3-export` command line: a thin layer over typed functions.

Each command lives in its own module and is registered here in one line. Errors become one line
on stderr and an exit code (0 ok, 1 failure, 2 usage error, 3 accuracy gate failed, 130 interrupted, 143
terminated); set
DSV3_EXPORT_DEBUG=1 for the traceback. Machine-readable output (--json) goes to stdout alone.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dsv3_export.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError

app = typer.Typer(
    name="dsv3-export",
    help="Compile DeepSeek-V3-architecture checkpoints into inference engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root() -> None:
    """Compile DeepSeek-V3-architecture checkpoints into inference engines."""


def resolve_args(preset: Optional[str], checkpoint: Optional[Path], config: Optional[Path] = None):
    """The ModelArgs named by exactly one of --preset / --checkpoint / --config."""
    from dsv3_export.reference import ModelArgs

    from dsv3_export.checkpoint import CheckpointError, load_args
    from dsv3_export.reference.args import ConfigError

    given = [x for x in (preset, checkpoint, config) if x is not None]
    if len(given) > 1:
        raise CliError("give only one of --preset, --checkpoint, --config", EXIT_USAGE)
    try:
        if checkpoint is not None:
            return load_args(checkpoint)
        if config is not None:
            return ModelArgs.from_json(config)
        return ModelArgs.preset(preset or "tiny")
    except (CheckpointError, ConfigError) as e:  # their messages name the file or the preset
        raise CliError(str(e), EXIT_FAILURE) from e


@app.command()
def info(
    preset: Optional[str] = typer.Option(None, help="Built-in configuration: tiny, 16b, 671b."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint directory (config.json + safetensors)."),
    config: Optional[Path] = typer.Option(None, help="A DeepSeek-layout config JSON (ModelArgs keys)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Parameters (total, active per token), KV-cache bytes per token, weight bytes bf16 vs fp8."""
    import json

    from rich.table import Table

    from dsv3_export.stats import model_stats

    args = resolve_args(preset, checkpoint, config)
    stats = model_stats(args)
    if json_out:
        print(json.dumps({"config": args.to_dict(), "stats": stats.to_dict()}, indent=2))
        return
    absorbed, naive = stats.kv_bytes_per_token(2)
    table = Table(title=f"{preset or checkpoint or config or 'tiny'}", show_header=False)
    rows = [
        ("parameters", f"{stats.total_params / 1e9:.3f} B"),
        ("active per token", f"{stats.active_params_per_token / 1e9:.3f} B (top-{args.n_activated_experts} of "
                             f"{args.n_routed_experts} experts + {args.n_shared_experts} shared; no embedding)"),
        ("KV cache / token, absorbed", f"{absorbed:,} B bf16 ({args.latent_cache_width} values x {args.n_layers} layers)"),
        ("KV cache / token, naive", f"{naive:,} B bf16 ({1 - absorbed / naive:.0%} saved by the latent cache)"),
        ("weights bf16", f"{stats.weight_bytes_bf16 / 1e9:.3f} GB"),
        ("weights fp8", f"{stats.weight_bytes_fp8 / 1e9:.3f} GB (e4m3 + 128x128 fp32 scales; embed/gate/norm/head bf16)"),
        ("YaRN", f"{'on' if args.yarn_enabled else 'off'}; softmax scale {args.softmax_scale:.6f}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


from dsv3_export.commands import build as _build_cmd, generate as _generate_cmd, inspect as _inspect_cmd  # noqa: E402

app.command("build")(_build_cmd.build)
app.command("generate")(_generate_cmd.generate)
app.command("inspect")(_inspect_cmd.inspect)
from dsv3_export.commands import diff as _diff_cmd, profile as _profile_cmd  # noqa: E402

app.command("diff")(_diff_cmd.diff)
app.command("profile")(_profile_cmd.profile)


EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report 128 + the signal
EXIT_TERMINATED = 143  # SIGTERM (timeout, docker stop, Slurm)


class Terminated(BaseException):
    """SIGTERM as an exception: it unwinds like Ctrl-C, so a half-written engine's temporary directory is removed
    (atomic_directory) instead of being left behind by Python's default action, which exits at once."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: Optional[list[str]] = None) -> int:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: Optional[list[str]]) -> int:
    try:
        result = app(args=argv, standalone_mode=False)
    except Terminated:
        stderr.print("terminated (SIGTERM); nothing was left half-written")
        return EXIT_TERMINATED
    except typer.Exit as e:
        if e.exit_code == EXIT_INTERRUPTED:  # typer's form of KeyboardInterrupt
            stderr.print("interrupted; nothing was left half-written")
        return e.exit_code
    except typer.Abort:
        stderr.print("aborted")
        return EXIT_FAILURE
    except CliError as e:
        if os.environ.get("DSV3_EXPORT_DEBUG"):
            traceback.print_exc()
        stderr.print(f"[red]error:[/red] {e}", highlight=False)
        return e.exit_code
    except Exception as e:  # every other failure: one line, exit 1
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()  # click/typer usage errors print their own message (exit 2)
            return e.exit_code
        if os.environ.get("DSV3_EXPORT_DEBUG"):
            traceback.print_exc()
        stderr.print(f"[red]error:[/red] {type(e).__name__}: {e}", highlight=False)
        return EXIT_FAILURE
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
