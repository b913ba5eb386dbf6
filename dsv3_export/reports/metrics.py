"""Error statistics of an engine output against the reference, and logit-distribution metrics.

    stats = error_stats(ref, test, tol)       # ref, test [N, F]: max/mean abs and rel error (with the
                                              # index of the max), cosine, SQNR, outliers, histogram
    kl = kl_per_position(ref_logits, test_logits)      # [N] KL(p_ref || p_test), nats
    ci = bootstrap(kl, np.mean, seed=0)                 # {"value", "ci95": [lo, hi], "n"}

Everything is computed in float64 so the metric never adds error of its own. Uncertainty: the
logit metrics are averages over N positions, so each comes with a 95% percentile-bootstrap
interval (seeded, hence reproducible); for a fraction (top-1 agreement) that is close to the
Wilson interval without its normal approximation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

HIST_BINS = 40
N_BOOT = 1000
_TINY = 1e-30  # guards divisions by an all-zero reference


@dataclass(frozen=True)
class Tolerance:
    """When an output passes: every value finite, at most max_outlier_frac of the elements outside
    |test - ref| <= atol + rtol * |ref| (numpy.allclose's rule), and cosine >= the cosine floor.

    The cosine floor of the stage at depth d (1 = embedding, 2 = layers.0, ...) is
    max(min_cosine, 1 - cos_dist_per_stage * d) when cos_dist_per_stage > 0: rounding adds
    independent error at every layer, so 1 - cosine grows about linearly with depth, while a bug
    makes it jump at one stage. A floor that follows the expected growth keeps the early stages
    strict (where a bug would otherwise hide under the budget of the last layer)."""

    atol: float
    rtol: float
    max_outlier_frac: float = 0.0
    min_cosine: float = 0.0
    cos_dist_per_stage: float = 0.0

    def replace(self, **changes: float) -> "Tolerance":
        return Tolerance(**{**asdict(self), **changes})

    def at_depth(self, depth: int) -> "Tolerance":
        """This tolerance with min_cosine raised to the floor of the stage at `depth` (see above)."""
        if self.cos_dist_per_stage <= 0:
            return self
        return self.replace(min_cosine=max(self.min_cosine, 1.0 - self.cos_dist_per_stage * depth))


@dataclass
class ErrorStats:
    shape: list[int]
    max_abs: float
    max_abs_index: list[int]
    mean_abs: float
    max_rel: float
    max_rel_index: list[int]
    mean_rel: float
    cosine: float
    sqnr_db: float  # 10 log10(||ref||^2 / ||test - ref||^2); inf when equal
    nonfinite: int  # NaN/Inf elements of test where ref is finite
    outlier_frac: float  # fraction outside atol + rtol * |ref|
    failures: list[str]  # why the output fails its tolerance; empty when it passes
    histogram: dict[str, list[float]]  # shared-range value histograms: edges, ref, test

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _index(flat: int, shape: tuple[int, ...]) -> list[int]:
    return [int(i) for i in np.unravel_index(flat, shape)]


def _finite_float(x: torch.Tensor) -> float:
    v = float(x)
    return v if np.isfinite(v) else (float("inf") if v > 0 else float("nan"))


def shared_histogram(ref: torch.Tensor, test: torch.Tensor, bins: int = HIST_BINS) -> dict[str, list[float]]:
    """Histograms of both tensors' finite values over one range (that of both together), so a shift,
    a clipped tail or a collapsed distribution shows as a difference between the two."""
    r, t = ref[torch.isfinite(ref)], test[torch.isfinite(test)]
    both = torch.cat([r, t])
    if both.numel() == 0:
        return {"edges": [], "ref": [], "test": []}
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"edges": edges.tolist(),
            "ref": torch.histc(r, bins, lo, hi).tolist(),
            "test": torch.histc(t, bins, lo, hi).tolist()}


def error_stats(ref: torch.Tensor, test: torch.Tensor, tol: Tolerance) -> ErrorStats:
    """Compare `test` against `ref` (same shape); indices are into that shape."""
    if ref.shape != test.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)} vs engine {tuple(test.shape)}")
    shape = tuple(ref.shape)
    r = ref.detach().to("cpu", torch.float64)
    t = test.detach().to("cpu", torch.float64)
    ref_ok = torch.isfinite(r)
    bad = ~torch.isfinite(t) & ref_ok
    nonfinite = int(bad.sum())
    diff = (t - r).abs()
    diff = torch.where(ref_ok, diff, torch.zeros_like(diff))  # a non-finite reference is not the engine's error
    diff = torch.where(bad, torch.full_like(diff, float("inf")), diff)
    rel = diff / r.abs().clamp_min(_TINY)
    i_abs, i_rel = int(diff.flatten().argmax()), int(rel.flatten().argmax())
    finite = ref_ok & ~bad
    rf, tf = r[finite], t[finite]
    err_sq = float(((tf - rf) ** 2).sum())
    sig_sq = float((rf**2).sum())
    norms = float(rf.norm() * tf.norm())
    cosine = float((rf * tf).sum()) / norms if norms > 0 else (1.0 if err_sq == 0 else 0.0)
    if nonfinite:
        cosine = float("nan")
    sqnr = float("inf") if err_sq == 0 else 10.0 * np.log10(max(sig_sq, _TINY) / err_sq)
    outliers = (diff > tol.atol + tol.rtol * r.abs()) & ref_ok
    outlier_frac = float(outliers.float().mean()) if outliers.numel() else 0.0
    failures = []
    if nonfinite:
        failures.append(f"{nonfinite} NaN/Inf value(s) where the reference is finite")
    if outlier_frac > tol.max_outlier_frac:
        failures.append(f"{outlier_frac:.3g} of elements outside atol={tol.atol:g} + rtol={tol.rtol:g}*|ref| "
                        f"(allowed {tol.max_outlier_frac:g})")
    if not nonfinite and cosine < tol.min_cosine:
        failures.append(f"cosine {cosine:.6f} < {tol.min_cosine}")
    return ErrorStats(
        shape=list(shape), max_abs=_finite_float(diff.flatten()[i_abs]), max_abs_index=_index(i_abs, shape),
        mean_abs=_finite_float(diff[ref_ok].mean()) if ref_ok.any() else 0.0,
        max_rel=_finite_float(rel.flatten()[i_rel]), max_rel_index=_index(i_rel, shape),
        mean_rel=_finite_float(rel[ref_ok].mean()) if ref_ok.any() else 0.0,
        cosine=cosine, sqnr_db=sqnr, nonfinite=nonfinite, outlier_frac=outlier_frac, failures=failures,
        histogram=shared_histogram(r, t))


# --- logits -------------------------------------------------------------------------------------

def kl_per_position(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> np.ndarray:
    """[N, V] logits -> [N] KL(softmax(ref) || softmax(test)) in nats (NaN where test is not finite)."""
    lp = torch.log_softmax(ref_logits.double(), dim=-1)
    lq = torch.log_softmax(test_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1).clamp_min(0.0).numpy()


def top1_match(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> np.ndarray:
    """[N] 1.0 where both pick the same most likely token."""
    return (ref_logits.argmax(-1) == test_logits.argmax(-1)).double().numpy()


def delta_p(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> np.ndarray:
    """[N] p_test(t) - p_ref(t) for t = the reference's top token (llama.cpp's dp, with the reference's
    choice standing in for the text's next token, which random prompts do not have)."""
    p = torch.softmax(ref_logits.double(), dim=-1)
    q = torch.softmax(test_logits.double(), dim=-1)
    top = p.argmax(-1, keepdim=True)
    return (q.gather(-1, top) - p.gather(-1, top)).squeeze(-1).numpy()


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def p99(x: np.ndarray) -> float:
    return float(np.percentile(x, 99))


def bootstrap(samples: np.ndarray, stat: Callable[[np.ndarray], float], seed: int = 0,
              n_boot: int = N_BOOT) -> dict[str, Any]:
    """stat(samples) with its 95% percentile-bootstrap interval (resampling positions, seeded)."""
    samples = np.asarray(samples, dtype=np.float64)
    n = samples.size
    value = float(stat(samples)) if n else float("nan")
    if n < 2 or not np.all(np.isfinite(samples)):
        return {"value": value, "ci95": [value, value], "n": int(n)}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    stats = np.array([stat(samples[d]) for d in draws])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"value": value, "ci95": [float(lo), float(hi)], "n": int(n)}
