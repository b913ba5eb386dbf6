"""Find and open a checkpoint's safetensors files; never unpickle anything.

Tensors come from `safe_open`, which memory-maps each file: reading a tensor whose dtype already
matches costs no copy (safetensors >= 0.6 hands out views of the map), so a checkpoint is never
held twice in RAM. Every safetensors failure (truncated file, corrupt header) is re-raised as a
CheckpointError naming the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dsv3_export.checkpoint.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MP_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")  # DeepSeek convert.py output
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a str when torch has no such dtype


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a checkpoint directory needs config.json)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _is_file_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and, for a sharded HF checkpoint, its name -> file map."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no weight_map")
        # A shard is a file name in this directory: "../x" or "/x" would read another checkpoint's file; a
        # non-string (a list, null) is no file name at all (repr: such values need neither hash nor order).
        outside = sorted({repr(f) for f in weight_map.values() if not _is_file_name(f)})
        if outside:
            raise CheckpointError(f"{index_path}: weight_map names shard(s) [{', '.join(outside[:3])}]; "
                                  f"a shard must be a file name in {directory}")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index_path}: lists shard {f.name}, which does not exist")
        return files, weight_map
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{directory}: found {pickles} but no *.safetensors; "
                                  "pickle checkpoints are not loaded; convert to safetensors")
        raise CheckpointError(f"{directory}: no *.safetensors weight files")
    for f in files:
        m = _MP_FILE.match(f.name)
        if m and int(m.group(2)) != 1:
            raise CheckpointError(f"{f}: model-parallel shard (mp{m.group(2)}); only mp1 checkpoints load. "
                                  "Re-run DeepSeek's convert.py with --model-parallel 1")
    return files, None


class WeightFiles:
    """Every stored tensor of a checkpoint directory by name; data read on demand."""

    def __init__(self, directory: Path):
        self.directory = directory
        files, weight_map = _weight_files(directory)
        self._handles: dict[Path, Any] = {}
        self.tensors: dict[str, StoredTensor] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                names = list(handle.keys())
                infos = {n: handle.get_slice(n) for n in names}
                infos = {n: (tuple(s.get_shape()), s.get_dtype()) for n, s in infos.items()}
            except Exception as e:  # SafetensorError has no importable base class in old versions
                raise CheckpointError(f"{f}: not a readable safetensors file ({e}); truncated or corrupt?") from None
            self._handles[f] = handle
            for name, (shape, dtype) in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"{f}: tensor {name} is also stored in {self.tensors[name].file}")
                if weight_map is not None and weight_map.get(name) != f.name:
                    where = f"maps to {weight_map[name]}" if name in weight_map else "does not list"
                    raise CheckpointError(f"{f}: holds {name}, which {INDEX_FILE} {where}")
                self.tensors[name] = StoredTensor(f, name, shape, _DTYPES.get(dtype, dtype))
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.tensors))
            if absent:
                more = f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""
                raise CheckpointError(f"{directory / INDEX_FILE}: lists {absent[:5]}{more} that are not in "
                                      "the shard it names")

    def read(self, name: str, index: tuple | None = None) -> torch.Tensor:
        """The stored tensor (or a slice of it); a view of the file map when possible."""
        info = self.tensors[name]
        handle = self._handles[info.file]
        try:
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name}: {e}") from None
