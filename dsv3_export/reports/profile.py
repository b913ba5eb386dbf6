"""`dsv3-export profile`: TTFT and per-token decode latency of engines, with raw samples.

    report = run_profile(ProfileOptions(engine_dirs=(Path("engine"),), out=Path("prof"),
                                        batches=(1, 8), prompt_lens=(128,), decode_steps=64))

What one timed run of a (batch, prompt length) configuration measures, as a user of
dsv3_export.runtime sees it: TTFT = the prefill step of [batch, prompt] random ids, its cache
write and the greedy argmax of the first token; then `decode_steps` decode steps (step + cache
write + argmax), each timed on its own (TPOT). Every step is synchronized (CUDA), so a sample is
wall time of that step alone. The cache is allocated before the clock starts. `warmup` untimed
runs come first (kernel loading, allocator growth, CUDA-graph capture). TTFT includes the head over
every prompt position: the step contract returns [b, s, V] logits (for 16b at b=64, s=1024 that is
13.7 TFLOP and 26.8 GB of fp32 logits), which a server computing only the last position skips.
Memory: CUDA: the device's used memory at its highest sampled point (torch's peak plus what
other allocators such as ONNX Runtime's arena hold: cudaMemGetInfo after each run), torch's own
peak, and the device's used memory just before the engine was loaded (the previous engine gone,
torch's cache emptied), so peak - baseline is this engine's; torch's cache is emptied before each
configuration too, or blocks cached by a larger earlier one would count (session 3's 16b report
counted 40 GiB of the bf16 engine's logits in the fp8 engine's rows that way). CPU: the process's
peak resident set size over the configuration (VmHWM, reset per configuration through
/proc/self/clear_refs where the kernel allows it).
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from dsv3_export.manifest import installed_versions
from dsv3_export.reports.diff import _device_name, engine_hash
from dsv3_export.runtime import Engine, load_engine
from dsv3_export.step import write_cache

SCHEMA = "dsv3-export/profile/2"


@dataclass(frozen=True)
class ProfileOptions:
    """Mirrors `dsv3-export profile`'s flags (ENGINE_DIR and --compare give engine_dirs)."""

    engine_dirs: tuple[Path, ...]
    out: Path
    batches: tuple[int, ...] = (1,)
    prompt_lens: tuple[int, ...] = (128,)
    decode_steps: int = 64
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    trace: bool = False


# --- the report, as dataclasses (schema.from_dict checks a report.json against them) ------------

@dataclass
class Stats:
    """Summary of `samples` (milliseconds)."""

    n: int
    min: float
    mean: float
    median: float
    p90: float
    p99: float
    samples: list[float]


@dataclass
class Memory:
    kind: str  # "cuda device used" | "cpu peak rss"
    peak_bytes: int
    torch_peak_bytes: int | None  # CUDA: torch.cuda.max_memory_allocated
    note: str
    baseline_bytes: int | None = None  # CUDA: device used before the engine was loaded


@dataclass
class ConfigResult:
    batch: int
    prompt_len: int
    decode_steps: int
    skipped: str | None  # why there are no numbers: a limit, or "failed: <error>" when a run raised
    ttft_ms: Stats | None
    tpot_ms: Stats | None
    decode_tokens_per_s: float | None  # batch / mean TPOT
    prefill_tokens_per_s: float | None  # batch * prompt_len / median TTFT
    memory: Memory | None


@dataclass
class OpTime:
    op: str
    calls: int
    total_ms: float
    share: float


@dataclass
class Trace:
    kind: str  # "onnxruntime profiling" | "torch.profiler"
    file: str  # trace file name in the report directory
    config: list[int]  # [batch, prompt_len] that was traced
    ops: list[OpTime]


@dataclass
class EngineProfile:
    label: str
    path: str
    hash: str
    backend: str
    device: str
    precision: str
    device_name: str
    cuda_graphs: bool
    cuda_graphs_note: str
    load_seconds: float
    results: list[ConfigResult]
    trace: Trace | None


@dataclass
class Settings:
    batches: list[int]
    prompt_lens: list[int]
    decode_steps: int
    warmup: int
    repeats: int
    seed: int


@dataclass
class ProfileReport:
    schema: str
    settings: Settings
    engines: list[EngineProfile]
    provenance: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- measuring -----------------------------------------------------------------------------------

def summarize(samples_ms: list[float]) -> Stats:
    a = np.asarray(samples_ms, dtype=np.float64)
    return Stats(n=int(a.size), min=float(a.min()), mean=float(a.mean()), median=float(np.median(a)),
                 p90=float(np.percentile(a, 90)), p99=float(np.percentile(a, 99)), samples=[float(x) for x in a])


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_run(engine: Engine, tokens: torch.Tensor, decode_steps: int, step=None) -> tuple[float, list[float]]:
    """One prefill + decode_steps decode steps; (TTFT ms, [TPOT ms per step])."""
    step = step or engine.step
    device = engine.device
    sync = _sync(device)
    b, s = tokens.shape
    cache = engine.new_cache(b, s + decode_steps)
    tokens = tokens.to(device)
    pos = torch.zeros(b, dtype=torch.int64, device=device)
    sync()
    t0 = time.perf_counter()
    logits, new_kv = step(tokens, pos, cache)
    write_cache(cache, new_kv, pos)
    token = logits[:, -1].argmax(-1)  # [b]
    sync()
    ttft = (time.perf_counter() - t0) * 1e3
    pos = pos + s
    tpot = []
    for _ in range(decode_steps):
        t0 = time.perf_counter()
        logits, new_kv = step(token[:, None], pos, cache)
        write_cache(cache, new_kv, pos)
        token = logits[:, 0].argmax(-1)
        sync()
        tpot.append((time.perf_counter() - t0) * 1e3)
        pos = pos + 1
    return ttft, tpot


class _MemoryMeter:
    """Peak memory over one configuration (see the module docstring for what is measured)."""

    def __init__(self, device: torch.device, baseline_bytes: int | None = None):
        self.device = device
        self.baseline_bytes = baseline_bytes
        self.peak_used = 0
        self.reset_ok = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # blocks an earlier configuration cached are not this one's
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak_used = 0
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset_ok = True
            except OSError:
                self.reset_ok = False

    def sample(self) -> None:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak_used = max(self.peak_used, total - free)

    def result(self) -> Memory:
        if self.device.type == "cuda":
            return Memory(kind="cuda device used", peak_bytes=int(self.peak_used),
                          torch_peak_bytes=int(torch.cuda.max_memory_allocated(self.device)),
                          note="cudaMemGetInfo after each run (all allocators, other processes included)",
                          baseline_bytes=self.baseline_bytes)
        status = Path("/proc/self/status")
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
        if match is None:
            import resource

            return Memory(kind="cpu peak rss", peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          torch_peak_bytes=None, note="ru_maxrss: process lifetime peak")
        note = "VmHWM since this configuration began" if self.reset_ok else "VmHWM: process lifetime peak"
        return Memory(kind="cpu peak rss", peak_bytes=int(match.group(1)) * 1024, torch_peak_bytes=None, note=note)


def cuda_graph_state(engine: Engine) -> tuple[bool, str]:
    """Whether decode steps replay CUDA graphs (the torch backend captures them on CUDA)."""
    step = engine.step
    if not getattr(step, "cuda_graph", False):
        how = "not used" if engine.device.type == "cuda" else "not applicable (CPU)"
        return False, f"{how}: {engine.manifest.backend} step runs kernels directly"
    graphs = getattr(step, "_graphs", None)
    if graphs is not None and getattr(graphs, "failed", False):
        return False, "capture failed; decode ran the package directly"
    note = "decode steps replay a captured CUDA graph per (batch, cache length)"
    edges = getattr(step, "pdl_edges", None)  # DSV3_TORCH_PDL: the last capture's programmatic edges
    return True, f"{note}; {edges}" if edges else note


def _skip_reason(engine: Engine, batch: int, prompt_len: int, decode_steps: int) -> str | None:
    a = engine.args
    if batch > a.max_batch_size:
        return f"batch {batch} > max_batch_size {a.max_batch_size}"
    if prompt_len + decode_steps > a.max_seq_len:
        return f"prompt {prompt_len} + {decode_steps} steps > max_seq_len {a.max_seq_len}"
    return None


def profile_config(engine: Engine, batch: int, prompt_len: int, options: ProfileOptions,
                   advance: Callable[[], None], baseline_bytes: int | None = None) -> ConfigResult:
    reason = _skip_reason(engine, batch, prompt_len, options.decode_steps)
    if reason:
        return ConfigResult(batch, prompt_len, options.decode_steps, reason, None, None, None, None, None)
    g = torch.Generator().manual_seed(options.seed)
    tokens = torch.randint(0, engine.args.vocab_size, (batch, prompt_len), generator=g)  # [b, P]
    meter = _MemoryMeter(engine.device, baseline_bytes)
    meter.start()
    with torch.no_grad():
        for _ in range(options.warmup):
            timed_run(engine, tokens, options.decode_steps)
            meter.sample()
            advance()
        ttfts, tpots = [], []
        for _ in range(options.repeats):
            ttft, tpot = timed_run(engine, tokens, options.decode_steps)
            meter.sample()
            ttfts.append(ttft)
            tpots += tpot
            advance()
    ttft_s, tpot_s = summarize(ttfts), summarize(tpots) if tpots else None
    return ConfigResult(
        batch=batch, prompt_len=prompt_len, decode_steps=options.decode_steps, skipped=None, ttft_ms=ttft_s,
        tpot_ms=tpot_s, decode_tokens_per_s=batch * 1e3 / tpot_s.mean if tpot_s else None,
        prefill_tokens_per_s=batch * prompt_len * 1e3 / ttft_s.median, memory=meter.result())


def _guarded_config(engine: Engine, label: str, batch: int, prompt_len: int, options: ProfileOptions,
                    advance: Callable[[], None], console: Console, baseline_bytes: int | None) -> ConfigResult:
    """profile_config, with a failure (out of memory, a provider error) recorded in the report
    instead of losing every configuration measured before it; the command then exits 1."""
    try:
        return profile_config(engine, batch, prompt_len, options, advance, baseline_bytes)
    except (RuntimeError, ValueError) as e:  # torch.OutOfMemoryError, onnxruntime's errors are RuntimeErrors
        message = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:400]}"
        console.print(f"[red]{label}: batch {batch}, prompt {prompt_len}: {message}[/red]")
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        return ConfigResult(batch, prompt_len, options.decode_steps, message, None, None, None, None, None)


def failed_configs(report: ProfileReport) -> list[str]:
    """'label batch b prompt p: reason' for every configuration whose runs raised."""
    return [f"{e.label} batch {r.batch} prompt {r.prompt_len}: {r.skipped}"
            for e in report.engines for r in e.results if r.skipped and r.skipped.startswith("failed:")]


def unmeasured_engines(report: ProfileReport) -> list[str]:
    """'label: why' for every engine whose configurations were all skipped (too long, too wide for
    it): an empty profile is not a success. Engines whose runs raised are failed_configs' to report."""
    out = []
    for e in report.engines:
        if any(not r.skipped for r in e.results):
            continue
        reasons = list(dict.fromkeys(r.skipped for r in e.results if not r.skipped.startswith("failed:")))
        if reasons:
            out.append(f"{e.label}: {'; '.join(reasons)}")
    return out


def device_used_before_load(engine_dir: Path) -> int | None:
    """CUDA engines: bytes in use on the device with nothing of ours cached (the previous engine is
    gone by now; its tensors left in torch's cache are released); None for CPU engines."""
    import gc

    from dsv3_export.manifest import verify_engine_dir

    if verify_engine_dir(engine_dir, check_hashes=False).device != "cuda" or not torch.cuda.is_available():
        return None
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return int(total - free)


def _labels(paths: tuple[Path, ...]) -> list[str]:
    names = [Path(p).absolute().name for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def run_profile(options: ProfileOptions, console: Console | None = None, trace_dir: Path | None = None) -> ProfileReport:
    """Profile every engine; trace files (with options.trace) are written into trace_dir."""
    console = console or Console(stderr=True)
    if not options.engine_dirs:
        raise ValueError("no engine to profile")
    for flag, values in (("--batch", options.batches), ("--prompt-len", options.prompt_lens)):
        if not values or any(v < 1 for v in values):
            raise ValueError(f"{flag}: give positive integers, got {list(values)}")
    if options.decode_steps < 1 or options.repeats < 1 or options.warmup < 0:
        raise ValueError("--decode-steps and --repeats must be >= 1, --warmup >= 0")
    from dsv3_export.manifest import verify_engine_dir

    for path in options.engine_dirs:  # all of them before any is profiled (load_engine checks the hashes later)
        verify_engine_dir(path, check_hashes=False)
    configs = [(b, p) for b in options.batches for p in options.prompt_lens]
    runs = len(options.engine_dirs) * len(configs) * (options.warmup + options.repeats)
    engines = []
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("profiling", total=runs)
        for label, path in zip(_labels(options.engine_dirs), options.engine_dirs):
            baseline = device_used_before_load(path)
            t0 = time.perf_counter()
            engine = load_engine(path)
            load_s = time.perf_counter() - t0
            results = []
            for b, p in configs:
                progress.update(task, description=f"{label}: batch {b}, prompt {p}")
                result = _guarded_config(engine, label, b, p, options, lambda: progress.advance(task), console,
                                         baseline)
                if result.skipped:
                    progress.advance(task, options.warmup + options.repeats)
                results.append(result)
            trace = None
            if options.trace:
                from dsv3_export.reports.trace import trace_engine

                runnable = [(r.batch, r.prompt_len) for r in results if not r.skipped]
                if runnable:
                    progress.update(task, description=f"{label}: tracing")
                    trace = trace_engine(engine, runnable[0], options, trace_dir or options.out, label)
            graphs, note = cuda_graph_state(engine)
            m = engine.manifest
            engines.append(EngineProfile(
                label=label, path=str(Path(path).absolute()), hash=engine_hash(path), backend=m.backend,
                device=m.device, precision=m.precision, device_name=_device_name(m.device), cuda_graphs=graphs,
                cuda_graphs_note=note, load_seconds=round(load_s, 3), results=results, trace=trace))
            del engine
    settings = Settings(list(options.batches), list(options.prompt_lens), options.decode_steps, options.warmup,
                        options.repeats, options.seed)
    provenance = {"versions": installed_versions(), "python": platform.python_version(),
                  "argv": sys.argv[1:], "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return ProfileReport(SCHEMA, settings, engines, provenance)


def write_profile_report(options: ProfileOptions, console: Console | None = None) -> tuple[ProfileReport, list[Path]]:
    """Run the profile and write report.json, report.md, profile.png (and traces) atomically to options.out."""
    from dsv3_export.reports.files import atomic_dir, dump_json
    from dsv3_export.reports.plots import profile_plot
    from dsv3_export.reports.render import render_profile

    with atomic_dir(options.out) as tmp:
        report = run_profile(options, console, trace_dir=tmp)
        d = report.to_dict()
        image = profile_plot(d, tmp / "profile.png")
        dump_json(d, tmp / "report.json")
        (tmp / "report.md").write_text(render_profile(d, [image.name]))
        names = sorted(p.name for p in tmp.iterdir())
    return report, [options.out / n for n in names]
