"""Report directories written atomically, and JSON that stays standard with non-finite numbers."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

from dsv3_export.atomic import atomic_directory, unwritable_parent
from dsv3_export.manifest import enclosing_engine_dir

REPORT_FILES = ("report.json", "report.md")


class ReportDirError(Exception):
    """A report --out that must not be replaced or cannot be written there; the message names it and why."""


def check_replaceable(out: Path) -> None:
    """Refuse (ReportDirError) an `out` that atomic_dir would not replace, could not write (its first existing parent
    a file or not writable), or would write into an engine directory (which then fails verification: a directory
    not listed in its manifest); called before long work."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise ReportDirError(f"{out.absolute()}: exists and is not a report directory; refusing to overwrite it")
    parent = unwritable_parent(out)
    if parent is not None:
        raise ReportDirError(f"{out}: cannot write there ({parent} is not a writable directory)")
    engine = enclosing_engine_dir(out)
    if engine is not None:
        raise ReportDirError(f"{out}: inside the engine directory {engine}, which then would not load (an engine "
                             "directory holds only its manifest's files); write the report elsewhere")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; on success it replaces `out`, on failure it is removed.

    An existing `out` is replaced only when it is empty or looks like a report directory (has
    report.json), so a mistyped --out never deletes unrelated files."""
    check_replaceable(out)
    with atomic_directory(out) as tmp:
        yield tmp


def finite_json(value: Any) -> Any:
    """Replace float NaN/Inf (not JSON) by the strings "nan", "inf", "-inf", recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dump_json(value: Any, path: Path) -> None:
    path.write_text(json.dumps(finite_json(value), indent=1, allow_nan=False) + "\n")
