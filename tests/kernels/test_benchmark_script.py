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
    # no time budget: every section must run (the default 180 s skipped the last one, fp8, on a loaded 2-core machine)
    rc = bench.main(["--cpu-smoke", "--budget-s", "3600",
                     "--only", "fp8,moe,mla,mla_sweep,router,absorb,moe_cfg,gemv,decode_cold,norms"])
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert (tmp_path / "kernels.md").read_text().startswith("# Kernel benchmark")
    checked = [r for r in data["rows"] if r["ok"] is not None]
    assert checked and all(r["ok"] for r in checked), [r for r in checked if not r["ok"]]
    assert rc == 0
    sections = {r["section"] for r in data["rows"]}
    assert {"fp8_gemm", "moe", "grouped_gemm", "mla", "mla_sweep", "router", "absorb", "moe_cfg",
            "gemv", "decode_cold", "norms"} <= sections
    ours = [r for r in data["rows"] if r["impl"].startswith("triton") and r["speedup_vs_best_alt"] is not None]
    assert ours, "every section compares against a torch alternative"


def test_unknown_section_is_a_usage_error():
    bench = _load()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--cpu-smoke", "--only", "nope"])
    assert exc.value.code == 2


def test_ragged_k_padding_of_the_scaled_mm_baseline_keeps_the_product(seed):
    """The _scaled_mm baseline gets K zero-padded to a multiple of 128; the product must not change."""
    import torch

    from dsv3_export.kernels.fp8_gemm import fp8_gemm_ref
    from dsv3_export.reference import fp8 as R

    bench = _load()
    torch.manual_seed(seed)
    a, a_s = R.act_quant(torch.randn(5, 300))
    w, w_s = R.weight_quant(torch.randn(70, 300))
    a_p, w_p = bench._pad_k(a), bench._pad_k(w)
    assert a_p.shape == (5, 384) and w_p.shape == (70, 384) and a_p.dtype == w_p.dtype == torch.float8_e4m3fn
    assert torch.equal(a_p[:, :300].view(torch.uint8), a.view(torch.uint8))
    assert (a_p[:, 300:].float() == 0).all() and (w_p[:, 300:].float() == 0).all()
    assert bench._pad_k(a_p) is a_p
    ref = fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
    padded = fp8_gemm_ref(a_p, a_s, w_p, w_s, torch.float32)  # the same scales cover the pad
    torch.testing.assert_close(padded, ref, rtol=1e-5, atol=1e-4)  # only the fp32 summation order differs


@pytest.mark.parametrize("m,k", [(1, 300), (5, 1100), (16, 512)])
def test_blockwise_scaled_mm_operands_follow_the_cublas_layout(seed, m, k):
    """The blockwise _scaled_mm baseline's operands: K padded so ceil(K/128) is a multiple of 4 (the
    leading dimension cuBLAS reads the 128x128 scales with), M padded to 16 rows, 1x128 scales
    outer-dim-major, and the same product on the original rows."""
    import torch

    from dsv3_export.kernels.fp8_gemm import fp8_gemm_ref
    from dsv3_export.reference import fp8 as R

    bench = _load()
    torch.manual_seed(seed)
    a, a_s = R.act_quant(torch.randn(m, k))
    w, w_s = R.weight_quant(torch.randn(200, k))
    a_p, s_a, w_p, s_b = bench._blockwise_operands(a, a_s, w, w_s)
    m_p, k_p = a_p.shape
    blocks = k_p // 128
    assert k_p % 512 == 0 and k_p - k < 512 and m_p % 16 == 0 and m_p - m < 16 and w_p.shape == (200, k_p)
    # torch's is_blockwise_1x128_scaling(a, scale_a) and is_blockwise_128x128_scaling(b.t(), scale_b.t())
    assert s_a.shape == (m_p, blocks) and s_a.stride() == (1, m_p)
    assert s_b.t().shape == (2, blocks) and s_b.t().stride() == (blocks, 1)
    out = fp8_gemm_ref(a_p, s_a.contiguous(), w_p, s_b.t().contiguous(), torch.float32)[:m]
    torch.testing.assert_close(out, fp8_gemm_ref(a, a_s, w, w_s, torch.float32), rtol=1e-5, atol=1e-4)
    assert (a_p[m:].float() == 0).all() and (a_p[:, k:].float() == 0).all() and (w_p[:, k:].float() == 0).all()


def test_summary_table_is_the_last_output(tmp_path, monkeypatch, capsys):
    bench = _load()
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--cpu-smoke", "--only", "router"]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("case "))
    assert all(line.startswith("softmax router") for line in lines[header + 1:]), lines[header:]
    assert len(lines) - header - 1 == 6  # M = 1, 5, 24: router_topk (triton) and torch's ops
