"""One tiny (2-layer) fp32 CPU torch engine per test run (all xdist workers: tests/_shared_build.py), shared by the Python and C++ runtime tests.

AOTInductor compiles each program in ~30-60 s on 2 cores, so the engine is built once (through
the same build_engine the CLI uses: export -> passes -> torch backend) and memoized here rather
than in a fixture, which pytest would instantiate once per test module that imports it.
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from dsv3_export.reference.model import Transformer
from tests._shared_build import built_once_in_run

PRESET, SEED = "tiny", 0
# The dense layer and one MoE layer (tiny has one more MoE layer): what every test of the engine reads,
# at two thirds of the three-layer build (~150 s on a busy 2-core CI machine, the suite's largest setup).
N_LAYERS = 2


def skip_reason() -> str | None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "AOTInductor needs a C++ compiler (c++/g++) on PATH"
    return None


@lru_cache(maxsize=None)
def tiny_torch_engine() -> Path:
    """Path of the run's engine directory (built on first use by any worker; then memoized here)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from rich.console import Console

    from dsv3_export.build import BuildOptions, build_engine

    def build(root: Path) -> None:
        build_engine(BuildOptions(preset=PRESET, seed=SEED, backend="torch", precision="fp32", device="cpu",
                                  config_overrides=(("n_layers", N_LAYERS),), out=root / "engine"),
                     console=Console(stderr=True, quiet=True))

    return built_once_in_run("tiny_torch_engine", build) / "engine"


def reference_model() -> Transformer:
    """The model the engine was built from (same preset and seed), eager, DeepSeek's MoE loop."""
    from dsv3_export.checkpoint import preset_model

    return preset_model(PRESET, torch.float32, "cpu", seed=SEED, attn_impl="absorb", n_layers=N_LAYERS).eval()
