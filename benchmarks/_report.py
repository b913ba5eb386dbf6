"""Shared by the 16b benchmark scripts: a time-budgeted, crash-tolerant results file.

One device call runs several sections; a section that fails or would not fit in the time left is
recorded as such and the run goes on, and the JSON file is rewritten after every section so that
whatever happened before a crash or a time-out still comes back.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


class Report:
    """Results by key (precision) and section, rewritten to JSON after every change."""

    def __init__(self, path: Path, budget_s: float, meta: dict[str, Any]):
        self.path, self.budget_s = path, budget_s
        self.data: dict[str, Any] = {"meta": meta, "results": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - T0)

    def put(self, key: str, section: str, value: Any) -> None:
        self.data["results"].setdefault(key, {})[section] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def section(self, key: str, name: str, need_s: float, fn: Callable[[], dict[str, Any]]) -> dict | None:
        """Run fn unless fewer than need_s seconds are left; record its result, or why it has none."""
        if self.left() < need_s:
            self.put(key, name, {"skipped": f"needs ~{need_s:.0f} s, {self.left():.0f} s left in the budget"})
            log(f"{key}/{name}: skipped (time)")
            return None
        log(f"{key}/{name}: start")
        start = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - a failed section is a result, the others still run
            out = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            log(f"{key}/{name} failed: {type(e).__name__}: {e}")
        out["seconds"] = round(time.perf_counter() - start, 2)
        self.put(key, name, out)
        log(f"{key}/{name}: done in {out['seconds']} s{' (error)' if 'error' in out else ''}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out
