"""Running loaded AOTInductor packages as the backend's step function (engines/torch.py).

    step = AOTIStep.from_packages({"prefill": p1, "decode": p2}, weights, device)
    logits, new_kv = step(tokens, start_pos, kv_cache)   # LatentCacheStep's contract

Dispatch: tokens [b, 1] run the decode package, longer ones the prefill package. Both packages
were compiled without their constants; `weights` (one dict, loaded once) is handed to both with
user_managed=True, so they alias the same memory.

CUDA graphs (CUDA only, `cuda_graph=True`): a decode step with a new (batch, cache length,
cache buffer, dtype) key runs the package twice to warm up, then is captured into a CUDA graph
with static token / position buffers; later steps with that key copy their inputs into those
buffers and replay. The cache tensor is captured by address, which is right because the runtime
updates it in place. `step_writing_cache` replays graphs that also write the step's new latent rows
into the cache (captured apart from the plain step's, keyed by that too). At most MAX_GRAPHS graphs
are kept (least recently used dropped). If a capture fails the step falls back to running the
package directly and says so once (log).

Loading defences (added while the GPU machine's packages died with SIGSEGV at load, before the
cause was found: its C++ compiler, engines/torch_cxx.py; kept because each is right on its own):
  * packages run single-threaded (AOTIModelPackageLoader's run_single_threaded): the thread-safe
    container run records, queries and synchronizes a CUDA event around every call and moves the
    model between pools, which is illegal inside a CUDA graph capture; torch documents this mode
    for CUDA graphs. DSV3_TORCH_AOTI_SINGLE_THREADED=0 restores the thread-safe run.
  * every constant handed over with user_managed=True is checked first (each name the package asks
    for present; dtype, shape and strides as the build recorded them; on the package's exact
    device) and the tensors actually handed over are kept for the step's life.
  * step inputs must be on the engine's exact device (cuda:N, not only "cuda").
  * DSV3_TORCH_CUDA_GRAPH=0 turns decode CUDA graphs off (the package runs directly).

Programmatic dependent launch (`pdl`, a PdlPlan): the decode graph is captured, its edges into the
kernels that wait for their producer are made programmatic (engines/cuda_graph_pdl.py), then it is
instantiated; `pdl_edges` says what changed. If the edit fails the graph runs as captured (logged).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dsv3_export.engines.cuda_graph_pdl import PdlEdges, PdlPlan, capture_graph
from dsv3_export.manifest import EngineDirError
from dsv3_export.step import write_cache

log = logging.getLogger(__name__)

MAX_GRAPHS = 8
SINGLE_THREADED_ENV = "DSV3_TORCH_AOTI_SINGLE_THREADED"
CUDA_GRAPH_ENV = "DSV3_TORCH_CUDA_GRAPH"


def env_flag(name: str, default: bool) -> bool:
    """A 0/1 switch from the environment; anything else is an error naming the variable."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected 0 or 1")


def env_choice(name: str, default: str, choices: Mapping[str, str]) -> str:
    """A build switch with exact values (choices: value -> what it selects), read when a program is
    lowered; anything else is an error naming the variable, its value and each choice."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: use " + " or ".join(f"{v} ({what})" for v, what in choices.items()))
    return value


def exact_device(device: torch.device | str) -> torch.device:
    """cuda -> cuda:N (the current device): packages, weights, inputs and graphs agree on one index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def save_weights(weights: Mapping[str, torch.Tensor], path: Path) -> None:
    """safetensors file of contiguous CPU copies; tensors sharing storage are cloned apart."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in sorted(weights.items()):
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[name] = t
    save_file(out, str(path))


def load_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:  # intact by its hash, so written wrong: say which file
        raise EngineDirError(f"{path}: not a readable safetensors file ({e})") from e


def load_package(path: Path, device: torch.device, single_threaded: bool = True):
    """An AOTInductor package as a callable, through the same C++ loader runtime/cpp uses.

    Builds the C++ AOTIModelPackageLoader directly, as the C++ runtime does, with the run mode
    chosen here (torch._inductor.aoti_load_package picks its own). The crashes at load seen on the
    GPU machine with either path were the C++ compiler's (engines/torch_cxx.py). On CUDA the runtime is
    initialized and the package's device made current while the loader runs: the model's
    constructor takes the current device (cudaGetDevice) when given none.
    """
    from torch._inductor.package.package import AOTICompiledModel

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: AOTInductor package not found")
    device = exact_device(device)
    try:
        if device.type != "cuda":
            return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", single_threaded, 1, -1))
        torch.cuda.init()
        with torch.cuda.device(device.index):
            loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", single_threaded, 1, device.index)
    except RuntimeError as e:  # a truncated or foreign archive: the C++ loader's message names no file
        raise EngineDirError(f"{path}: AOTInductor cannot load this package ({str(e).splitlines()[0][:300]})") from e
    return AOTICompiledModel(loader)


def constant_records(constants: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """{fqn: {dtype, shape, stride, device}} of a program's constants as the package was compiled for
    them (device: the type, "cuda" or "cpu"; a CUDA program may keep a constant on the CPU)."""
    return {fqn: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "stride": list(t.stride()),
                  "device": t.device.type} for fqn, t in sorted(constants.items())}


def prepare_constants(path: Path, fqns: list[str], weights: Mapping[str, torch.Tensor], device: torch.device,
                      expected: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """The tensors to hand to one package with user_managed=True, checked and placed.

    The package keeps handles to these tensors and indexes them with the dtype, shape and strides
    it was compiled for, on its own device, checking none of it (torch 2.11): a wrong one is a
    wrong answer or a native crash. So each is checked against the build's record (`expected`,
    backend_info["constants"]; None: names only), moved to the exact device (or kept on the CPU
    where the build recorded a CPU constant: a CUDA package reads those on the host), and given
    the recorded strides (the weights file stores contiguous copies) or made contiguous.
    """
    device = exact_device(device)
    missing = sorted(set(fqns) - set(weights))
    if missing:
        raise ValueError(f"{path}: package needs constants missing from the weights file: {missing[:8]}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    unrecorded = sorted(set(fqns) - set(expected)) if expected is not None else []
    if unrecorded:
        raise ValueError(f"{path}: package needs constants the build did not record: {unrecorded[:8]}")
    out: dict[str, torch.Tensor] = {}
    for fqn in fqns:
        t = weights[fqn]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: constant {fqn!r} is a {type(t).__name__}, not a tensor")
        stride, target = None, device
        if expected is not None:
            want = expected[fqn]
            shape, dtype = tuple(want["shape"]), str(t.dtype).removeprefix("torch.")
            if dtype != want["dtype"] or tuple(t.shape) != shape:
                raise ValueError(f"{path}: constant {fqn!r} is {dtype} {tuple(t.shape)} in the weights file, "
                                 f"the package was compiled for {want['dtype']} {shape}")
            stride = tuple(want["stride"]) if want.get("stride") is not None else None
            if want.get("device", device.type) != device.type:
                target = exact_device(torch.device(want["device"]))
        if t.device != target:
            t = t.to(target)
        if stride is not None and t.stride() != stride and t.numel() > 1:
            t = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=target).copy_(t)
        elif stride is None and not t.is_contiguous():
            t = t.contiguous()
        out[fqn] = t
    return out


def attach_weights(model, path: Path, weights: Mapping[str, torch.Tensor], device: torch.device,
                   expected: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """Hand a package its constants without copying; returns the tensors handed over (keep them)."""
    constants = prepare_constants(path, list(model.get_constant_fqns()), weights, device, expected)
    model.load_constants(constants, check_full_update=True, user_managed=True)
    return constants


def _check_inputs(tokens: torch.Tensor, start_pos: torch.Tensor, kv_cache: torch.Tensor,
                  device: torch.device, cache_dtype: torch.dtype) -> None:
    problems = []
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        problems.append(f"tokens must be int64 [b, s], got {tokens.dtype} {tuple(tokens.shape)}")
    if start_pos.dim() != 1 or start_pos.dtype != torch.int64 or start_pos.shape[0] != tokens.shape[0]:
        problems.append(f"start_pos must be int64 [b={tokens.shape[0]}], got {start_pos.dtype} {tuple(start_pos.shape)}")
    if kv_cache.dim() != 4 or kv_cache.dtype != cache_dtype or kv_cache.shape[0] != tokens.shape[0]:
        problems.append(f"kv_cache must be {cache_dtype} [b={tokens.shape[0]}, L, T, w], "
                        f"got {kv_cache.dtype} {tuple(kv_cache.shape)}")
    elif not kv_cache.is_contiguous():
        problems.append("kv_cache must be contiguous (AOTInductor packages assume contiguous strides)")
    for name, t in (("tokens", tokens), ("start_pos", start_pos), ("kv_cache", kv_cache)):
        if t.device != device:
            problems.append(f"{name} is on {t.device}, the engine runs on {device}")
    if problems:
        raise ValueError("torch engine step: " + "; ".join(problems))


class _DecodeGraphs:
    """CUDA graphs of the decode package, one per (b, T, cache address, dtype, whether the cache write is in it)."""

    def __init__(self, run: Callable, pdl: PdlPlan | None = None):
        self.run = run
        self.pdl = pdl
        self.pdl_edges: PdlEdges | None = None  # the last capture's edit
        self.captures = 0  # graphs captured so far (benchmarks/torch_16b.py: none inside a timed generate)
        self.graphs: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self.failed = False

    def __call__(self, tokens, start_pos, kv_cache, write: bool = False):
        """The package's (logits, new_kv) for one decode step; write=True: (logits,) with new_kv written into
        kv_cache at start_pos inside the same graph (no new_kv clone, no scatter launched from the host)."""
        if self.failed:
            return self._run_direct(tokens, start_pos, kv_cache, write)
        key = (tuple(kv_cache.shape), kv_cache.data_ptr(), kv_cache.dtype, tokens.device, write)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(tokens, start_pos, kv_cache, write)
            except Exception as e:  # noqa: BLE001 - capture is an optimization; run eagerly instead
                log.warning("torch engine: CUDA graph capture of decode failed (%s); running the package directly", e)
                self.failed = True
                return self._run_direct(tokens, start_pos, kv_cache, write)
            self.graphs[key] = entry
            self.captures += 1
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        entry["tokens"].copy_(tokens)
        entry["start_pos"].copy_(start_pos)
        entry["graph"].replay()
        return tuple(t.clone() for t in entry["outputs"])

    def _run_direct(self, tokens, start_pos, kv_cache, write: bool):
        logits, new_kv = self.run(tokens, start_pos, kv_cache)
        if not write:
            return logits, new_kv
        write_cache(kv_cache, new_kv, start_pos)
        return (logits,)

    def _capture(self, tokens, start_pos, kv_cache, write: bool = False) -> dict[str, Any]:
        static_tokens, static_pos = tokens.clone(), start_pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # loads kernels, settles allocations outside the capture; the cache is not written
                self.run(static_tokens, static_pos, kv_cache)
        torch.cuda.current_stream().wait_stream(stream)
        # the write (if any) replays with the step, at the positions copied into static_pos
        graph, outputs, self.pdl_edges = capture_graph(
            lambda: self._run_direct(static_tokens, static_pos, kv_cache, write), self.pdl)
        return {"graph": graph, "tokens": static_tokens, "start_pos": static_pos, "outputs": outputs,
                "cache": kv_cache}


class AOTIStep:
    """StepFunction over a prefill and a decode AOTInductor package sharing one weight dict."""

    def __init__(self, prefill: Callable, decode: Callable, device: torch.device, cache_dtype: torch.dtype,
                 cuda_graph: bool = False, weights: Mapping[str, Any] | None = None, pdl: PdlPlan | None = None):
        self.device, self.cache_dtype = exact_device(device), cache_dtype
        self._prefill, self._decode = prefill, decode
        self._weights = weights  # kept alive: the packages use these tensors' memory (user_managed)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self._graphs = _DecodeGraphs(decode, pdl) if self.cuda_graph else None

    @property
    def graphs_keyed_by_cache(self) -> bool:
        """Decode steps replay CUDA graphs captured per cache buffer: a caller that reuses one cache buffer across
        calls (dsv3_export/runtime.py Engine.generate) replays instead of capturing again."""
        return self._graphs is not None and not self._graphs.failed

    @property
    def pdl(self) -> PdlPlan | None:
        return self._graphs.pdl if self._graphs is not None else None

    @property
    def pdl_edges(self) -> PdlEdges | None:
        """What the last decode graph capture made programmatic (None: none made, or no capture yet)."""
        return self._graphs.pdl_edges if self._graphs is not None else None

    def set_decode_pdl(self, pdl: PdlPlan | None) -> None:
        """Capture decode graphs with (or without) programmatic edges from now on: the graphs captured so far
        are dropped. The benchmark times both forms of one build this way."""
        if self._graphs is None:
            raise ValueError("torch engine step: programmatic edges need decode CUDA graphs (cuda_graph=True)")
        self._graphs.graphs.clear()
        self._graphs.pdl, self._graphs.pdl_edges = pdl, None

    @classmethod
    def from_packages(cls, packages: Mapping[str, Path], weights: Mapping[str, torch.Tensor],
                      device: torch.device, cache_dtype: torch.dtype, cuda_graph: bool = False,
                      constants: Mapping[str, Mapping[str, Any]] | None = None,
                      single_threaded: bool = True, pdl: PdlPlan | None = None) -> "AOTIStep":
        """constants: the build's {fqn: {dtype, shape, stride}} record (None for engines built before it)."""
        device = exact_device(device)
        loaded, handed = {}, {}
        placed = dict(weights)  # constants moved / re-strided for one package serve the next as they are
        for kind, path in packages.items():
            model = load_package(path, device, single_threaded)
            handed[kind] = attach_weights(model, path, placed, device, constants)
            placed.update(handed[kind])
            loaded[kind] = model
        # every tensor a package holds a handle to stays referenced by the step
        return cls(loaded["prefill"], loaded["decode"], device, cache_dtype, cuda_graph, {"file": weights, **handed},
                   pdl=pdl)

    def step_writing_cache(self, tokens: torch.Tensor, start_pos: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """One step's logits with its new latent rows written into kv_cache (dsv3_export/step.py
        step_writing_cache): a decode step on CUDA graphs replays one graph holding the step and the write, so the
        host launches neither the scatter nor a copy of new_kv; otherwise the step, then write_cache."""
        _check_inputs(tokens, start_pos, kv_cache, self.device, self.cache_dtype)
        if tokens.shape[1] == 1 and self._graphs is not None:
            return self._graphs(tokens.contiguous(), start_pos.contiguous(), kv_cache, write=True)[0]
        logits, new_kv = self(tokens, start_pos, kv_cache)
        write_cache(kv_cache, new_kv, start_pos)
        return logits

    def __call__(self, tokens: torch.Tensor, start_pos: torch.Tensor,
                 kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(tokens, start_pos, kv_cache, self.device, self.cache_dtype)
        # The packages read inputs with the strides they were compiled for (contiguous): a view
        # such as tokens[:, :1] (row stride s) would silently feed row 0's neighbours to row 1.
        tokens, start_pos = tokens.contiguous(), start_pos.contiguous()
        if tokens.shape[1] == 1:
            if self._graphs is not None:
                return self._graphs(tokens, start_pos, kv_cache)
            logits, new_kv = self._decode(tokens, start_pos, kv_cache)
        else:
            logits, new_kv = self._prefill(tokens, start_pos, kv_cache)
        return logits, new_kv

