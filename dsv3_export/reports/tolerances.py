"""Tolerances of `dsv3-export diff`, per precision and device, in one table.

Why these numbers: fp32 engines should match the fp32 reference to rounding (the CPU entry is
~100x the largest error measured on the tiny preset's ONNX Runtime engine); on CUDA, fp32 GEMMs
may run in TF32 (ONNX Runtime's CUDA provider enables it by default: ~1e-3 relative). bf16 and
fp8 engines are compared with an fp32 reference model, so their entries allow bf16 rounding of
every activation (and fp8 weight/activation quantization) accumulated over the layers; the
allclose rule alone would flag values near zero, so a small fraction of outliers is allowed and
the cosine floor bounds the overall error. Logit gates bound the distribution change users see.

Override from the command line: --atol / --rtol (every output), --tol 'PATTERN:key=value,...'
(outputs whose name matches the fnmatch PATTERN, e.g. 'layers.*:rtol=0.1' or 'logits:atol=1e-3').
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from dsv3_export.reports.metrics import Tolerance


@dataclass(frozen=True)
class LogitGates:
    """Gates on the logit distributions (None: reported, not gated)."""

    max_kl_mean: float  # nats
    max_kl_p99: float | None
    min_top1: float  # fraction of positions whose argmax agrees
    min_greedy: float | None  # fraction of greedily generated tokens equal to the reference's

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tolerances:
    tensor: Tolerance  # every output: embed, layers.i, norm, logits
    logits: LogitGates


TABLE: dict[tuple[str, str], Tolerances] = {
    ("fp32", "cpu"): Tolerances(Tolerance(atol=1e-4, rtol=1e-3, max_outlier_frac=0.0, min_cosine=0.99999),
                                LogitGates(max_kl_mean=1e-7, max_kl_p99=1e-6, min_top1=0.99, min_greedy=1.0)),
    ("fp32", "cuda"): Tolerances(Tolerance(atol=5e-3, rtol=1e-2, max_outlier_frac=1e-3, min_cosine=0.9999),
                                 LogitGates(max_kl_mean=1e-4, max_kl_p99=1e-3, min_top1=0.98, min_greedy=None)),
    ("bf16", "*"): Tolerances(Tolerance(atol=5e-2, rtol=5e-2, max_outlier_frac=2e-2, min_cosine=0.999),
                              LogitGates(max_kl_mean=1e-2, max_kl_p99=5e-2, min_top1=0.9, min_greedy=None)),
    ("fp8", "*"): Tolerances(Tolerance(atol=1e-1, rtol=1e-1, max_outlier_frac=5e-2, min_cosine=0.99),
                             LogitGates(max_kl_mean=5e-2, max_kl_p99=2e-1, min_top1=0.8, min_greedy=None)),
}
TOLERANCE_KEYS = ("atol", "rtol", "max_outlier_frac", "min_cosine")


def default_tolerances(precision: str, device: str) -> Tolerances:
    for key in ((precision, device), (precision, "*")):
        if key in TABLE:
            return TABLE[key]
    raise ValueError(f"no tolerances for precision {precision!r} on {device!r}; table has {sorted(TABLE)}")


def parse_override(text: str) -> tuple[str, dict[str, float]]:
    """'layers.*:rtol=0.1,atol=1e-3' -> ('layers.*', {'rtol': 0.1, 'atol': 0.001})."""
    pattern, sep, body = text.partition(":")
    if not sep or not pattern or not body:
        raise ValueError(f"--tol {text!r}: expected PATTERN:key=value[,key=value] (keys: {', '.join(TOLERANCE_KEYS)})")
    values = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in TOLERANCE_KEYS:
            raise ValueError(f"--tol {text!r}: {item!r} is not key=value with a key in {', '.join(TOLERANCE_KEYS)}")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"--tol {text!r}: {value!r} is not a number") from None
    return pattern, values


@dataclass(frozen=True)
class ToleranceSet:
    """The tolerance of each output: the table's entry, then --atol/--rtol, then --tol patterns in order."""

    base: Tolerance
    overrides: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()

    @classmethod
    def build(cls, base: Tolerance, atol: float | None = None, rtol: float | None = None,
              per_output: list[str] | tuple[str, ...] = ()) -> "ToleranceSet":
        changes = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
        parsed = tuple((p, tuple(sorted(v.items()))) for p, v in map(parse_override, per_output))
        return cls(base.replace(**changes), parsed)

    def for_output(self, name: str) -> Tolerance:
        tol = self.base
        for pattern, values in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                tol = tol.replace(**dict(values))
        return tol

    def unused_patterns(self, names: list[str]) -> list[str]:
        return [p for p, _ in self.overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]
