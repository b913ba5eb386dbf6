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
updates it in place. At most MAX_GRAPHS graphs are kept (least recently used dropped). If a
capture fails the step falls back to running the package directly and says so once (log).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

log = logging.getLogger(__name__)

MAX_GRAPHS = 8


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
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def load_package(path: Path, device: torch.device):
    """An AOTInductor package as a callable, through the same C++ loader runtime/cpp uses.

    Not torch._inductor.aoti_load_package: on the GPU machine (torch 2.11) it crashed (SIGSEGV)
    before returning for every CUDA package, a plain Linear included, while building the C++
    AOTIModelPackageLoader directly is what the C++ runtime does.
    """
    from torch._inductor.package.package import AOTICompiledModel

    index = device.index if device.type == "cuda" and device.index is not None else -1
    return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index))


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
        if t.device.type != device.type:
            problems.append(f"{name} is on {t.device}, the engine runs on {device}")
    if problems:
        raise ValueError("torch engine step: " + "; ".join(problems))


class _DecodeGraphs:
    """CUDA graphs of the decode package, one per (b, T, cache address, dtype)."""

    def __init__(self, run: Callable):
        self.run = run
        self.graphs: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self.failed = False

    def __call__(self, tokens, start_pos, kv_cache):
        if self.failed:
            return self.run(tokens, start_pos, kv_cache)
        key = (tuple(kv_cache.shape), kv_cache.data_ptr(), kv_cache.dtype, tokens.device)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(tokens, start_pos, kv_cache)
            except Exception as e:  # noqa: BLE001 - capture is an optimization; run eagerly instead
                log.warning("torch engine: CUDA graph capture of decode failed (%s); running the package directly", e)
                self.failed = True
                return self.run(tokens, start_pos, kv_cache)
            self.graphs[key] = entry
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        entry["tokens"].copy_(tokens)
        entry["start_pos"].copy_(start_pos)
        entry["graph"].replay()
        return tuple(t.clone() for t in entry["outputs"])

    def _capture(self, tokens, start_pos, kv_cache) -> dict[str, Any]:
        static_tokens, static_pos = tokens.clone(), start_pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # loads kernels, settles allocations outside the capture
                self.run(static_tokens, static_pos, kv_cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.run(static_tokens, static_pos, kv_cache)
        return {"graph": graph, "tokens": static_tokens, "start_pos": static_pos, "outputs": outputs,
                "cache": kv_cache}


class AOTIStep:
    """StepFunction over a prefill and a decode AOTInductor package sharing one weight dict."""

    def __init__(self, prefill: Callable, decode: Callable, device: torch.device, cache_dtype: torch.dtype,
                 cuda_graph: bool = False, weights: Mapping[str, torch.Tensor] | None = None):
        self.device, self.cache_dtype = device, cache_dtype
        self._prefill, self._decode = prefill, decode
        self._weights = weights  # kept alive: the packages use these tensors' memory (user_managed)
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self._graphs = _DecodeGraphs(decode) if self.cuda_graph else None

    @classmethod
    def from_packages(cls, packages: Mapping[str, Path], weights: Mapping[str, torch.Tensor],
                      device: torch.device, cache_dtype: torch.dtype, cuda_graph: bool = False) -> "AOTIStep":
        loaded = {}
        for kind, path in packages.items():
            model = load_package(path, device)
            fqns = model.get_constant_fqns()
            missing = sorted(set(fqns) - set(weights))
            if missing:
                raise ValueError(f"{path}: package needs constants missing from the weights file: {missing[:8]}"
                                 + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
            model.load_constants({f: weights[f] for f in fqns}, check_full_update=True, user_managed=True)
            loaded[kind] = model
        return cls(loaded["prefill"], loaded["decode"], device, cache_dtype, cuda_graph, weights)

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

