"""`profile --trace`: one run (prefill + decode steps) under the backend's own profiler, op by op.

ONNX Runtime: a second session over the same model.onnx with profiling on (a session cannot
turn it on later), wrapped in the backend's own step class, so the traced run is the engine's;
the trace is ONNX Runtime's profiling JSON (chrome://tracing format). torch: torch.profiler
around the step calls; the trace is its Chrome trace. The breakdown sums time per op type.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsv3_export.runtime import Engine

if TYPE_CHECKING:
    from dsv3_export.reports.profile import ProfileOptions, Trace

TOP_OPS = 25


def _breakdown(totals: dict[str, list[float]]) -> list:
    from dsv3_export.reports.profile import OpTime

    grand = sum(sum(v) for v in totals.values()) or 1.0
    ops = [OpTime(op=k, calls=len(v), total_ms=sum(v) / 1e3, share=sum(v) / grand) for k, v in totals.items()]
    return sorted(ops, key=lambda o: -o.total_ms)[:TOP_OPS]


def ort_op_times(trace_file: Path) -> dict[str, list[float]]:
    """op type -> kernel durations (us) from an ONNX Runtime profiling JSON."""
    totals: dict[str, list[float]] = defaultdict(list)
    for event in json.loads(Path(trace_file).read_text()):
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            totals[event.get("args", {}).get("op_name", "?")].append(float(event.get("dur", 0)))
    return totals


def _trace_ort(engine: Engine, tokens: torch.Tensor, options: "ProfileOptions", dest: Path) -> tuple[str, dict]:
    import onnxruntime as ort

    from dsv3_export.engines import onnx_graph, ort_session
    from dsv3_export.reports.profile import timed_run

    step = engine.step
    model_path = engine.path / onnx_graph.MODEL_FILE
    so = ort_session.session_options(engine.manifest.device, model_path)  # the engine's (CUDA: fp8 folded)
    so.enable_profiling = True
    so.profile_file_prefix = str(dest.with_suffix(""))
    provider_options = step.session.get_provider_options()
    providers = [(p, provider_options.get(p, {})) for p in step.session.get_providers()]
    session = ort.InferenceSession(str(model_path), so, providers=providers)
    traced = step.with_session(session)
    with torch.no_grad():
        timed_run(engine, tokens, options.decode_steps, step=traced)
    written = Path(session.end_profiling())
    shutil.move(str(written), dest)
    return "onnxruntime profiling", ort_op_times(dest)


def _trace_torch(engine: Engine, tokens: torch.Tensor, options: "ProfileOptions", dest: Path) -> tuple[str, dict]:
    from torch.profiler import ProfilerActivity, profile

    from dsv3_export.reports.profile import timed_run

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        timed_run(engine, tokens, options.decode_steps)
    prof.export_chrome_trace(str(dest))
    totals: dict[str, list[float]] = {}
    for evt in prof.key_averages():
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us > 0:
            totals[evt.key] = [us / evt.count] * evt.count
    return "torch.profiler", totals


def trace_engine(engine: Engine, config: tuple[int, int], options: "ProfileOptions", out_dir: Path,
                 label: str) -> "Trace":
    from dsv3_export.reports.profile import Trace

    batch, prompt_len = config
    g = torch.Generator().manual_seed(options.seed)
    tokens = torch.randint(0, engine.args.vocab_size, (batch, prompt_len), generator=g)  # [b, P]
    dest = Path(out_dir) / f"trace_{label}.json"
    backend = engine.manifest.backend
    if backend == "onnxruntime":
        kind, totals = _trace_ort(engine, tokens, options, dest)
    elif backend == "torch":
        kind, totals = _trace_torch(engine, tokens, options, dest)
    else:
        raise ValueError(f"--trace: no profiler hook for backend {backend!r}")
    return Trace(kind=kind, file=dest.name, config=[batch, prompt_len], ops=_breakdown(totals))
