"""benchmarks/torch_16b.py runs end to end on the CPU (tiny preset), so the one GPU run does not die
on a typo: a 2-layer decode-only engine (the --n-layers profile run), its timings, the floor and
the per-op profile all land in the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_16b.py"


@pytest.mark.slow  # ~30 s: an AOTInductor build of a 2-layer decode program
def test_cpu_smoke_decode_only_profile_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--precisions", "fp8", "--batches", "1,2",
                           "--prompt-len", "16", "--n-layers", "2", "--engine-kinds", "decode", "--skip", "compile,eager",
                           "--skip-passes", "fuse_shared_experts", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "torch_16b.json").read_text())
    assert data["meta"]["n_layers_override"] == 2 and data["meta"]["skip_passes"] == ["fuse_shared_experts"]
    fp8 = data["results"]["fp8"]
    engine = fp8["engine"]
    assert "error" not in engine, engine
    assert isinstance(engine["decode_ms_b1"], float) and isinstance(engine["decode_ms_b2"], float), engine
    assert engine["decode_logits_rel_err_vs_eager_step"] < 0.1, engine  # fp8 W8A8 vs the weight-only step
    assert "generate_tokens" not in engine  # needs the prefill program, not built here
    assert engine["decode_b1_kernels"]["launches_per_step"] > 0, engine["decode_b1_kernels"]
    assert 0 < fp8["floor"]["decode_ms_b1"] <= fp8["floor"]["decode_ms_b2"]  # rounded to 1 us: tiny may tie
    assert "| fp8 | engine |" in done.stdout
    assert "fuse_shared_experts" not in engine["decode_passes"], engine["decode_passes"]


def test_unknown_skipped_pass_is_a_usage_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--skip-passes", "fuse_everything",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "fuse_everything" in done.stderr, done.stderr[-2000:]
