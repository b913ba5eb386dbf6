"""Checkpoints and engines shared by the report tests, built once per run (all xdist workers) (~25 s per build on 2 cores).

A 4-layer tiny model (so a bug in layer 2 has a layer after it) saved as checkpoints:
  clean          the model as drawn
  bug_layer2     layers.2.attn.wo.weight perturbed (2% of its std): the injected bug
  bug_layer1     layers.1.ffn.shared_experts.w2.weight perturbed: a wrong *reference*
and ONNX Runtime cpu/fp32 engines built from `clean` and `bug_layer2`, and their debug engines (the
hidden state after each stage), built by ensure_debug_engine as diff builds them: diff then reuses
them (it only reads a debug engine that matches), instead of each xdist worker building its own two.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console

from dsv3_export.build import BuildOptions, build_engine
from dsv3_export.checkpoint import preset_model, save_checkpoint
from dsv3_export.reports.debug_engine import ensure_debug_engine
from dsv3_export.runtime import load_engine
from tests._shared_build import built_once, built_once_in_run

N_LAYERS = 4
PERTURBED = {"bug_layer2": "layers.2.attn.wo.weight", "bug_layer1": "layers.1.ffn.shared_experts.w2.weight"}
NOISE = 0.02  # of the weight's std
CHECKPOINTS = ("clean", *PERTURBED)
ENGINES = ("clean", "bug_layer2")  # built from the checkpoints of the same names


@dataclass(frozen=True)
class Artifacts:
    checkpoints: dict[str, Path]
    engines: dict[str, Path]

    def debug_engine(self, name: str) -> Path:
        """The engine's debug build, passed to diff as --debug-engine (reused), built on first use: a
        separate shared build, so the profile tests (engines only) do not wait for it."""
        def build(out: Path) -> None:
            ensure_debug_engine(load_engine(self.engines[name]), out / "debug")

        return built_once_in_run(f"report_debug_{name}", build) / "debug"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    """Checkpoints and engines built once per run for every xdist worker (tests/_shared_build.py)."""
    root = built_once(tmp_path_factory, "report_artifacts", _build_artifacts)
    checkpoints = {name: root / f"ckpt_{name}" for name in CHECKPOINTS}
    return Artifacts(checkpoints, {name: root / f"engine_{name}" for name in ENGINES})


def _build_artifacts(root: Path) -> None:
    for name in CHECKPOINTS:
        model = preset_model("tiny", torch.float32, "cpu", seed=0, n_layers=N_LAYERS)
        if name in PERTURBED:
            w = model.state_dict()[PERTURBED[name]]
            g = torch.Generator().manual_seed(1)
            w.add_(torch.randn(w.shape, generator=g) * w.std() * NOISE)
        save_checkpoint(model, root / f"ckpt_{name}")
    for name in ENGINES:
        with contextlib.redirect_stdout(io.StringIO()):
            build_engine(BuildOptions(checkpoint=root / f"ckpt_{name}", out=root / f"engine_{name}"),
                         Console(stderr=True, quiet=True))
