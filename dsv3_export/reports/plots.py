"""PNG plots of diff and profile reports (matplotlib, Agg backend: no display needed).

Each function takes the report dict (what report.json holds) and a directory, and returns the
paths it wrote, so a report can be re-plotted from its JSON alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PASS_COLOR, FAIL_COLOR, REF_COLOR, TEST_COLOR = "#4c9a2a", "#c0392b", "#34495e", "#e67e22"
EXACT_SQNR_DB = 200.0  # where an exact match (infinite SQNR) is drawn


def _num(x: Any) -> float:
    """Report numbers may be the strings 'inf' / 'nan' (files.finite_json)."""
    return float(x) if x is not None else math.nan


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def diff_plots(report: dict[str, Any], out: Path) -> list[Path]:
    paths = [stage_plot(report, out / "diff_stages.png"), logits_plot(report, out / "diff_logits.png")]
    paths.append(histogram_plot(report, out / "diff_histograms.png"))
    return paths


def stage_plot(report: dict[str, Any], path: Path) -> Path:
    """SQNR and abs errors per output, in model order; failing outputs red, the first one marked."""
    outputs = report["outputs"]
    names = [o["name"] for o in outputs]
    x = np.arange(len(names))
    sqnr = np.array([_num(o["sqnr_db"]) for o in outputs])
    shown = np.where(np.isposinf(sqnr), EXACT_SQNR_DB, np.nan_to_num(sqnr, nan=0.0, neginf=0.0))
    colors = [PASS_COLOR if o["passed"] else FAIL_COLOR for o in outputs]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(names) + 2), 6), sharex=True)
    top.bar(x, shown, color=colors)
    top.set_ylabel("SQNR (dB)")
    verdict = report["verdict"]
    first = verdict["first_failing"]
    title = "all outputs within tolerance" if verdict["passed"] else f"first output over tolerance: {first}"
    e = report["engine"]
    top.set_title(f"{e['backend']} {e['device']}/{e['precision']} engine vs reference\n{title}", fontsize=10)
    if first in names:
        i = names.index(first)
        top.annotate("first failing", (i, shown[i]), xytext=(0, 12), textcoords="offset points", ha="center",
                     color=FAIL_COLOR, arrowprops={"arrowstyle": "->", "color": FAIL_COLOR})
    max_abs = np.array([_num(o["max_abs"]) for o in outputs])
    mean_abs = np.array([_num(o["mean_abs"]) for o in outputs])
    floor = 1e-12
    bottom.semilogy(x, np.clip(np.nan_to_num(max_abs, nan=1e30, posinf=1e30), floor, None), "o-", label="max |err|")
    bottom.semilogy(x, np.clip(np.nan_to_num(mean_abs, nan=1e30, posinf=1e30), floor, None), "s--", label="mean |err|")
    atol = [o["tolerance"]["atol"] for o in outputs]
    bottom.step(x, atol, where="mid", color="grey", linewidth=1, label="atol")
    for i in np.flatnonzero(max_abs == 0):
        bottom.annotate("exact", (i, floor), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
    bottom.set_ylabel("abs error")
    bottom.legend(loc="upper left", fontsize=8)
    bottom.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    return _save(fig, path)


def logits_plot(report: dict[str, Any], path: Path) -> Path:
    """Distribution over positions of KL(p_ref || p_engine) and of dp."""
    lg = report["logits"]
    kl = np.array([_num(v) for v in lg["samples"]["kl"]])
    dp = np.array([_num(v) for v in lg["samples"]["delta_p"]])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    finite = kl[np.isfinite(kl)]
    logkl = np.log10(np.clip(finite, 1e-16, None))
    left.hist(logkl, bins=30, color=TEST_COLOR)
    left.set_xlabel("log10 KL(p_ref || p_engine) per position (nats)")
    left.set_ylabel("positions")
    km = lg["kl_mean"]
    left.set_title(f"mean KL {_num(km['value']):.3g} [{_num(km['ci95'][0]):.3g}, {_num(km['ci95'][1]):.3g}]",
                   fontsize=10)
    right.hist(dp[np.isfinite(dp)], bins=30, color=REF_COLOR)
    right.set_xlabel("dp = p_engine(t) - p_ref(t), t = reference top-1")
    t1 = lg["top1_agreement"]
    right.set_title(f"top-1 agreement {_num(t1['value']):.4f}, RMS dp {_num(lg['delta_p_rms']['value']):.3g}",
                    fontsize=10)
    return _save(fig, path)


def histogram_plot(report: dict[str, Any], path: Path) -> Path:
    """Shared-range value histograms of the first failing output (else the last stage) and the logits."""
    outputs = {o["name"]: o for o in report["outputs"]}
    first = report["verdict"]["first_failing"]
    stages = [n for n in outputs if n != "logits"]
    chosen = [n for n in dict.fromkeys([first if first in outputs else (stages[-1] if stages else None), "logits"])
              if n is not None]
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 3.6), squeeze=False)
    for ax, name in zip(axes[0], chosen):
        h = outputs[name]["histogram"]
        edges = np.array([_num(v) for v in h["edges"]])
        if edges.size:
            ax.stairs(np.array(h["ref"]) + 0.5, edges, label="reference", color=REF_COLOR, linewidth=1.5)
            ax.stairs(np.array(h["test"]) + 0.5, edges, label="engine", color=TEST_COLOR, linewidth=1.2,
                      linestyle="--")
            ax.set_yscale("log")
        ax.set_title(f"{name}: values, shared range", fontsize=10)
        ax.set_xlabel("value")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("count (+0.5, log)")
    return _save(fig, path)


def profile_plot(report: dict[str, Any], path: Path) -> Path:
    """Per engine and batch: TTFT against prompt length, and the TPOT distribution per configuration."""
    engines = report["engines"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels, boxes = [], []
    for k, e in enumerate(engines):
        name = e["label"]
        by_batch: dict[int, list[tuple[int, float]]] = {}
        for r in e["results"]:
            if r.get("skipped"):
                continue
            by_batch.setdefault(r["batch"], []).append((r["prompt_len"], r["ttft_ms"]["median"]))
            boxes.append(r["tpot_ms"]["samples"])
            config = f"b{r['batch']} p{r['prompt_len']}"
            labels.append(f"{name}\n{config}" if len(engines) > 1 else config)
        for b, pts in sorted(by_batch.items()):
            pts.sort()
            left.plot([p for p, _ in pts], [t for _, t in pts], "o-", label=f"{name} batch {b}")
    left.set_xlabel("prompt length (tokens)")
    left.set_ylabel("TTFT median (ms)")
    left.set_title("time to first token")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    if boxes:
        right.boxplot(boxes, showfliers=True)
        right.set_yscale("log")  # outliers (scheduling, allocator growth) stay visible next to the median
        right.set_xticks(np.arange(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize=7)
    right.set_ylabel("TPOT (ms per decode step)")
    right.set_title("decode latency per step (each box: all steps)")
    return _save(fig, path)
