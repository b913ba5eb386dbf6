"""benchmarks/mla_config_probe.py runs on the CPU (Triton interpreter, tiny shapes, two configs), so the GPU
run does not die on a typo in its shared path: every point computed, within the tolerance of mla_decode_ref,
the JSON written. Its CUDA-graph timing runs on the GPU only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mla_config_probe.py"


def test_cpu_smoke_checks_every_point(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "mla_config_probe.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows  # a config that failed to run
    assert len(rows) == 4 and all(r["mean_rel_err"] < 1e-2 for r in rows), rows
