"""atomic_directory: the final name shows a complete directory or the previous one, never a part."""

from __future__ import annotations

import os

import pytest

from dsv3_export.atomic import atomic_directory


def test_success_replaces_and_failure_keeps_the_old_directory(tmp_path):
    out = tmp_path / "engine"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()  # nothing visible under the final name while writing
    assert (out / "a").read_text() == "1"
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("build failed half-way")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no temporary left behind
    with atomic_directory(out) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
