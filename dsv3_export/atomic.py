"""Directories that appear whole or not at all (engines, reports, checkpoints)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def unwritable_parent(out: str | Path) -> Path | None:
    """The first existing parent of `out` (atomic_directory makes the missing ones below it) when it is not a
    writable directory, else None: what the final rename would fail on, known before any work."""
    parent = next(p for p in Path(out).absolute().parents if p.exists())
    return None if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK) else parent


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to fill; on success it takes `out`'s place.

    The sibling sits in out's parent, so the final rename stays on one filesystem. An existing
    `out` is moved aside first and deleted after the rename (callers decide beforehand whether
    it may be replaced). On any failure the temporary directory is removed and `out` is left
    as it was: nothing half-written is ever visible under the final name.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary directory
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
