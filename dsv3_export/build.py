"""build: preset or checkpoint -> model -> torch.export -> passes -> backend -> engine directory.

    summary = build_engine(BuildOptions(preset="tiny", backend="onnxruntime", out=Path("engine")))

The one orchestration of the compiler, shared by `dsv3-export build`, the tests and the
benchmarks. Each phase is timed and shown on stderr (rich); the summary lists the passes with
their match counts, the lowered ops, the payload op histogram and the file sizes. The engine
directory is written atomically (dsv3_export.manifest.write_engine_dir): a failed build leaves
no half-written engine behind, and an existing engine at `out` is replaced only on success.

Works with or without the pass pipeline: when passes/pipeline.py is absent (or --passes none),
the program straight from export is lowered, which every backend must accept.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from rich.console import Console

from dsv3_export.atomic import unwritable_parent
from dsv3_export.engines.base import BackendUnavailable, Target, compute_dtype, get_backend
from dsv3_export.export import TUNE_FIELDS, TuneShape, export_step, tune_shape
from dsv3_export.manifest import EngineDirError, Manifest, kv_cache_layout, refuse_overwrite, write_engine_dir
from dsv3_export.reference.args import ConfigError, ModelArgs
from dsv3_export.reference.model import Transformer
from dsv3_export.step import LatentCacheStep

FP8_PASS = "quantize_fp8_blockwise"


@dataclass(frozen=True)
class BuildOptions:
    """Mirrors `dsv3-export build`'s flags. Exactly one of preset / checkpoint (default: tiny)."""

    preset: str | None = None
    checkpoint: Path | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    out: Path = Path("engine")
    passes: tuple[str, ...] | None = None  # None: the whole pipeline; (): no passes
    dump_graphs: Path | None = None
    verify_each_pass: bool = False
    seed: int = 0  # preset weights
    max_batch_size: int | None = None  # runtime overrides of the model config
    max_seq_len: int | None = None
    config_overrides: tuple[tuple[str, Any], ...] = ()  # other ModelArgs fields, e.g. (("n_layers", 2),)
    # The sizes each program is exported at, which AOTInductor tunes its kernels at (export.TuneShape): per
    # program kind, the export.TUNE_FIELDS given; the others from export.default_tune_shape.
    tune: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class BuildSummary:
    manifest: Manifest
    out: Path
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall seconds

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "seconds": self.seconds, "manifest": self.manifest.to_dict()}


class _Phases:
    """Timed phases shown as a spinner on stderr, each ending in one line with its duration."""

    def __init__(self, console: Console):
        self.console, self.seconds = console, {}

    @contextlib.contextmanager
    def phase(self, name: str, what: str) -> Iterator[Any]:
        start = time.perf_counter()
        with self.console.status(f"{what} ...") as status:
            yield lambda msg: status.update(f"{what}: {msg}")
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.console.print(f"[green]done[/green] {what} [dim]({self.seconds[name]:.1f} s)[/dim]")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Keep the libraries' own chatter (torch.onnx's step prints on stdout, torch's pytree
    FutureWarning) out of the build's output: the phases above report progress on stderr, and
    stdout stays free for machine-readable output."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        yield


def _load_model(options: BuildOptions, dtype: torch.dtype) -> tuple[Transformer, dict[str, Any]]:
    overrides = {k: v for k, v in (("max_batch_size", options.max_batch_size), ("max_seq_len", options.max_seq_len))
                 if v is not None}
    if options.checkpoint is not None:
        if options.config_overrides:
            raise ValueError("config_overrides apply to presets only; a checkpoint's config is its own")
        from dsv3_export.checkpoint import load_checkpoint

        model = load_checkpoint(options.checkpoint, dtype=dtype, device="cpu", attn_impl="absorb", **overrides)
        return model, {"checkpoint": str(Path(options.checkpoint).absolute())}
    from dsv3_export.checkpoint.presets import preset_model_from

    name = options.preset or "tiny"
    overrides.update(dict(options.config_overrides))
    model = preset_model_from(name, dtype, "cpu", options.seed, overrides, attn_impl="absorb")
    return model, {"preset": name, "seed": options.seed, **overrides}


def _model_args(options: BuildOptions) -> ModelArgs:
    """The ModelArgs _load_model's model will have, from the config alone (no weights drawn or read)."""
    if options.checkpoint is not None:
        from dsv3_export.checkpoint import load_args

        args = load_args(options.checkpoint, max_seq_len=options.max_seq_len)
        return args if options.max_batch_size is None else args.replace(max_batch_size=options.max_batch_size)
    overrides = {k: v for k, v in (("max_batch_size", options.max_batch_size), ("max_seq_len", options.max_seq_len))
                 if v is not None}
    overrides.update(dict(options.config_overrides))  # as _load_model: the config overrides win
    return ModelArgs.preset(options.preset or "tiny").replace(**overrides)


def check_out_dir(out: Path) -> None:
    """Refuse an --out that write_engine_dir would refuse, or whose parent cannot be written, before any work:
    on a large model the export and passes take minutes (write_engine_dir checks again when it writes)."""
    out = Path(out).absolute()
    refuse_overwrite(out)
    parent = unwritable_parent(out)
    if parent is not None:
        raise EngineDirError(f"{out}: cannot write there ({parent} is not a writable directory)")


def check_passes(options: BuildOptions, target: Target) -> None:
    """Unknown --passes names, and fp8 without its quantization pass, refused before the model is loaded."""
    if not _pipeline_available():
        if options.passes:
            raise BackendUnavailable("--passes given, but the pass pipeline (passes/pipeline.py) is not available")
        if target.precision == "fp8":
            raise BackendUnavailable(f"precision fp8 needs the {FP8_PASS} pass (no pass pipeline)")
        return
    from dsv3_export.passes.pipeline import PASS_NAMES

    unknown = sorted(set(options.passes or ()) - set(PASS_NAMES))
    if unknown:
        raise ConfigError(f"--passes: unknown pass(es) {unknown}; available: {', '.join(PASS_NAMES)}")
    if target.precision == "fp8" and (FP8_PASS not in PASS_NAMES or (options.passes is not None
                                                                      and FP8_PASS not in options.passes)):
        raise BackendUnavailable(f"precision fp8 needs the {FP8_PASS} pass; available passes: {', '.join(PASS_NAMES)}")


def _drop_reference_caches(model: Transformer) -> int:
    """Free the reference model's own KV buffers before export; returns the bytes freed.

    They hold max_batch_size x max_seq_len positions per layer (33 GB for the 16b preset at batch
    64), which LatentCacheStep never reads: the engine's cache is an explicit input the runtime
    allocates. Without this they are traced into the program as constants and kept in memory
    through the whole build. The model cannot run its own forward afterwards; it is only exported.
    """
    from dsv3_export.reference.attention import MLA

    freed = 0
    for module in model.modules():
        if isinstance(module, MLA):
            for name in ("kv_cache", "pe_cache", "k_cache", "v_cache"):
                buf = module._buffers.get(name)
                if buf is not None:
                    freed += buf.numel() * buf.element_size()
                    module._buffers[name] = buf.new_empty(0)
    return freed


def _pipeline_available() -> bool:
    return importlib.util.find_spec("dsv3_export.passes.pipeline") is not None


def _run_passes(programs: dict, options: BuildOptions, target: Target, backend_name: str,
                report) -> tuple[dict, list[dict[str, Any]]]:
    """Run the pass pipeline on each program (the options vetted by check_passes); return the programs and the
    manifest's pass list."""
    if options.passes == () or not _pipeline_available():
        return programs, []
    from dsv3_export.passes.base import PassConfig
    from dsv3_export.passes.pipeline import run_pipeline

    # ONNX Runtime's CUDA MoE kernels are weight-only fp8: no activation quantization there.
    fp8_activations = not (backend_name == "onnxruntime" and target.device == "cuda")
    config = PassConfig(precision=target.precision, fp8_activations=fp8_activations)
    passes_run: list[dict[str, Any]] = []
    out = {}
    for kind, program in programs.items():
        report(f"{kind}: running passes")
        dump = options.dump_graphs / kind if options.dump_graphs else None
        out[kind], reports = run_pipeline(program, config, dump_dir=dump, verify_each_pass=options.verify_each_pass,
                                          passes=list(options.passes) if options.passes else None)
        for r in reports:
            passes_run.append({"program": kind, "name": r.name, "matches": r.matches,
                               "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
                               "seconds": round(r.seconds, 3)})
    return out, passes_run


def build_engine(options: BuildOptions, console: Console | None = None,
                 step_factory: type[LatentCacheStep] = LatentCacheStep) -> BuildSummary:
    """step_factory: the traced step module's class (default LatentCacheStep; `diff` passes a debug step)."""
    console = console or Console(stderr=True)
    if options.preset is not None and options.checkpoint is not None:
        raise ValueError("give only one of preset / checkpoint")
    target = Target(options.precision, options.device)
    backend = get_backend(options.backend)
    reason = backend.check_target(target)
    if reason:
        raise BackendUnavailable(f"backend {options.backend!r} cannot build {target.device}/{target.precision}: {reason}")
    if target.device == "cuda" and options.backend == "onnxruntime":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            console.print("[yellow]note:[/yellow] this onnxruntime has no CUDAExecutionProvider: the engine "
                          "builds here but runs only where onnxruntime-gpu is installed")
    # everything that can be refused from the options and the config alone, before weights are drawn or read
    check_out_dir(options.out)
    check_passes(options, target)
    shapes = export_shapes(options, _model_args(options), backend.program_kinds)
    phases = _Phases(console)
    dtype = compute_dtype(target)
    with phases.phase("load", f"model ({options.checkpoint or options.preset or 'tiny'}, {str(dtype)[6:]})"):
        model, source = _load_model(options, dtype)
        _drop_reference_caches(model)
    args = model.args
    with phases.phase("export", f"torch.export {', '.join(backend.program_kinds)}"), _quiet_libraries():
        programs = {kind: export_step(model, kind, step_factory, shapes[kind]) for kind in backend.program_kinds}
    del model  # the programs hold the weights they need; a pass that replaces some frees the old ones
    with phases.phase("passes", "passes") as report, _quiet_libraries():
        programs, passes_run = _run_passes(programs, options, target, options.backend, report)

    def fill(tmp: Path) -> Manifest:
        with phases.phase("backend", f"{options.backend} {target.device}/{target.precision}") as report, \
                _quiet_libraries():
            built = backend.build(programs, args, target, tmp, progress=report)
        return Manifest(
            model=args.to_dict(), backend=options.backend, precision=target.precision, device=target.device,
            inputs=[s.to_dict() for s in built.inputs], outputs=[s.to_dict() for s in built.outputs],
            kv_cache=kv_cache_layout(args, built.cache_dtype), passes=passes_run, lowerings=built.lowerings,
            op_histogram=built.op_histogram, source=source, compute_capability=_compute_capability(target),
            backend_info={**built.extra, "export_shapes": {kind: shape._asdict() for kind, shape in shapes.items()},
                          **({} if step_factory is LatentCacheStep else {"step": step_factory.__name__})})

    start = time.perf_counter()
    manifest = write_engine_dir(options.out, fill)  # fill shows its own phase; the rest is hashing
    phases.seconds["hash+write"] = round(time.perf_counter() - start - phases.seconds["backend"], 2)
    summary = BuildSummary(manifest=manifest, out=Path(options.out), seconds=phases.seconds)
    print_summary(summary, console)
    return summary


def export_shapes(options: BuildOptions, args: ModelArgs, kinds: Sequence[str]) -> dict[str, TuneShape]:
    """The sizes each program in `kinds` is exported (and tuned) at, checked before any export starts;
    sizes given for a program the backend does not build are checked too (a typo fails either way), the
    defaults of a program it does not build are not."""
    unknown = set(options.tune) - set(TUNE_FIELDS)
    if unknown:
        raise ValueError(f"tune sizes for unknown program kinds {sorted(unknown)}; kinds: {sorted(TUNE_FIELDS)}")
    if args.max_batch_size < 2:
        raise ConfigError(f"max_batch_size {args.max_batch_size}: engines take a dynamic batch, exported at 2 or more "
                          "rows (torch.export specializes a batch of 1); set --max-batch-size 2 or more")
    shapes = {}
    for kind in TUNE_FIELDS:
        if kind in kinds or kind in options.tune:
            try:
                shapes[kind] = tune_shape(args, kind, **options.tune.get(kind, {}))
            except ConfigError as e:
                raise ConfigError(f"{e} (set --tune-{kind}, or --max-seq-len / --max-batch-size)") from None
    return {kind: shapes[kind] for kind in kinds}


def _compute_capability(target: Target) -> str | None:
    if target.device != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def print_summary(summary: BuildSummary, console: Console, top_ops: int = 12) -> None:
    from rich.table import Table

    m = summary.manifest
    table = Table(title=f"engine {summary.out} ({m.backend} {m.device}/{m.precision})", show_header=False)
    passes: Sequence[dict] = m.passes
    table.add_row("passes", ", ".join(f"{p['name']}={p['matches']}" for p in passes) or "none (program as exported)")
    table.add_row("lowered ops", "; ".join(f"{k}: {v}" for k, v in m.lowerings.items()) or "none")
    table.add_row("payload ops", ", ".join(f"{k} {v}" for k, v in list(m.op_histogram.items())[:top_ops])
                  + (f" (+{len(m.op_histogram) - top_ops} more kinds)" if len(m.op_histogram) > top_ops else ""))
    table.add_row("files", ", ".join(f"{n} {human_bytes(e.size)}" for n, e in sorted(m.files.items())))
    table.add_row("time", ", ".join(f"{k} {v:.1f} s" for k, v in summary.seconds.items())
                  + f" (total {sum(summary.seconds.values()):.1f} s)")
    console.print(table)
