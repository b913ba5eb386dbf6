"""The backend protocol: build an engine payload from exported programs; load it as a step function.

Every backend (engines/onnxruntime.py, engines/torch.py, ...) provides one `Backend` object:

    backend = get_backend("onnxruntime")
    reason = backend.check_target(target)                # None, or why it cannot build this target
    out = backend.build(programs, args, target, tmp_dir)  # writes payload files into tmp_dir
    step = backend.load(engine_dir, manifest)            # after the manifest verified every file
    logits, new_kv = step(tokens, start_pos, kv_cache)   # LatentCacheStep's contract (step.py)

Why the runtime, not the backend, owns generation: sampling, the KV cache and its writes are the
same for every backend, so dsv3_export.runtime does them once with torch tensors on
`step.device`. A backend supplies only the step function and where tensors live (the device and
the cache dtype). torch tensors are the interchange type: numpy views on CPU cost nothing, and on
CUDA their data pointers bind to ONNX Runtime's IOBinding or feed an AOTInductor package.

The engine directory and its manifest are written by dsv3_export.build / dsv3_export.manifest,
never by a backend: a backend only writes its payload files and describes them in BuildOutput.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import torch
from torch.export import ExportedProgram

if TYPE_CHECKING:
    from dsv3_export.manifest import Manifest
    from dsv3_export.reference.args import ModelArgs

PRECISIONS = ("fp32", "bf16", "fp8")
DEVICES = ("cpu", "cuda")


class BackendUnavailable(RuntimeError):
    """The backend (or the target asked of it) cannot be built or run on this machine; says why."""


@dataclass(frozen=True)
class Target:
    """What to build for. precision: weight/compute format; device: where the engine runs."""

    precision: str = "fp32"  # "fp32" | "bf16" | "fp8" (fp8 weights, bf16/fp32 compute)
    device: str = "cpu"  # "cpu" | "cuda"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {DEVICES}")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the manifest records it; symbolic dims are strings."""

    name: str
    dtype: str  # torch dtype name without the prefix: "int64", "float32", "bfloat16", ...
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass
class BuildOutput:
    """What a backend wrote into the engine directory and what the manifest should say about it."""

    files: list[str]  # payload file names, relative to the engine directory
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    cache_dtype: str  # dtype of the kv_cache input, e.g. "float32" (see TensorSpec.dtype)
    lowerings: dict[str, str] = field(default_factory=dict)  # op or pattern -> how it was lowered
    op_histogram: dict[str, int] = field(default_factory=dict)  # payload op type -> count
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific manifest entries


# progress(message): a backend reports what it is doing; build.py shows it on stderr.
Progress = Callable[[str], None]


class StepFunction(Protocol):
    """A loaded engine's step: LatentCacheStep's signature on torch tensors on `device`.

    tokens [b, s] int64, start_pos [b] int64, kv_cache [b, L, T, w] cache_dtype
    -> logits [b, s, V] float32, new_kv [b, L, s, w] cache_dtype (all on `device`).
    The cache is only read; the runtime writes new_kv into it. A step may also offer
    `step_writing_cache(tokens, start_pos, kv_cache) -> logits`, the same step with the write done
    in the same call (the torch engine's decode CUDA graphs hold it): dsv3_export/step.py
    step_writing_cache uses it when present.
    """

    device: torch.device
    cache_dtype: torch.dtype

    def __call__(self, tokens: torch.Tensor, start_pos: torch.Tensor,
                 kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Backend(Protocol):
    name: str
    # Which exported programs (dsv3_export.export.PROGRAM_KINDS) build() needs.
    program_kinds: tuple[str, ...]

    def check_target(self, target: Target) -> str | None:
        """None when this backend can build `target` here, else the reason it cannot."""

    def build(self, programs: Mapping[str, ExportedProgram], args: "ModelArgs", target: Target,
              out_dir: Path, progress: Progress | None = None) -> BuildOutput:
        """Write the payload for `target` into the (empty, temporary) directory out_dir."""

    def load(self, engine_dir: Path, manifest: "Manifest") -> StepFunction:
        """Load a verified engine directory. Raise BackendUnavailable when it cannot run here."""


# name -> module that defines BACKEND, or the reason the backend cannot exist here.
BACKENDS: dict[str, str] = {
    "onnxruntime": "dsv3_export.engines.onnxruntime",
    "torch": "dsv3_export.engines.torch",
}
UNAVAILABLE: dict[str, str] = {
    "tensorrt": "not available: TensorRT builder is not installable here "
                "(only the lean/dispatch runtimes are on PyPI; the builder downloads from an unreachable host)",
}


def get_backend(name: str) -> Backend:
    """The backend called `name`; BackendUnavailable with the reason when it cannot be used."""
    if name in UNAVAILABLE:
        raise BackendUnavailable(f"backend {name!r}: {UNAVAILABLE[name]}")
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; backends: {', '.join([*BACKENDS, *UNAVAILABLE])}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as e:
        raise BackendUnavailable(f"backend {name!r}: cannot import {BACKENDS[name]}: {e}") from e
    return module.BACKEND


def compute_dtype(target: Target) -> torch.dtype:
    """The dtype a program for `target` is exported in (activations, dense weights, KV cache).

    fp32 -> float32; bf16 -> bfloat16; fp8 (weights fp8 + scales) -> bfloat16 on CUDA, float32 on
    the CPU (ONNX Runtime's CPU kernels have no bf16 compute)."""
    if target.precision == "fp32" or (target.precision == "fp8" and target.device == "cpu"):
        return torch.float32
    return torch.bfloat16


def torch_dtype(name: str) -> torch.dtype:
    """"float32" -> torch.float32 (TensorSpec / manifest dtype names)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
