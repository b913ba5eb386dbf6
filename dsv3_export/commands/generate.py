"""`dsv3-export generate`: load an engine directory and generate tokens from prompt ids."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from dsv3_export.errors import EXIT_FAILURE, EXIT_USAGE, CliError


def parse_prompts(text: str) -> list[list[int]]:
    """'1,2,3' -> [[1, 2, 3]]; '1,2;3,4,5' -> two prompts (a batch)."""
    prompts = []
    for part in text.split(";"):
        try:
            ids = [int(t) for t in part.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise CliError(f"--prompt-ids {text!r}: expected integers separated by ',' (prompts by ';')", EXIT_USAGE)
        if not ids:
            raise CliError(f"--prompt-ids {text!r}: a prompt is empty", EXIT_USAGE)
        prompts.append(ids)
    return prompts


def generate(
    engine_dir: Path = typer.Argument(..., help="Engine directory written by `dsv3-export build`."),
    prompt_ids: str = typer.Option(..., "--prompt-ids", help="Token ids, e.g. 1,2,3; several prompts: 1,2;3,4,5"),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, help="0: greedy; > 0: sampling."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with temperature > 0)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampler."),
    eos_id: Optional[int] = typer.Option(None, help="Stop a prompt after this token."),
    json_out: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
) -> None:
    """Generate tokens with an engine (prefill, then decode with the KV cache on the engine's device)."""
    from rich.console import Console

    from dsv3_export.engines.base import BackendUnavailable
    from dsv3_export.manifest import EngineDirError
    from dsv3_export.runtime import load_engine

    prompts = parse_prompts(prompt_ids)
    err = Console(stderr=True)
    try:
        start = time.perf_counter()
        engine = load_engine(engine_dir)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        new = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, eos_id=eos_id)
        gen_s = time.perf_counter() - start
    except (EngineDirError, BackendUnavailable) as e:
        raise CliError(str(e), EXIT_FAILURE) from e
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from e
    m = engine.manifest
    result = {"engine": str(engine_dir), "backend": m.backend, "device": m.device, "precision": m.precision,
              "prompts": prompts, "new_ids": new, "load_seconds": round(load_s, 4),
              "generate_seconds": round(gen_s, 4),
              "new_tokens_per_second": round(sum(map(len, new)) / gen_s, 2) if gen_s > 0 else None}
    if json_out:
        print(json.dumps(result))
        return
    err.print(f"engine {engine_dir} ({m.backend} {m.device}/{m.precision}) loaded in {load_s:.2f} s")
    for prompt, ids in zip(prompts, new):
        print(f"{','.join(map(str, prompt))} -> {','.join(map(str, ids))}")
    err.print(f"{sum(map(len, new))} new tokens in {gen_s:.2f} s ({result['new_tokens_per_second']} tokens/s)")
