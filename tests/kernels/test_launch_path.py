"""The launchers' host-side path: no wrap_triton in eager mode, wrap_triton while tracing.

Measured with the compiled (non-interpreted) Triton objects and the GPU launch mocked
(tests/kernels/_launch_probe.py, in a subprocess because this folder's conftest sets
TRITON_INTERPRET=1). In the first H200 run every eager launch went through torch.library.wrap_triton's
higher-order op (~0.7 ms per launch there, ~0.2 ms on this CPU), and the fp8 GEMM, whose autotuner
had a prune hook, got a fresh autotuner per call and re-tuned on every call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probe() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "tests.kernels._launch_probe"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert res.returncode == 0 and rows, f"probe failed (rc {res.returncode}):\n{res.stderr[-3000:]}"
    return rows


def test_eager_launches_skip_wrap_triton(probe):
    for row in probe:
        assert row["launches"] >= 1, row
        assert row["wrapped_eager"] == 0, f"{row['case']}: eager launch went through wrap_triton"


def test_traced_launches_use_wrap_triton(probe):
    """Under FakeTensorMode (as inside make_fx / torch.export) every kernel is wrapped, none launched
    (fused_moe's alignment included: its traced form is the kernel by default, moe.TRACED_ALIGN_FORMS)."""
    for row in probe:
        assert row["launched_fake"] == 0, row
        assert row["wrapped_fake"] == row["launches"], row


def test_eager_host_cost_is_a_fraction_of_the_wrap_triton_path(probe):
    # Relative, so a slow or busy CPU does not flake it: measured 5-70 us vs 170-600 us here.
    for row in probe:
        assert row["eager_us"] < 0.35 * row["wrap_triton_us"], row
