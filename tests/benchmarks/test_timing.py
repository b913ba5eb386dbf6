"""benchmarks/_timing.py interleaved_ms: the rows it compares are timed round-robin, one median_ms per fn per round
(CUDA events need a GPU, so median_ms is replaced by a recorder here)."""

from __future__ import annotations

from pathlib import Path


def test_interleaved_ms_times_each_fn_once_per_round(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import _timing

    calls = []

    def fake_median_ms(fn, flush, warmup_ms, rep_ms):
        calls.append((fn(), flush, warmup_ms, rep_ms))
        return float(len(calls))

    monkeypatch.setattr(_timing, "median_ms", fake_median_ms)
    times = _timing.interleaved_ms({"base": lambda: "b", "ours": lambda: "o"}, "read", rounds=3, warmup_ms=1.0,
                                   rep_ms=2.0)
    assert [c[0] for c in calls] == ["b", "o", "o", "b", "b", "o"]  # a clock drift moves both rows of a round
    assert {c[1:] for c in calls} == {("read", 1.0, 2.0)}
    assert times == {"base": [1.0, 4.0, 5.0], "ours": [2.0, 3.0, 6.0]}  # each fn's timings in round order


def test_interleaved_ms_rotates_which_fn_starts_a_round(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import _timing

    calls = []
    monkeypatch.setattr(_timing, "median_ms", lambda fn, *args: calls.append(fn()) or 1.0)
    _timing.interleaved_ms({"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}, "read", rounds=4)
    assert calls == list("abc" "bca" "cab" "abc")  # the fn that starts a round rotates
    assert _timing.interleaved_ms({}, "read", rounds=2) == {}
