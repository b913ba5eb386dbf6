"""ONNX model utilities for the ONNX Runtime backend: tidy, save, describe, and check before loading.

    name_dims(model, {("tokens", 0): "batch", ...})   # exporter's s21/s27 -> readable symbols
    fold_constants(model)                             # onnxscript optimizer, fp8 weights kept fp8
    save_with_external_data(model, dir)               # model.onnx + ONE model.onnx.data, > 2 GB ok
    check_external_data(model_path, engine_dir, allowed)   # before any session is created
    read_proto(model_path)                            # without external data; parsed once per file version

Why check external data ourselves: ONNX Runtime resolves each initializer's `location` relative
to the model file and opens it. A tampered model.onnx could point at '../../secret', an absolute
path or a symlink; the manifest's hashes cover model.onnx, but a malicious engine directory can
come with a matching manifest, so every location must also name a file of the directory itself.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
INLINE_BYTES = 128


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def name_dims(model: ir.Model, names: dict[tuple[str, int], str]) -> None:
    """Rename the symbolic dims found at (input name, axis) to the given names, everywhere."""
    inputs = {v.name: v for v in model.graph.inputs}
    rename: dict[str, str] = {}
    for (input_name, axis), new in names.items():
        shape = inputs[input_name].shape
        if shape is not None and isinstance(shape[axis], ir.SymbolicDim) and shape[axis].value is not None:
            rename[shape[axis].value] = new
    for value in _all_values(model.graph):
        if value.shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value in rename for d in value.shape):
            continue
        value.shape = ir.Shape([ir.SymbolicDim(rename[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in rename
                                else d for d in value.shape])


# Ops that only move weight values around: folded at build time whatever the size (a weight
# re-laid out by the lowering, e.g. MoE's interleaved w13, must not be re-laid out on every step).
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Concat", "Expand"})
# Those whose output on an fp8 weight is still the same fp8 values, no more of them (not Expand).
_FP8_LAYOUT_OPS = _LAYOUT_OPS - {"Expand"}


def _should_fold(node: ir.Node) -> bool | None:
    """Fold layout ops on constants (fp8 ones too: the result stays FLOAT8E4M3FN in the file);
    never fold anything else that reads fp8 (fp8 weights stay fp8 in the file); the optimizer's
    size rules for everything else."""
    standard = node.domain in ("", "ai.onnx")
    if any(v is not None and v.dtype == ir.DataType.FLOAT8E4M3FN for v in node.inputs):
        return standard and node.op_type in _FP8_LAYOUT_OPS
    if standard and node.op_type in _LAYOUT_OPS:
        return True
    return None


def fold_constants(model: ir.Model) -> None:
    """The onnxscript optimizer (constant folding, dead code, redundant casts), see _should_fold."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model, should_fold=_should_fold)


def save_with_external_data(model: ir.Model, out_dir: Path) -> list[str]:
    """Save model.onnx with every weight in the one file model.onnx.data; returns the file names.

    Tensors of at most INLINE_BYTES (shape and axes constants: ONNX shape inference must read
    them from the proto) stay inline; everything larger, i.e. every weight, goes to the data file.
    """
    path = out_dir / MODEL_FILE
    ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=INLINE_BYTES)
    onnx.checker.check_model(str(path), full_check=False)  # by path: works past the 2 GB proto limit
    return [MODEL_FILE, DATA_FILE] if (out_dir / DATA_FILE).exists() else [MODEL_FILE]


def op_histogram(model: ir.Model) -> dict[str, int]:
    """'domain::OpType' (domain omitted for standard ONNX) -> count, most frequent first."""
    counts = Counter((f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
                     for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return dict(counts.most_common())


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers, constant/attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def read_proto(model_path: Path) -> onnx.ModelProto:
    """model.onnx parsed without its external data, once per version of the file: loading an engine reads it for
    verify_engine_dir's payload-size check, then for check_external_data (and on CUDA for the fold limit). Keyed by
    the resolved path and the file's inode, size and times, so an altered file is parsed again. Do not modify it."""
    path = Path(model_path).resolve()
    st = path.stat()
    return _read_proto(str(path), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@lru_cache(maxsize=1)
def _read_proto(path: str, version: tuple[int, ...]) -> onnx.ModelProto:
    return onnx.load(path, load_external_data=False)


def external_locations(model_path: Path) -> dict[str, str]:
    """tensor name -> external-data location, read without loading any data."""
    proto = read_proto(model_path)
    out = {}
    for tensor in _tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            out[tensor.name] = info.get("location", "")
    return out


def check_external_data(model_path: Path, engine_dir: Path, allowed: set[str]) -> None:
    """Refuse (EngineDirError, a ValueError, naming model and tensor) any location outside the directory's own files."""
    from dsv3_export.manifest import EngineDirError

    engine_dir = engine_dir.resolve()
    try:
        locations = external_locations(model_path)
    except DecodeError as e:  # intact by its hash, so written wrong: say which file
        raise EngineDirError(f"{model_path}: not a readable ONNX model ({e})") from e
    for tensor, location in locations.items():
        where = f"{model_path}: tensor {tensor!r} has external-data location {location!r}"
        if not location or Path(location).is_absolute() or location.startswith(("/", "\\")) or ".." in Path(location).parts:
            raise EngineDirError(f"{where}: must be a plain file name inside the engine directory")
        target = engine_dir / location
        if target.is_symlink():
            raise EngineDirError(f"{where}: is a symlink")
        if target.resolve().parent != engine_dir or location not in allowed:
            raise EngineDirError(f"{where}: not a payload file listed in manifest.json")
