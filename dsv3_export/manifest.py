"""The engine directory: manifest.json + a backend's payload files, and nothing else.

    write_engine_dir(out, fill)     # fill(tmp_dir) -> Manifest; written in a temp dir, renamed in place
    manifest = verify_engine_dir(d) # every check below; payload headers read only after the hashes

Why so strict: an engine directory is loaded by code that trusts it (a session is created from
it, external data is mmapped). So loading refuses, naming the file and the reason, a directory
whose manifest is newer than this code, a listed file that is missing, resized or altered
(sha256), an unlisted extra file, a symlink or a nested directory. manifest.json itself is not
hashed, so each key's type and value is checked too, the output and cache specs against the model,
and the model's vocabulary and positions against the payload's tables (manifest_checks.py). Backends check their own payload further (engines/onnxruntime.py:
external-data locations stay inside the directory).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from dsv3_export.atomic import atomic_directory

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Distributions whose versions the manifest records (first installed name wins), null when absent.
VERSIONED = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "triton": ("triton",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    "dsv3_export": ("dsv3-export",),
}
_HASH_CHUNK = 16 * 2**20


class EngineDirError(ValueError):
    """An engine directory that must not be loaded; the message names the file and why."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass
class Manifest:
    """Everything needed to load and trust an engine directory (see DESIGN.md, Engine directory)."""

    model: dict[str, Any]  # ModelArgs.to_dict()
    backend: str
    precision: str
    device: str
    inputs: list[dict[str, Any]]  # TensorSpec.to_dict() per input
    outputs: list[dict[str, Any]]
    kv_cache: dict[str, Any]  # layout, dtype, width, parts (see kv_cache_layout)
    files: dict[str, FileEntry] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "matches"}], in order
    lowerings: dict[str, str] = field(default_factory=dict)
    op_histogram: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # {"preset", "seed"} or {"checkpoint"}
    versions: dict[str, str | None] = field(default_factory=dict)
    compute_capability: str | None = None
    backend_info: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["files"] = {name: dataclasses.asdict(e) for name, e in sorted(self.files.items())}
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = MANIFEST_NAME) -> "Manifest":
        """Every key's type and value checked: the manifest is not hashed, and the runtime trusts it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EngineDirError(f"{source}: unknown manifest key(s) {unknown}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise EngineDirError(f"{source}: manifest lacks key(s) {missing}")
        from dsv3_export.manifest_checks import validate_manifest_dict

        validate_manifest_dict(d, source)
        values = dict(d)
        values["files"] = {name: FileEntry(**e) for name, e in d.get("files", {}).items()}
        return cls(**values)

    @property
    def payload_files(self) -> list[str]:
        return sorted(self.files)


def kv_cache_layout(args: Any, dtype: str) -> dict[str, Any]:
    """The cache the runtime allocates and the engine reads (LatentCacheStep in step.py)."""
    return {
        "shape": ["batch", args.n_layers, "cache_len", args.latent_cache_width],
        "dtype": dtype,
        "parts": [{"name": "latent (kv_norm output)", "width": args.kv_lora_rank},
                  {"name": "k_pe (roped key)", "width": args.qk_rope_head_dim}],
        "write": "runtime writes new_kv [b, L, s, w] at positions [start_pos, start_pos + s) per row",
    }


def installed_versions() -> dict[str, str | None]:
    """Versions of the modules in use: an imported module's own __version__ first (two
    distributions can provide one module, e.g. onnxruntime and onnxruntime-gpu on PYTHONPATH),
    else the first installed distribution's metadata."""
    out: dict[str, str | None] = {}
    for key, dists in VERSIONED.items():
        module = sys.modules.get(key)
        out[key] = getattr(module, "__version__", None) if module is not None else None
        if out[key] is not None:
            continue
        for dist in dists:
            try:
                out[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_name(name: str) -> None:
    """A payload name is one plain path component: no separators, no '..', not the manifest."""
    if not name or name in (".", "..", MANIFEST_NAME) or "/" in name or "\\" in name or name.startswith("."):
        raise EngineDirError(f"manifest lists an invalid payload file name {name!r}")


def _describe_files(directory: Path, names: list[str]) -> dict[str, FileEntry]:
    for name in names:
        _check_name(name)
    paths = [directory / n for n in names]
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:  # hashlib releases the GIL
        digests = list(pool.map(sha256_file, paths))
    return {n: FileEntry(size=p.stat().st_size, sha256=d) for n, p, d in zip(names, paths, digests)}


def refuse_overwrite(out_dir: Path) -> None:
    """An existing out_dir may be replaced only when it is an engine directory (has manifest.json) or empty; and none
    is written inside another engine directory (which would then fail verification: an entry its manifest does not
    list)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file())):
        raise EngineDirError(f"{out_dir}: exists and is not an engine directory; refusing to overwrite it")
    engine = enclosing_engine_dir(out_dir)
    if engine is not None:
        raise EngineDirError(f"{out_dir}: inside the engine directory {engine}, which then would not load (an engine "
                             "directory holds only its manifest's files); write the engine elsewhere")


def enclosing_engine_dir(out: Path) -> Path | None:
    """The engine directory `out` would be created in (its first existing parent), or None."""
    parent = next(p for p in Path(out).absolute().parents if p.exists())
    return parent if is_engine_dir(parent) else None


def is_engine_dir(path: Path) -> bool:
    """Whether path holds an engine's manifest.json (one that reads as ours: another program's is not)."""
    if not (Path(path) / MANIFEST_NAME).is_file():
        return False
    try:
        read_manifest(path)
    except EngineDirError:
        return False
    return True


def write_engine_dir(out_dir: str | Path, fill: Callable[[Path], Manifest]) -> Manifest:
    """Build an engine directory atomically.

    fill(tmp) writes the payload into the empty temporary directory tmp (a sibling of out_dir, so
    the final rename stays on one filesystem) and returns the manifest without `files`; this
    function hashes every file, writes manifest.json and renames tmp to out_dir. An existing
    out_dir is replaced only when it is an engine directory (has manifest.json) or empty.
    """
    out_dir = Path(out_dir).absolute()
    refuse_overwrite(out_dir)
    with atomic_directory(out_dir) as tmp:
        manifest = fill(tmp)
        entries = sorted(p.name for p in tmp.iterdir())
        manifest.files = _describe_files(tmp, entries)
        manifest.versions = manifest.versions or installed_versions()
        manifest.created = manifest.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Parse manifest.json (format version checked) without touching the payload."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        raise EngineDirError(f"{engine_dir}: not a directory")
    if path.is_symlink() or not path.is_file():
        raise EngineDirError(f"{path}: missing (not an engine directory)" if not path.exists()
                             else f"{path}: not a regular file")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineDirError(f"{path}: cannot parse: {e}") from e
    if not isinstance(d, dict):
        raise EngineDirError(f"{path}: expected a JSON object")
    from dsv3_export.manifest_checks import check_format_version

    check_format_version(d.get("format_version"), str(path))  # first: a newer format may have other keys
    return Manifest.from_dict(d, source=str(path))


def verify_engine_dir(engine_dir: str | Path, check_hashes: bool = True) -> Manifest:
    """read_manifest + the directory holds exactly the listed files, each intact, and sized as the model says."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    for name in manifest.files:
        _check_name(name)
    present = {p.name: p for p in engine_dir.iterdir()}
    for name, p in sorted(present.items()):
        if p.is_symlink():
            raise EngineDirError(f"{p}: is a symlink; an engine directory holds only regular files")
        if name != MANIFEST_NAME and name not in manifest.files:
            raise EngineDirError(f"{p}: unexpected {'directory' if p.is_dir() else 'file'} "
                                 "(not listed in manifest.json)")
    for name, entry in sorted(manifest.files.items()):
        p = engine_dir / name
        if name not in present:
            raise EngineDirError(f"{p}: missing (listed in manifest.json)")
        if not p.is_file():
            raise EngineDirError(f"{p}: not a regular file")
        size = p.stat().st_size
        if size != entry.size:
            raise EngineDirError(f"{p}: size {size} differs from the manifest's {entry.size} (file altered)")
    if check_hashes:
        names = sorted(manifest.files)
        actual = _describe_files(engine_dir, names)
        for name in names:
            if actual[name].sha256 != manifest.files[name].sha256:
                raise EngineDirError(f"{engine_dir / name}: sha256 {actual[name].sha256[:16]}... does not match the "
                                     f"manifest's {manifest.files[name].sha256[:16]}... (file altered or corrupt)")
    from dsv3_export.manifest_checks import check_payload_sizes

    check_payload_sizes(engine_dir, manifest)
    return manifest
