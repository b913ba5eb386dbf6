"""`dsv3-export diff`: an engine against the reference model on the same inputs, stage by stage.

    report = run_diff(DiffOptions(engine_dir=Path("engine"), out=Path("diff")))
    report["verdict"]   # {"passed", "first_failing", "failures"}; files: report.json, report.md, *.png

What is compared (all on the same seeded token ids, every position of every prompt):
  * every stage: the hidden state after the embedding, after each block, after the final norm
    (from the debug engine, debug_engine.py) and the logits (from the engine itself), each with
    max/mean abs and rel error (index of the max), cosine, SQNR, allclose outliers and shared-range
    histograms; the first stage over its tolerance is named: that is where the bug is, since
    everything before it matched;
  * the logit distributions: KL(p_ref || p_engine) mean and p99, top-1 agreement, RMS of dp, each
    with a 95% bootstrap interval; and greedy generation over N steps;
  * provenance: versions, device, precision, seeds, and the engine's hash.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from dsv3_export.debug_step import stage_names
from dsv3_export.manifest import MANIFEST_NAME, installed_versions
from dsv3_export.reports import metrics
from dsv3_export.reports.debug_engine import DebugRunner, check_debug_path, ensure_debug_engine
from dsv3_export.reports.reference import load_reference, reference_generate, reference_stages
from dsv3_export.reports.tolerances import ToleranceSet, default_tolerances
from dsv3_export.runtime import Engine, load_engine

SCHEMA = "dsv3-export/diff/1"
LOGITS = "logits"


@dataclass(frozen=True)
class DiffOptions:
    """Mirrors `dsv3-export diff`'s flags."""

    engine_dir: Path
    out: Path
    reference: Path | None = None  # checkpoint directory; default: the engine's recorded source
    preset: str | None = None
    weight_seed: int | None = None  # seed of --preset's weights (default: the engine's, else 0)
    seed: int = 0  # seed of the random prompts
    batch: int = 2
    seq_len: int = 32
    prompts: tuple[tuple[int, ...], ...] | None = None  # instead of random prompts
    gen_steps: int = 16
    layers: bool = True  # per-stage hidden states through the debug engine
    debug_engine: Path | None = None  # where to keep (and reuse) it; default: a temporary directory
    atol: float | None = None
    rtol: float | None = None
    tol: tuple[str, ...] = ()  # per-output overrides, 'PATTERN:key=value,...'
    reference_device: str | None = None  # default: the engine's device


def make_prompts(options: DiffOptions, vocab: int, max_seq_len: int) -> list[list[int]]:
    """The prompts: given ones (checked) or batch x seq_len ids drawn with a seeded generator."""
    if options.prompts is not None:
        prompts = [list(p) for p in options.prompts]
        bad = [t for p in prompts for t in p if not 0 <= t < vocab]
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    else:
        if options.batch < 1 or options.seq_len < 1:
            raise ValueError(f"--batch and --seq-len must be >= 1, got {options.batch}, {options.seq_len}")
        g = torch.Generator().manual_seed(options.seed)
        prompts = torch.randint(0, vocab, (options.batch, options.seq_len), generator=g).tolist()
    longest = max(map(len, prompts))
    # the last greedy token is never fed back (runtime.Engine.generate): the steps write longest + gen_steps - 1
    if longest + max(options.gen_steps - 1, 0) > max_seq_len:
        raise ValueError(f"prompt length {longest} + {options.gen_steps} generated steps exceed the engine's "
                         f"max_seq_len={max_seq_len} (positions written: prompt + steps - 1)")
    return prompts


def _groups(prompts: list[list[int]], max_batch: int) -> list[tuple[list[int], torch.Tensor]]:
    """(row indices, tokens [b, s]) batches of equal-length prompts, at most max_batch rows each."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out = []
    for rows in by_len.values():
        for k in range(0, len(rows), max_batch):
            chunk = rows[k:k + max_batch]
            out.append((chunk, torch.tensor([prompts[i] for i in chunk], dtype=torch.int64)))
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # [b, s, F] -> [b * s, F]


def _locate(index: list[int], where: list[tuple[int, int]]) -> dict[str, int]:
    row, pos = where[index[0]]
    return {"prompt": row, "position": pos, "feature": index[1]}


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def engine_hash(engine_dir: Path) -> str:
    """sha256 of manifest.json, which lists every payload file's sha256: one hash for the engine."""
    return hashlib.sha256((Path(engine_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


class _Collected:
    """Every output of both sides, flattened to [N positions, F] and concatenated over batches."""

    def __init__(self) -> None:
        self.ref: dict[str, list[torch.Tensor]] = {}
        self.test: dict[str, list[torch.Tensor]] = {}
        self.debug_logits: list[torch.Tensor] = []
        self.where: list[tuple[int, int]] = []  # flat position -> (prompt, position)

    def add(self, side: dict[str, list[torch.Tensor]], name: str, t: torch.Tensor) -> None:
        side.setdefault(name, []).append(_flat(t))

    def cat(self, side: dict[str, list[torch.Tensor]], name: str) -> torch.Tensor:
        return torch.cat(side[name])


def _collect(engine: Engine, model, runner: DebugRunner | None, prompts: list[list[int]],
             stages: list[str]) -> _Collected:
    c = _Collected()
    for rows, tokens in _groups(prompts, model.args.max_batch_size):  # <= the engine's max_batch_size
        b, s = tokens.shape
        c.where += [(r, p) for r in rows for p in range(s)]
        ref_logits, ref_hidden = reference_stages(model, tokens)  # [b, s, V], [b, L + 2, s, dim]
        c.add(c.ref, LOGITS, ref_logits)
        c.add(c.test, LOGITS, engine.forward(tokens))
        if runner is not None:
            dbg_logits, hidden = runner(tokens)
            c.debug_logits.append(_flat(dbg_logits))
            for i, name in enumerate(stages):
                c.add(c.ref, name, ref_hidden[:, i])
                c.add(c.test, name, hidden[:, i])
    return c


def _logit_metrics(ref: torch.Tensor, test: torch.Tensor, gates, seed: int) -> dict[str, Any]:
    kl = metrics.kl_per_position(ref, test)
    top1 = metrics.top1_match(ref, test)
    dp = metrics.delta_p(ref, test)
    out = {
        "kl_mean": metrics.bootstrap(kl, np.mean, seed),
        "kl_p99": metrics.bootstrap(kl, metrics.p99, seed),
        "top1_agreement": metrics.bootstrap(top1, np.mean, seed),
        "delta_p_rms": metrics.bootstrap(dp, metrics.rms, seed),
        "samples": {"kl": kl.tolist(), "delta_p": dp.tolist()},
        "gates": gates.to_dict(),
    }
    failures = []
    kl_mean, kl_p99, agree = out["kl_mean"]["value"], out["kl_p99"]["value"], out["top1_agreement"]["value"]
    if not np.isfinite(kl_mean) or kl_mean > gates.max_kl_mean:
        failures.append(f"mean KL {kl_mean:.3g} > {gates.max_kl_mean:g}")
    if gates.max_kl_p99 is not None and (not np.isfinite(kl_p99) or kl_p99 > gates.max_kl_p99):
        failures.append(f"p99 KL {kl_p99:.3g} > {gates.max_kl_p99:g}")
    if agree < gates.min_top1:
        failures.append(f"top-1 agreement {agree:.4f} < {gates.min_top1:g}")
    out["failures"] = failures
    return out


def _greedy(engine: Engine, model, prompts: list[list[int]], steps: int, min_agreement: float | None) -> dict[str, Any]:
    max_b = engine.args.max_batch_size
    test: list[list[int]] = []
    for k in range(0, len(prompts), max_b):
        test += engine.generate(prompts[k:k + max_b], max_new_tokens=steps)
    ref = reference_generate(model, prompts, steps)
    prefix = []
    for r, t in zip(ref, test):
        n = next((i for i, (a, b) in enumerate(zip(r, t)) if a != b), min(len(r), len(t)))
        prefix.append(n)
    same = sum(a == b for r, t in zip(ref, test) for a, b in zip(r, t))
    agreement = sum(prefix) / (steps * len(prompts))
    out = {"steps": steps, "agreement": agreement, "positionwise": same / (steps * len(prompts)),
           "first_divergence": [p if p < steps else None for p in prefix], "reference": ref, "engine": test,
           "min_agreement": min_agreement, "failures": []}
    if min_agreement is not None and agreement < min_agreement:
        out["failures"].append(f"greedy agreement {agreement:.3f} < {min_agreement:g}")
    return out


def run_diff(options: DiffOptions, console: Console | None = None) -> dict[str, Any]:
    """Run the comparison and return the report (see write_diff_report for the files)."""
    console = console or Console(stderr=True, quiet=True)
    engine = load_engine(options.engine_dir)
    if options.layers and options.debug_engine is not None:
        check_debug_path(Path(options.debug_engine), engine)  # before the reference is loaded
    m = engine.manifest
    args = engine.args
    ref_device = options.reference_device or m.device
    console.print(f"reference model on {ref_device} (float32)")
    prompts = make_prompts(options, args.vocab_size, args.max_seq_len)
    model, ref_source = load_reference(m, options.reference, options.preset, options.weight_seed, ref_device,
                                       max_batch_size=len(prompts))
    table = default_tolerances(m.precision, m.device)
    tols = ToleranceSet.build(table.tensor, options.atol, options.rtol, options.tol)
    stages = stage_names(args.n_layers) if options.layers else []

    runner, debug_info, tmp = None, None, None
    try:  # a temporary debug engine is removed whatever happens once it is made (a failure, Ctrl-C)
        if options.layers:
            path = options.debug_engine
            if path is None:
                tmp = Path(tempfile.mkdtemp(prefix="dsv3-diff-debug-"))
                path = tmp / "engine"
            console.print(f"debug engine (hidden state after each stage): {path}")
            ensure_debug_engine(engine, Path(path), console)
            runner = DebugRunner.load(Path(path))
            debug_info = {"path": None if tmp else str(Path(path).absolute()), "hash": engine_hash(Path(path)),
                          "hidden_output": runner.hidden_spec["name"]}
        console.print(f"running {len(prompts)} prompt(s) through the engine and the reference")
        c = _collect(engine, model, runner, prompts, stages)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    outputs = []
    n_stages = len(stage_names(args.n_layers))
    for name in [*stages, LOGITS]:
        depth = stages.index(name) + 1 if name in stages else n_stages + 1  # 1 = embed; logits after norm
        tol = tols.for_output(name, depth)
        stats = metrics.error_stats(c.cat(c.ref, name), c.cat(c.test, name), tol)
        d = stats.to_dict()
        d["max_abs_at"] = _locate(stats.max_abs_index, c.where)
        d["max_rel_at"] = _locate(stats.max_rel_index, c.where)
        outputs.append({"name": name, **d, "tolerance": asdict(tol)})
    ref_logits, test_logits = c.cat(c.ref, LOGITS), c.cat(c.test, LOGITS)
    logits = _logit_metrics(ref_logits, test_logits, table.logits, options.seed)
    if runner is not None:
        consistency = metrics.error_stats(test_logits, torch.cat(c.debug_logits), tols.for_output(LOGITS, 1))
        debug_info["logits_vs_engine"] = {k: getattr(consistency, k) for k in ("max_abs", "cosine", "failures")}
        debug_info["reproduces_engine"] = consistency.passed
    greedy = _greedy(engine, model, prompts, options.gen_steps, table.logits.min_greedy) if options.gen_steps else None

    failing = [o["name"] for o in outputs if not o["passed"]]
    if logits["failures"] or (greedy and greedy["failures"]):
        failing = failing if LOGITS in failing else [*failing, LOGITS]
    failures = [{"output": o["name"], "reasons": o["failures"]} for o in outputs if o["failures"]]
    for section, reasons in (("logit distribution", logits["failures"]), ("greedy", greedy["failures"] if greedy else [])):
        if reasons:
            failures.append({"output": section, "reasons": reasons})
    unused = tols.unused_patterns([o["name"] for o in outputs])
    return {
        "schema": SCHEMA,
        "verdict": {"passed": not failures, "first_failing": failing[0] if failing else None,
                    "failing_outputs": failing, "failures": failures},
        "engine": {"path": str(Path(options.engine_dir).absolute()), "backend": m.backend, "precision": m.precision,
                   "device": m.device, "source": m.source, "hash": engine_hash(options.engine_dir),
                   "built_with": m.versions, "passes": sorted({p["name"] for p in m.passes})},
        "reference": {**ref_source, "dtype": "float32", "device": ref_device, "moe": "eager loop"},
        "inputs": {"seed": options.seed, "prompts": len(prompts), "lengths": sorted({len(p) for p in prompts}),
                   "positions": len(c.where), "given": options.prompts is not None,
                   "prompt_ids": prompts if len(c.where) <= 4096 else None},
        "tolerances": {"table_key": [m.precision, m.device], "base": asdict(tols.base),
                       "overrides": [{"pattern": p, **dict(v)} for p, v in tols.overrides],
                       "unused_overrides": unused, "logits": table.logits.to_dict()},
        "outputs": outputs,
        "logits": logits,
        "greedy": greedy,
        "debug_engine": debug_info,
        "provenance": {"seeds": {"prompts": options.seed if options.prompts is None else None,
                                 "bootstrap": options.seed, "reference_weights": ref_source.get("seed")},
                       "versions": installed_versions(), "torch_device": _device_name(m.device),
                       "reference_device": _device_name(ref_device), "python": platform.python_version(),
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }


def write_diff_report(report: dict[str, Any], out: Path) -> list[Path]:
    """report.json, report.md and the plots, written to a temporary directory renamed to `out`."""
    from dsv3_export.reports import plots
    from dsv3_export.reports.files import atomic_dir, dump_json
    from dsv3_export.reports.render import render_diff

    with atomic_dir(out) as tmp:
        images = plots.diff_plots(report, tmp)
        dump_json(report, tmp / "report.json")
        (tmp / "report.md").write_text(render_diff(report, [p.name for p in images]))
    return [out / "report.json", out / "report.md", *(out / p.name for p in images)]
