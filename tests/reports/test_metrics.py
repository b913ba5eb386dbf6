"""Error statistics, logit metrics, bootstrap intervals and the tolerance table, on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsv3_export.reports import metrics
from dsv3_export.reports.metrics import Tolerance, error_stats
from dsv3_export.reports.tolerances import TABLE, ToleranceSet, default_tolerances, parse_override

LOOSE = Tolerance(atol=1e9, rtol=1e9)


def test_error_stats_known_values(seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(7, 13, generator=g) + 3.0  # no element near zero
    test = ref.clone()
    test[4, 9] += 0.5
    s = error_stats(ref, test, Tolerance(atol=0.1, rtol=0.0))
    assert s.max_abs == pytest.approx(0.5) and s.max_abs_index == [4, 9]
    assert s.mean_abs == pytest.approx(0.5 / ref.numel())
    assert s.max_rel == pytest.approx(0.5 / abs(float(ref[4, 9])))
    expected_sqnr = 10 * math.log10(float((ref.double() ** 2).sum()) / 0.25)
    assert s.sqnr_db == pytest.approx(expected_sqnr, rel=1e-6)
    cos = float(torch.nn.functional.cosine_similarity(ref.double().flatten(), test.double().flatten(), dim=0))
    assert s.cosine == pytest.approx(cos, abs=1e-12)
    assert s.outlier_frac == pytest.approx(1 / ref.numel())
    assert not s.passed and "outside atol" in s.failures[0]
    assert error_stats(ref, test, Tolerance(atol=0.1, rtol=0.0, max_outlier_frac=0.02)).passed
    assert not error_stats(ref, test, Tolerance(atol=1.0, rtol=0.0, min_cosine=0.9999999)).passed


def test_equal_tensors_pass_with_infinite_sqnr():
    ref = torch.randn(5, 6)
    s = error_stats(ref, ref.clone(), Tolerance(atol=0.0, rtol=0.0, min_cosine=0.999999))
    assert s.passed and s.max_abs == 0.0 and s.sqnr_db == float("inf")
    h = s.histogram
    assert h["ref"] == h["test"] and sum(h["ref"]) == ref.numel() and len(h["edges"]) == metrics.HIST_BINS + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_values_fail_whatever_the_tolerance(bad):
    ref = torch.randn(4, 8)
    test = ref.clone()
    test[2, 5] = bad
    s = error_stats(ref, test, LOOSE)
    assert not s.passed and s.nonfinite == 1 and s.max_abs_index == [2, 5]
    assert "NaN/Inf" in s.failures[0]


def test_shared_histogram_shows_a_shift():
    ref = torch.zeros(1000)
    h = metrics.shared_histogram(ref, ref + 1.0, bins=10)
    assert h["edges"][0] == 0.0 and h["edges"][-1] == 1.0
    assert h["ref"][0] == 1000 and h["test"][-1] == 1000


def test_logit_metrics():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 30, generator=g)
    assert np.allclose(metrics.kl_per_position(ref, ref), 0.0, atol=1e-15)
    shifted = ref + 7.0  # softmax is shift invariant
    assert np.allclose(metrics.kl_per_position(ref, shifted), 0.0, atol=1e-12)
    assert metrics.top1_match(ref, shifted).mean() == 1.0
    swapped = ref.clone()
    top = ref.argmax(-1)
    swapped[torch.arange(50), top] = ref.min() - 1  # the top token becomes the least likely
    kl = metrics.kl_per_position(ref, swapped)
    assert (kl > 0).all() and metrics.top1_match(ref, swapped).sum() == 0
    p = torch.softmax(ref.double(), -1)
    q = torch.softmax(swapped.double(), -1)
    expected = (q[torch.arange(50), top] - p[torch.arange(50), top]).numpy()
    assert np.allclose(metrics.delta_p(ref, swapped), expected)


def test_bootstrap_interval_is_seeded_and_covers_the_value():
    x = np.random.default_rng(3).exponential(size=400)
    a = metrics.bootstrap(x, np.mean, seed=1)
    assert a == metrics.bootstrap(x, np.mean, seed=1)
    lo, hi = a["ci95"]
    assert lo < a["value"] < hi and a["n"] == 400
    se = x.std(ddof=1) / np.sqrt(x.size)  # the bootstrap interval ~ +-1.96 standard errors
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)
    nan = metrics.bootstrap(np.array([1.0, np.nan]), np.mean)  # NaN propagates to the interval, no crash
    assert np.isnan(nan["value"]) and all(np.isnan(nan["ci95"]))


def test_tolerance_table_and_overrides():
    assert set(TABLE) >= {("fp32", "cpu"), ("fp32", "cuda"), ("bf16", "*"), ("fp8", "*")}
    assert default_tolerances("bf16", "cuda") is TABLE[("bf16", "*")]
    with pytest.raises(ValueError, match="no tolerances"):
        default_tolerances("int4", "cpu")
    base = TABLE[("fp32", "cpu")].tensor
    tols = ToleranceSet.build(base, atol=1e-2, per_output=["layers.*:rtol=0.5", "layers.3:min_cosine=0"])
    assert tols.for_output("logits") == base.replace(atol=1e-2)
    assert tols.for_output("layers.1") == base.replace(atol=1e-2, rtol=0.5)
    assert tols.for_output("layers.3") == base.replace(atol=1e-2, rtol=0.5, min_cosine=0.0)
    assert tols.unused_patterns(["embed", "layers.3"]) == []
    assert ToleranceSet.build(base, per_output=["head:atol=1"]).unused_patterns(["logits"]) == ["head"]
    deep = Tolerance(atol=1.0, rtol=0.5, min_cosine=0.99, cos_dist_per_stage=1e-3)
    assert deep.at_depth(1).min_cosine == pytest.approx(0.999) and deep.at_depth(5).min_cosine == pytest.approx(0.995)
    assert deep.at_depth(50).min_cosine == 0.99  # never below the absolute floor
    assert base.at_depth(3) == base  # no per-stage budget: unchanged
    assert ToleranceSet.build(deep).for_output("layers.0", depth=2).min_cosine == pytest.approx(0.998)
    for bad in ("logits", "logits:", "logits:atol", "logits:speed=1", "logits:atol=x"):
        with pytest.raises(ValueError):
            parse_override(bad)
