"""Strict loading of report dataclasses from JSON: the dataclasses are the schema.

    report = from_dict(ProfileReport, json.loads(text))   # SchemaError naming the path on any mismatch

Why not JSON Schema: the writer and the checker should be one definition; a dataclass tree gives
both (asdict writes it, from_dict checks every key and type recursively, unknown keys refused).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class SchemaError(ValueError):
    """A report that does not match its dataclass; the message gives the path, e.g. engines[0].results[2].batch."""


def from_dict(cls: type[T], data: Any, path: str = "$") -> T:
    return _load(cls, data, path)


def _load(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _load(option, value, path)
            except SchemaError as e:
                errors.append(str(e))
        raise SchemaError(f"{path}: {value!r:.60} matches none of {tp} ({'; '.join(errors)})")
    if tp is type(None):
        if value is not None:
            raise SchemaError(f"{path}: expected null, got {type(value).__name__}")
        return None
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object for {tp.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - fields)
        missing = sorted(fields - set(value))
        if unknown or missing:
            problems = ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])
            raise SchemaError(f"{path}: {tp.__name__} " + ", ".join(problems))
        return tp(**{k: _load(hints[k], value[k], f"{path}.{k}") for k in fields})
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_load(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object, got {type(value).__name__}")
        key_tp, val_tp = typing.get_args(tp)
        return {k: _load(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{path}: expected a number, got {value!r:.40}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise SchemaError(f"{path}: expected {tp.__name__}, got {value!r:.40}")
        return value
    raise SchemaError(f"{path}: unsupported schema type {tp}")
