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


@pytest.mark.slow  # ~50 s: AOTInductor builds of a 2-layer decode program, twice (--variant)
def test_cpu_smoke_decode_only_profile_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--precisions", "fp8", "--batches", "1,2",
                           "--prompt-len", "16", "--n-layers", "2", "--engine-kinds", "decode", "--skip", "compile,eager",
                           "--skip-passes", "fuse_shared_experts",
                           "--variant", "einsums:DSV3_TORCH_ABSORB_GEMM=0,DSV3_TORCH_NORM_QUANT=1", "--out", str(tmp_path)],
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
    # the --variant build: lowered and compiled from the first build's exported program, its switches
    # recorded and restored (the process environment outside the build is unchanged)
    variant = fp8["engine-einsums"]
    assert "error" not in variant, variant
    assert variant["decode_export_s"] == "shared with the first build", variant
    assert variant["build_env"] == {"DSV3_TORCH_ABSORB_GEMM": "0", "DSV3_TORCH_NORM_QUANT": "1"}
    assert isinstance(variant["decode_ms_b1"], float), variant
    assert data["meta"]["variants"] == {"einsums": variant["build_env"]}
    assert "| fp8 | engine-einsums |" in done.stdout and "fp8-einsums: batch-1 decode step" in done.stdout


@pytest.mark.parametrize("variant", ["x:FOO=1", "x", "two words:DSV3_TORCH_ROUTER=0", "x:DSV3_TORCH_ROUTER="])
def test_malformed_variant_is_a_usage_error(tmp_path, variant):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--variant", variant, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "--variant" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "torch_16b.json").exists()


def test_unknown_skipped_pass_is_a_usage_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--skip-passes", "fuse_everything",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "fuse_everything" in done.stderr, done.stderr[-2000:]
