"""Builds shared by every pytest-xdist worker of one test run: made once, by whichever worker asks first.

A session fixture (or a module-level cache) runs once per worker process, so the suite's two workers
each built the tiny AOTInductor engine (~130 s on 2 cores) and the report tests' engines (~60 s).
pytest-xdist's loadgroup cannot keep a group on one worker with pytest 9 (it renames item._nodeid,
which pytest 9 no longer reads), so the workers share the build instead, through the directory that
holds their base temp dirs (unique to the run) and a file lock there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

DONE = ".built"  # written last: a directory without it is a build that died half-way


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The directory of this run's `name` build, made by build(directory) the first time any worker asks.
    The build writes in place (engines record their checkpoint's path, so no rename afterwards); a
    directory left without DONE by a failed build is removed and built again."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's dir under xdist
    out = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a worker dies
        if not (out / DONE).exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            (out / DONE).touch()
    return out


_factory: pytest.TempPathFactory | None = None


def remember_factory(factory: pytest.TempPathFactory) -> None:
    """Called once per process by tests/conftest.py's session fixture, for built_once_in_run."""
    global _factory
    _factory = factory


def built_once_in_run(name: str, build: Callable[[Path], None]) -> Path:
    """built_once for helpers that tests call directly (no fixture to hand them tmp_path_factory)."""
    if _factory is None:
        raise RuntimeError("tests/_shared_build.py: no tmp_path_factory yet (tests/conftest.py's session fixture "
                           "remembers it)")
    return built_once(_factory, name, build)
