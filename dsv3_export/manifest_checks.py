"""What reading an engine directory checks beyond the hashes (dsv3_export/manifest.py calls these).

manifest.json is not hashed, so a hand edit that keeps every payload hash valid reaches code that trusts it: each key's
JSON type and value (validate_manifest_dict), the output and cache specs against the model, and the model's vocabulary
and positions against the tables the payload actually stores (check_payload_sizes). Every failure is an EngineDirError
naming manifest.json and the key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from dsv3_export.manifest import FORMAT_VERSION, MANIFEST_NAME, EngineDirError, Manifest

# top-level key -> the JSON types it may hold (bool is never an int here: see _is_type)
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "model": (dict,), "backend": (str,), "precision": (str,), "device": (str,),
    "inputs": (list,), "outputs": (list,), "kv_cache": (dict,), "files": (dict,), "passes": (list,),
    "lowerings": (dict,), "op_histogram": (dict,), "source": (dict,), "versions": (dict,),
    "compute_capability": (str, type(None)), "backend_info": (dict,), "created": (str,),
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list",
               bool: "true or false", type(None): "null"}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _bad(source: str, key: str, why: str) -> EngineDirError:
    return EngineDirError(f"{source}: '{key}' {why}")


def _is_type(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, but True / False are not integers or numbers (JSON keeps them apart)."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def _expect(source: str, key: str, value: Any, types: tuple[type, ...]) -> None:
    if not _is_type(value, types):
        raise _bad(source, key, f"must be {' or '.join(_TYPE_NAMES[t] for t in types)}, got {value!r}")


def check_format_version(version: Any, source: str) -> None:
    """An integer in [1, FORMAT_VERSION]: newer means this code cannot read it, < 1 was never written."""
    _expect(source, "format_version", version, (int,))
    if version > FORMAT_VERSION:
        raise EngineDirError(f"{source}: format version {version} is newer than this dsv3-export reads "
                             f"(<= {FORMAT_VERSION}); upgrade dsv3-export or rebuild the engine")
    if version < 1:
        raise _bad(source, "format_version", f"must be in [1, {FORMAT_VERSION}], got {version}")


def _check_choices(d: dict[str, Any], source: str) -> None:
    """backend / device / precision among the values build writes (engines/base.py), so no backend meets others."""
    from dsv3_export.engines.base import BACKENDS, DEVICES, PRECISIONS, UNAVAILABLE

    for key, accepted in (("backend", (*BACKENDS, *UNAVAILABLE)), ("device", DEVICES), ("precision", PRECISIONS)):
        if d[key] not in accepted:
            raise _bad(source, key, f"is {d[key]!r}, not one of {list(accepted)}")


def _check_files(files: dict[str, Any], source: str) -> None:
    """name -> {size: int >= 0, sha256: 64 lowercase hex digits}, exactly those keys."""
    for name, entry in files.items():
        key = f"files.{name}"
        _expect(source, key, entry, (dict,))
        if set(entry) != {"size", "sha256"}:
            raise _bad(source, key, f"must have exactly the keys ['sha256', 'size'], got {sorted(entry)}")
        _expect(source, f"{key}.size", entry["size"], (int,))
        if entry["size"] < 0:
            raise _bad(source, f"{key}.size", f"must be >= 0, got {entry['size']}")
        if not (isinstance(entry["sha256"], str) and _SHA256_HEX.fullmatch(entry["sha256"])):
            raise _bad(source, f"{key}.sha256", f"must be 64 lowercase hex digits, got {entry['sha256']!r}")


def _field_types(default: Any) -> tuple[type, ...]:
    """A ModelArgs field's JSON types, from its default (gate_bias's None: true, false or null)."""
    return (bool, type(None)) if default is None else (type(default),)


def model_args(model: dict[str, Any], source: str = MANIFEST_NAME) -> Any:
    """The manifest's model as ModelArgs: every field present (a missing one would silently take the 16b default)
    and of its type, then ModelArgs' own checks; any failure an EngineDirError."""
    from dsv3_export.reference.args import ConfigError, ModelArgs

    fields = dataclasses.fields(ModelArgs)
    missing = [f.name for f in fields if f.name not in model]
    if missing:
        raise _bad(source, "model", f"lacks key(s) {missing}")
    for f in fields:
        _expect(source, f"model.{f.name}", model[f.name], _field_types(f.default))
    try:
        return ModelArgs.from_dict(model, source=f"{source}: 'model'")
    except ConfigError as e:
        raise _bad(source, "model", f"is not a valid model: {e}") from e


def _check_specs(key: str, specs: list[Any], source: str) -> None:
    """Each entry a TensorSpec.to_dict(): name, dtype strings; shape a list of sizes >= 0 or symbolic names."""
    for i, spec in enumerate(specs):
        _expect(source, f"{key}[{i}]", spec, (dict,))
        missing = [k for k in ("name", "dtype", "shape") if k not in spec]
        if missing:
            raise _bad(source, f"{key}[{i}]", f"lacks key(s) {missing}")
        _expect(source, f"{key}[{i}].name", spec["name"], (str,))
        _expect(source, f"{key}[{i}].dtype", spec["dtype"], (str,))
        _expect(source, f"{key}[{i}].shape", spec["shape"], (list,))
        if not all(_is_type(n, (str,)) or (_is_type(n, (int,)) and n >= 0) for n in spec["shape"]):
            raise _bad(source, f"{key}[{i}].shape", f"must hold sizes >= 0 or names, got {spec['shape']!r}")


def _check_logits(outputs: list[dict[str, Any]], args: Any, source: str) -> None:
    """The logits output's last dimension is the vocabulary: the runtime bounds token ids by model.vocab_size."""
    logits = [s for s in outputs if s["name"] == "logits"]
    if not logits or not logits[0]["shape"]:
        raise _bad(source, "outputs", "has no 'logits' output with a shape")
    width = logits[0]["shape"][-1]
    if width != args.vocab_size:
        raise _bad(source, "model.vocab_size", f"is {args.vocab_size} but the 'logits' output's last dimension "
                   f"is {width!r}")


def _check_kv_cache(kv: dict[str, Any], args: Any, inputs: list[dict[str, Any]], source: str) -> None:
    """kv_cache_layout's shape [batch, n_layers, cache_len, latent width] and dtype, against the model, and its
    dtype against the 'kv_cache' input's (the runtime allocates the cache in the layout's dtype and feeds it there:
    another dtype failed inside the backend, e.g. a raw bmm error from an AOTInductor package)."""
    shape = kv.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4):
        raise _bad(source, "kv_cache.shape", f"must be a list of 4 dimensions, got {shape!r}")
    if not _is_type(shape[1], (int,)) or shape[1] != args.n_layers:
        raise _bad(source, "kv_cache.shape", f"layers {shape[1]!r} differ from model.n_layers={args.n_layers}")
    if not _is_type(shape[3], (int,)) or shape[3] != args.latent_cache_width:
        raise _bad(source, "kv_cache.shape", f"width {shape[3]!r} differs from the model's latent cache width "
                   f"{args.latent_cache_width} (kv_lora_rank + qk_rope_head_dim)")
    _expect(source, "kv_cache.dtype", kv.get("dtype"), (str,))
    from dsv3_export.engines.base import torch_dtype

    try:
        torch_dtype(kv["dtype"])  # what the backends allocate the cache in
    except ValueError as e:
        raise _bad(source, "kv_cache.dtype", f"is not a torch dtype name: {e}") from e
    fed = [spec["dtype"] for spec in inputs if spec["name"] == "kv_cache"]
    if fed and fed[0] != kv["dtype"]:
        raise _bad(source, "kv_cache.dtype", f"is {kv['dtype']!r} but the 'kv_cache' input is {fed[0]!r}")


def validate_manifest_dict(d: dict[str, Any], source: str = MANIFEST_NAME) -> None:
    """Every present key's type, the accepted values, and the specs against the model; EngineDirError naming the key."""
    for key, value in d.items():
        _expect(source, key, value, _KEY_TYPES[key])
    check_format_version(d.get("format_version", FORMAT_VERSION), source)
    _check_choices(d, source)
    _check_files(d.get("files", {}), source)
    args = model_args(d["model"], source)
    _check_specs("inputs", d["inputs"], source)
    _check_specs("outputs", d["outputs"], source)
    _check_logits(d["outputs"], args, source)
    _check_kv_cache(d["kv_cache"], args, d["inputs"], source)


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:  # intact by its hash, so written wrong: say which file
        raise EngineDirError(f"{path}: not a readable safetensors file ({e})") from e


def _torch_table_rows(engine_dir: Path, manifest: Manifest) -> tuple[int | None, list[int]]:
    """(embedding rows, rope table rows) of a torch engine's weights file (engines/torch.py), None / [] when absent."""
    name = manifest.backend_info.get("weights")
    if not isinstance(name, str) or name not in manifest.files:
        return None, []
    shapes = _safetensors_shapes(engine_dir / name)
    rows = [s[0] for k, s in shapes.items() if k in ("rope_cos", "rope_sin") and isinstance(s, list) and s]
    embed = shapes.get("embed.weight")
    return (embed[0] if isinstance(embed, list) and embed else None), rows


def _onnx_table_rows(engine_dir: Path, manifest: Manifest, rope_half: int) -> tuple[int | None, list[int]]:
    """(embedding rows, rope table rows) of an ONNX engine's graph, read without its external data: the rope tables
    are a pair (cos, sin) of unnamed 2-D constants [positions, qk_rope_head_dim / 2] (no dotted weight name)."""
    if "model.onnx" not in manifest.files:
        return None, []
    from dsv3_export.engines.onnx_graph import read_proto

    try:
        graph = read_proto(engine_dir / "model.onnx").graph  # parsed once: the loader's external-data check reuses it
    except Exception:  # a protobuf DecodeError or similar: loading the backend says so, naming the file
        return None, []
    dims = {t.name: list(t.dims) for t in graph.initializer}
    tables = [d[0] for n, d in dims.items() if "." not in n and len(d) == 2 and d[1] == rope_half]
    rows = [r for r in set(tables) if tables.count(r) >= 2]
    embed = dims.get("embed.weight")
    return (embed[0] if embed else None), rows


def check_payload_sizes(engine_dir: str | Path, manifest: Manifest) -> None:
    """model.vocab_size and max_seq_len against the payload's embedding and rope tables: both bound what the runtime
    feeds the engine (token ids, cache positions), and a larger value than built indexes past the tables (a C++ abort
    on the torch CPU engine). A table not found (another payload layout) is not checked."""
    engine_dir = Path(engine_dir)
    args = model_args(manifest.model)
    if manifest.backend == "torch":
        embed, rope = _torch_table_rows(engine_dir, manifest)
    elif manifest.backend == "onnxruntime":
        embed, rope = _onnx_table_rows(engine_dir, manifest, args.qk_rope_head_dim // 2)
    else:
        return
    where = f"{engine_dir / MANIFEST_NAME}"
    if embed is not None and embed != args.vocab_size:
        raise _bad(where, "model.vocab_size", f"is {args.vocab_size} but the payload's embedding has {embed} rows")
    if rope and args.max_seq_len not in rope:
        raise _bad(where, "model.max_seq_len", f"is {args.max_seq_len} but the payload's rope tables have "
                   f"{max(rope)} positions")
