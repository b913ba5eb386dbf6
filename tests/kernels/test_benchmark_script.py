"""benchmarks/kernels.py runs end to end on the CPU (--cpu-smoke), so the one GPU run does not die on a typo."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_writes_reports_and_checks_pass(tmp_path, monkeypatch):
    bench = _load()
    monkeypatch.setenv("OUT", str(tmp_path))
    rc = bench.main(["--cpu-smoke", "--quick", "--only", "fp8,moe,mla"])
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert (tmp_path / "kernels.md").read_text().startswith("# Kernel benchmark")
    checked = [r for r in data["rows"] if r["ok"] is not None]
    assert checked and all(r["ok"] for r in checked), [r for r in checked if not r["ok"]]
    assert rc == 0
    sections = {r["section"] for r in data["rows"]}
    assert {"fp8_gemm", "moe", "grouped_gemm", "mla"} <= sections
    ours = [r for r in data["rows"] if r["impl"].startswith("triton") and r["speedup_vs_best_alt"] is not None]
    assert ours, "every section compares against a torch alternative"


def test_unknown_section_is_a_usage_error():
    bench = _load()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--cpu-smoke", "--only", "nope"])
    assert exc.value.code == 2
