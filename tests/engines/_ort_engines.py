"""Tiny ONNX Runtime engines built once per test run (all xdist workers: tests/_shared_build.py) and shared
by the engine, runtime and CLI tests.

Building takes ~20 s on 2 cores (export, passes, ONNX export), so each kind is built once:
  default_cli_engine()   `dsv3-export build` with no arguments, run in a scratch working directory
                         (the README's main job); its exit code, stdout and stderr are kept for the CLI test
  built(precision, device)   build_engine for other targets
Tests must not change these directories (copy_engine first).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from rich.console import Console

from dsv3_export.build import BuildOptions, build_engine
from dsv3_export.checkpoint import preset_model
from tests._shared_build import built_once_in_run

SEED = 0  # the preset's weight seed, as the CLI's default


@dataclass(frozen=True)
class CliBuild:
    path: Path
    exit_code: int
    stderr: str
    stdout: str


@lru_cache(maxsize=None)
def default_cli_engine() -> CliBuild:
    workdir = built_once_in_run("ort_cli_default", _run_cli_build)
    return CliBuild(workdir / "engine", int((workdir / "exit_code").read_text()), (workdir / "stderr").read_text(),
                    (workdir / "stdout").read_text())


def _run_cli_build(workdir: Path) -> None:
    from dsv3_export.cli import main

    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(workdir)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["build"])
    finally:
        os.chdir(cwd)
    for name, text in (("exit_code", str(code)), ("stderr", err.getvalue()), ("stdout", out.getvalue())):
        (workdir / name).write_text(text)


def fp32_engine_dir() -> Path:
    build = default_cli_engine()
    assert build.exit_code == 0, build.stderr[-3000:]
    return build.path


@lru_cache(maxsize=None)
def built(precision: str, device: str = "cpu") -> Path:
    def build(root: Path) -> None:
        build_engine(BuildOptions(preset="tiny", precision=precision, device=device, out=root / "engine", seed=SEED),
                     console=Console(stderr=True, quiet=True))

    return built_once_in_run(f"ort_{device}_{precision}", build) / "engine"


@lru_cache(maxsize=None)
def tiny_model():
    """The reference model the default engine was built from (fp32, eager loop MoE)."""
    return preset_model("tiny", torch.float32, "cpu", seed=SEED)


def copy_engine(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(engine_dir: Path) -> None:
    """Rewrite manifest.json's sizes and hashes from the files as they are now: an engine whose manifest matches
    altered files, as a buggy builder or a malicious directory would hand over."""
    import json

    from dsv3_export.manifest import MANIFEST_NAME, sha256_file

    path = engine_dir / MANIFEST_NAME
    d = json.loads(path.read_text())
    for name in d["files"]:
        p = engine_dir / name
        d["files"][name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    path.write_text(json.dumps(d))
