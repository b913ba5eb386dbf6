"""The debug engine of an engine: same source, backend, precision, device and passes, plus hidden states.

    path = ensure_debug_engine(engine, Path("engine.debug"))   # built once, reused when it matches
    run = DebugRunner.load(path)
    logits, hidden = run(tokens)      # [b, s, V] float32, [b, L + 2, s, dim] float32 (CPU tensors)

The debug engine traces debug_step.DebugLatentCacheStep through dsv3_export.build, so it goes
through exactly the export, passes and lowering the engine went through; only the third output
(stage_names(L): embed, layers.i, norm) is new. `diff` checks that its logits match the engine's,
so a localization is never drawn from a build that does not reproduce the engine.

Running it: the backends' step functions return (logits, new_kv); the debug program has a third
output, so DebugRunner binds it itself (ONNX Runtime: one more IOBinding output; torch: the
prefill package returns every output).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from rich.console import Console

from dsv3_export.debug_step import DebugLatentCacheStep, stage_names
from dsv3_export.engines.base import torch_dtype
from dsv3_export.manifest import EngineDirError, Manifest, read_manifest
from dsv3_export.runtime import Engine, load_engine


class DebugEngineError(RuntimeError):
    """The debug engine cannot be built or used; the message says why and what to do instead."""


def build_options(manifest: Manifest, out: Path):
    """BuildOptions that rebuild `manifest`'s engine from its recorded source."""
    from dsv3_export.build import BuildOptions

    source = manifest.source
    model = manifest.model
    common = dict(backend=manifest.backend, precision=manifest.precision, device=manifest.device, out=out,
                  passes=_passes(manifest))
    if "checkpoint" in source:  # the recorded source omits runtime sizes: take them from the engine's config
        common.update(max_batch_size=model["max_batch_size"], max_seq_len=model["max_seq_len"])
        path = Path(source["checkpoint"])
        if not (path / "config.json").is_file():
            raise DebugEngineError(f"the engine's source checkpoint {path} is gone (no config.json there); "
                                   "per-layer outputs need it (or pass --no-layers)")
        return BuildOptions(checkpoint=path, **common)
    if "preset" in source:
        overrides = tuple(sorted(preset_overrides(source).items()))
        return BuildOptions(preset=source["preset"], seed=int(source.get("seed", 0)), config_overrides=overrides,
                            max_batch_size=source.get("max_batch_size"), max_seq_len=source.get("max_seq_len"),
                            **common)
    raise DebugEngineError(f"the engine's manifest records no source (source={source!r}); per-layer outputs "
                           "need one (rebuild the engine with this dsv3-export, or pass --no-layers)")


def preset_overrides(source: dict) -> dict:
    """The ModelArgs overrides a preset source records besides its name, seed and runtime sizes."""
    return {k: v for k, v in source.items() if k not in ("preset", "seed", "max_batch_size", "max_seq_len")}


def _passes(manifest: Manifest) -> tuple[str, ...]:
    names: list[str] = []
    for p in manifest.passes:
        if p["name"] not in names:
            names.append(p["name"])
    return tuple(names)


def mismatch(debug: Manifest, manifest: Manifest) -> str | None:
    """Why `debug` is not the debug engine of `manifest` (None when it is)."""
    if debug.backend_info.get("step") != DebugLatentCacheStep.__name__:
        return f"it was not built from {DebugLatentCacheStep.__name__} (backend_info.step)"
    for key in ("model", "backend", "precision", "device", "source"):
        if getattr(debug, key) != getattr(manifest, key):
            return f"its {key} differs from the engine's"
    if _passes(debug) != _passes(manifest):
        return "its passes differ from the engine's"
    return None


def check_debug_path(path: Path, engine: Engine) -> None:
    """Refuse a debug-engine path that building there would destroy: the engine itself, or any engine directory that
    is not a debug engine (ensure_debug_engine rebuilds a mismatching one in place, and build replaces engines)."""
    path = Path(path)
    if path.absolute().resolve() == Path(engine.path).absolute().resolve():
        raise DebugEngineError(f"--debug-engine {path}: is the engine being compared, not a debug engine; "
                               "refusing to replace it (give another directory)")
    if (path / "manifest.json").is_file():
        step = read_manifest(path).backend_info.get("step")
        if step != DebugLatentCacheStep.__name__:
            raise DebugEngineError(f"--debug-engine {path}: holds an engine that is not a debug engine; refusing to "
                                   f"replace it (backend_info.step is {step!r}; give another directory)")
    from dsv3_export.build import check_out_dir

    try:  # what build would refuse there (a file, a non-empty other directory, inside an engine), refused now
        check_out_dir(path)
    except EngineDirError as e:
        raise DebugEngineError(f"--debug-engine {e}") from None


def ensure_debug_engine(engine: Engine, path: Path, console: Console | None = None) -> Path:
    """Reuse the debug engine at `path` when it matches `engine`, else build it there (check_debug_path first)."""
    console = console or Console(stderr=True, quiet=True)
    check_debug_path(path, engine)
    if (path / "manifest.json").is_file():
        reason = mismatch(read_manifest(path), engine.manifest)
        if reason is None:
            console.print(f"reusing debug engine {path}")
            return path
        console.print(f"rebuilding debug engine {path}: {reason}")
    from dsv3_export.build import build_engine

    options = build_options(engine.manifest, path)
    with contextlib.redirect_stdout(io.StringIO()):  # exporters print; stdout stays clean
        build_engine(options, console, step_factory=DebugLatentCacheStep)
    reason = mismatch(read_manifest(path), engine.manifest)
    if reason is not None:
        raise DebugEngineError(f"the debug engine built at {path} does not reproduce {engine.path}: {reason}")
    return path


class DebugRunner:
    """Runs a debug engine's prefill program from position 0 and returns logits and hidden states."""

    def __init__(self, engine: Engine):
        self.engine = engine
        m = engine.manifest
        if m.backend_info.get("step") != DebugLatentCacheStep.__name__:
            raise DebugEngineError(f"{engine.path} is not a debug engine (manifest backend_info.step is "
                                   f"{m.backend_info.get('step')!r}, not {DebugLatentCacheStep.__name__!r})")
        if m.backend == "onnxruntime" and len(m.outputs) != 3:
            raise DebugEngineError(f"{engine.path}: expected outputs logits, new_kv, hidden; manifest lists "
                                   f"{[o['name'] for o in m.outputs]}")
        # ONNX Runtime records the graph's third output (named by the exporter); torch engines list two.
        self.hidden_spec = m.outputs[2] if len(m.outputs) > 2 else {"name": "hidden", "dtype": m.kv_cache["dtype"]}
        self.stages = stage_names(m.model["n_layers"])

    @classmethod
    def load(cls, path: Path) -> "DebugRunner":
        return cls(load_engine(path))

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        engine = self.engine
        b, s = tokens.shape
        cache = engine.new_cache(b, s)
        start = torch.zeros(b, dtype=torch.int64, device=engine.device)
        tokens = tokens.to(engine.device, torch.int64).contiguous()
        backend = engine.manifest.backend
        if backend == "onnxruntime":
            outputs = self._run_ort(tokens, start, cache)
        elif backend == "torch":
            # The prefill package returns all three outputs; AOTIStep.__call__ unpacks two.
            run = engine.step._decode if s == 1 else engine.step._prefill
            outputs = run(tokens, start, cache)
        else:
            raise DebugEngineError(f"no debug runner for backend {backend!r}")
        logits, hidden = outputs[0], outputs[2]
        return logits.float().cpu(), hidden.float().cpu()

    def _run_ort(self, tokens: torch.Tensor, start: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        step = self.engine.step
        b, s = tokens.shape
        m = self.engine.manifest
        a = self.engine.args
        logits = torch.empty(b, s, a.vocab_size, dtype=torch.float32, device=step.device)  # [b, s, V]
        new_kv = torch.empty(b, a.n_layers, s, cache.shape[-1], dtype=step.cache_dtype, device=step.device)
        hidden = torch.empty(b, len(self.stages), s, a.dim, dtype=torch_dtype(self.hidden_spec["dtype"]),
                             device=step.device)  # [b, L + 2, s, dim]
        binding = step.session.io_binding()
        for name, t in (("tokens", tokens), ("start_pos", start), ("kv_cache", cache)):
            step._bind(binding, name, t)
        for spec, t in zip(m.outputs, (logits, new_kv, hidden)):
            step._bind(binding, spec["name"], t, output=True)
        step.session.run_with_iobinding(binding)
        return logits, new_kv, hidden
