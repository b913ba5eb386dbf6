"""benchmarks/kbench/common.py finish_group: the speedup column of benchmarks/kernels.py compares a CUDA-graph row
with the torch rows also timed from graphs (a replay's launch costs the GPU a few microseconds an eager row's does
not), and an eager row with every torch row."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_finish_group_compares_graph_rows_with_graph_baselines(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kbench.common import Row, finish_group

    rows = [Row("fp8_prefill", "w2", "torch._scaled_mm blockwise", 0.150),
            Row("fp8_prefill", "w2", "gluon ws", 0.152),
            Row("fp8_prefill", "w2", "torch._scaled_mm blockwise (CUDA graph)", 0.160),
            Row("fp8_prefill", "w2", "gluon ws (CUDA graph)", 0.158)]
    finish_group(rows)
    assert rows[1].speedup_vs_best_alt == pytest.approx(0.150 / 0.152)
    assert rows[3].speedup_vs_best_alt == pytest.approx(0.160 / 0.158)  # not 0.150 / 0.158
    assert rows[0].speedup_vs_best_alt is None and rows[2].speedup_vs_best_alt is None
    only_eager = [Row("mla", "B=32", "torch sdpa", 0.060), Row("mla", "B=32", "triton mla_decode (CUDA graph)", 0.050)]
    finish_group(only_eager)
    assert only_eager[1].speedup_vs_best_alt == pytest.approx(0.060 / 0.050)  # no graphed baseline: every torch row
