"""benchmarks/kernels.py section fp8_prefill runs on the CPU (--cpu-smoke) and checks every candidate.

The GPU run times the TMA + persistent prefill candidates once, pinned; this makes sure that one
run cannot die on the section's plumbing and that every candidate row carries a correctness check.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels_fp8_prefill", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_fp8_prefill_section_checks_every_candidate(tmp_path, monkeypatch):
    from dsv3_export.kernels import fp8_gemm_persistent as P

    bench = _load()
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--cpu-smoke", "--only", "fp8_prefill"]) == 0
    rows = [r for r in json.loads((tmp_path / "kernels.json").read_text())["rows"] if r["section"] == "fp8_prefill"]
    # The tiny w1/w3 shape (K=160, N=200) is TMA-aligned: every candidate runs there, checked at 1e-3.
    w13 = [r for r in rows if "w1/w3" in r["case"]]
    tma = {r["impl"].removeprefix("triton tma ") for r in w13 if r["impl"].startswith("triton tma ")}
    assert tma == set(P.PREFILL_CANDIDATES)
    ours = [r for r in rows if r["impl"].startswith("triton")]
    assert all(r["ok"] and r["tol"] == 1e-3 and r["error"] < 1e-3 for r in ours), ours
    assert all(r["speedup_vs_best_alt"] is not None for r in ours), "each case has a torch baseline"
    assert any(r["impl"].startswith("torch._scaled_mm") for r in w13)


def test_fp8_prefill_section_is_registered():
    bench = _load()
    assert bench.SECTIONS["fp8_prefill"][1] is bench.bench_fp8_prefill
