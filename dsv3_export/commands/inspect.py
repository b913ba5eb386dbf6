"""`dsv3-export inspect`: what an engine directory holds (manifest, I/O, ops, sizes), after verifying it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dsv3_export.errors import EXIT_FAILURE, CliError


def inspect(
    engine_dir: Path = typer.Argument(..., help="Engine directory."),
    skip_hashes: bool = typer.Option(False, "--skip-hashes", help="Check file sizes only (large engines)."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
) -> None:
    """Manifest, inputs/outputs, KV-cache layout, passes, lowered ops, op histogram, file sizes."""
    from rich.console import Console
    from rich.table import Table

    from dsv3_export.build import human_bytes
    from dsv3_export.manifest import EngineDirError, verify_engine_dir

    try:
        m = verify_engine_dir(engine_dir, check_hashes=not skip_hashes)
    except EngineDirError as e:
        raise CliError(str(e), EXIT_FAILURE) from e
    if json_out:
        print(json.dumps(m.to_dict(), indent=2))
        return
    console = Console()
    cfg = m.model
    head = Table(title=f"{engine_dir}  ({'sizes checked' if skip_hashes else 'verified: sizes + sha256'})",
                 show_header=False)
    head.add_row("backend / device / precision", f"{m.backend} / {m.device} / {m.precision}")
    head.add_row("format version / created", f"{m.format_version} / {m.created}")
    head.add_row("source", json.dumps(m.source))
    head.add_row("model", f"dim {cfg['dim']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, vocab "
                          f"{cfg['vocab_size']}, {cfg['n_routed_experts']} experts top-{cfg['n_activated_experts']}, "
                          f"max_seq_len {cfg['max_seq_len']}")
    head.add_row("KV cache", f"{m.kv_cache['shape']} {m.kv_cache['dtype']}")
    head.add_row("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items() if v) +
                 (f"; compute capability {m.compute_capability}" if m.compute_capability else ""))
    head.add_row("passes", ", ".join(f"{p['name']}={p['matches']}" for p in m.passes) or "none")
    for op, how in m.lowerings.items():
        head.add_row(op, how)
    for key, value in m.backend_info.items():
        head.add_row(key, str(value))
    console.print(head)
    io = Table(title="inputs / outputs")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for kind, specs in (("in", m.inputs), ("out", m.outputs)):
        for s in specs:
            io.add_row(kind, s["name"], s["dtype"], str(s["shape"]))
    console.print(io)
    ops = Table(title=f"payload ops ({sum(m.op_histogram.values())} nodes)")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in m.op_histogram.items():
        ops.add_row(op, str(n))
    console.print(ops)
    files = Table(title="files")
    for col in ("file", "size", "sha256"):
        files.add_column(col)
    for name, e in sorted(m.files.items()):
        files.add_row(name, human_bytes(e.size), e.sha256[:16] + "...")
    console.print(files)
