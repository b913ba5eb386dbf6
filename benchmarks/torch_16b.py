"""The torch backend on the 16b preset (random weights) on one GPU: compile, then time it.

    python benchmarks/torch_16b.py [--precisions bf16,fp8] [--batches 1,8,64] [--prompt-len 1024]
                                   [--decode-steps 8] [--budget-s 540] [--out DIR]

Made for ONE device call (10-minute limit): every section checks the time left and is skipped
with a reason when it would not fit, and the JSON is rewritten after every section, so a call
killed at its limit still returns what was measured. Sections, per precision (bf16, fp8):

  floor        bandwidth floor of a decode step: weight bytes that a batch of b tokens must read
               (dense part + expected distinct routed experts + the KV cache) / measured copy
               bandwidth of this GPU
  engine       the torch engine built in memory exactly as engines/torch.py builds it (export ->
               passes -> dsv3 op lowering -> AOTInductor package per program), compile seconds;
               decode ms/token at each batch (CUDA graph replay, and the package run directly; the
               graph's replay alone too: the timed step less the host's work around the graph),
               prefill ms for prompt-len tokens at batch 1; max rel. error of decode logits vs
               the eager step; `Engine.generate` (the runtime's greedy loop) on this step, 16
               tokens, vs the reference model's own greedy loop (identical prefix length); the config
               Inductor's compile-time autotuner picked for each kernel (<kind>_autotune_choices, JSON
               only: what two builds of the same code may differ in)
  eager        the reference model in eager PyTorch (DeepSeek's MoE loop), same timings
  compile      torch.compile of the reference model (default mode), decode only, if it compiles
  engine-NAME  (--variant NAME:DSV3_TORCH_X=V,...) the same engine section for a variant of the build
               switches, lowered and compiled from the SAME exported and pass-rewritten programs (the
               switches act at lowering, DSV3_TORCH_PERSISTENT_NORMS at the AOTInductor compile): an A/B of
               a build choice in one run, without a second export (~2 minutes of the 16b's 6-7 minute build)
  kernels      (in the engine section, run after every build of the process is timed: a profiled
               process timed later builds slower) torch.profiler over a few decode steps of the package
               run directly, at each --profile-batches batch (default 1): GPU kernels per step, GPU-busy ms per step and the kernels that take
               the most time, to say where a step's time goes (a step far above its floor)
  PDL          (in the engine section, where the kernels wait: DSV3_TRITON_GDC, auto on sm_90+) the same build's
               decode graph with programmatic edges (engines/cuda_graph_pdl.py) per --pdl-ports port, then as
               captured (the control); batch-1 logits bit-compared with the graph as captured. The engine's
               own decode_ms_b* use the runtime's default (DSV3_TORCH_PDL: programmatic over the build's list)

Decode is timed at position prompt-len over a cache of random values (the step's cost does not
depend on them); ms/token = ms per decode step (one token per row). Prints a Markdown table on
stdout; writes torch_16b.json to --out (default $OUT or the current directory).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import re
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

from dsv3_export.checkpoint import preset_model
from dsv3_export.engines.cuda_graph_pdl import PORTS as PDL_PORTS, PdlPlan
from dsv3_export.engines.torch import (compile_package, decode_pdl, lower_program, package_info, pdl_note,
                                       pdl_waiting_kernels,
                                      program_constants)
from dsv3_export.engines.torch_inductor_pdl import InductorKernels
from dsv3_export.engines.torch_step import AOTIStep
from dsv3_export.engines.torch_router import ROUTER_ENV
from dsv3_export.engines.torch_triton import MOE_ALIGN_DEFAULT, MOE_ALIGN_ENV
from dsv3_export.export import TUNE_FIELDS, export_step, parse_tune_sizes, tune_shape
from dsv3_export.kernels.pdl import waiting_kernel_names
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.pipeline import PASS_NAMES, run_pipeline
from dsv3_export.reports.reference import reference_generate
from dsv3_export.runtime import Engine
from dsv3_export.step import step_writing_cache
from dsv3_export.step import LatentCacheStep

from _floor import decode_step_bytes  # noqa: E402 - sibling module of this script
from _report import Report, log  # noqa: E402 - sibling module of this script

DEVICE = "cuda"  # --device cpu: a smoke run of this script's code on the tiny preset (no GPU numbers)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_ms(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() (synchronized around each call)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """bytes/s of a 4 GiB device-to-device copy (read + write counted)."""
    x = torch.empty(2**31 if DEVICE == "cuda" else 2**26, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    ms = cuda_ms(lambda: y.copy_(x), iters=5)
    x_bytes = x.numel()
    x = y = None  # frees them (the timed lambda closes over both: no del)
    return 2 * x_bytes / (ms / 1e3)


def floor_ms(model, batch: int, context: int, bandwidth: float) -> float:
    """Milliseconds to read what a decode step must read (benchmarks/_floor.py) at `bandwidth`."""
    return decode_step_bytes(model, batch, context) / bandwidth * 1e3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


SKIP_PASSES: set[str] = set()  # --skip-passes: an A/B of one pass against the same build without it
# --tune-decode / --tune-prefill: the sizes each program is exported with (dsv3_export.export.tune_shape),
# which AOTInductor's compile-time autotuning runs every kernel at
TUNE: dict[str, dict[str, int]] = {}
PROFILE_BATCHES: list[int] = []  # --profile-batches: the batches of the per-kernel profile and graph timeline
# Inductor's compile-time autotuner logs each kernel's winner here (DEBUG): "Best config for <kernel>: <config>: <ms>,
# nreg <n>, nspill <n>, #shared-mem <bytes>"
AUTOTUNE_LOGGER = "torch._inductor.runtime.triton_heuristics"


@contextlib.contextmanager
def autotune_choices():
    """The configs Inductor's autotuner picks while a package compiles, one dict per kernel it tuned: what
    differs between two builds of the same code (session 10: `_rmsnorm_kernel` 2.8 vs 10.9 us per call).
    Kernels whose choice came from Inductor's on-disk autotune cache are not tuned again and not listed."""
    found: list[dict[str, Any]] = []

    logger = logging.getLogger(AUTOTUNE_LOGGER)

    class Winners(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if str(record.msg).startswith("Best config for") and len(record.args or ()) == 6:
                name, config, ms, nreg, nspill, shared = record.args
                found.append({"kernel": str(name), "config": str(config), "ms": round(float(ms), 5),
                              "nreg": nreg, "nspill": nspill, "shared": shared})
            if record.levelno >= saved[0] and logger.parent is not None:  # what the logger let through before
                logger.parent.handle(record)

    handler = Winners(logging.DEBUG)
    saved = (logger.getEffectiveLevel(), logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # its DEBUG records stop here; the rest are handed on by Winners
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def build_engine_in_memory(model, precision: str, kinds: tuple[str, ...], workdir: Path,
                           report: dict[str, Any], programs: dict[str, Any] | None = None) -> AOTIStep:
    """What TorchBackend.build + load do, without writing 31 GB of weights to disk and hashing them.
    programs: kind -> the exported, pass-rewritten program, filled on first use and reused by later
    calls (the --variant builds; lowering never modifies its input program)."""
    info = package_info(DEVICE, log)  # the C++ compiler checked first (engines/torch_cxx.py)
    config = PassConfig(precision=precision, fp8_activations=True)
    weights: dict[str, torch.Tensor] = {}
    packages = {}
    programs = {} if programs is None else programs
    inductor = InductorKernels()  # Inductor's kernels that wait first (the manifest's pdl_waiting_kernels)
    for kind in kinds:
        if kind not in programs:
            t = time.perf_counter()
            shape = tune_shape(model.args, kind, **TUNE.get(kind, {}))
            report[f"{kind}_tune_shape"] = shape._asdict()
            ep = export_step(model, kind, shape=shape)
            report[f"{kind}_export_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            ep, reports = run_pipeline(ep, config, passes=[n for n in PASS_NAMES if n not in SKIP_PASSES])
            report[f"{kind}_passes"] = {r.name: r.matches for r in reports}
            report[f"{kind}_passes_s"] = round(time.perf_counter() - t, 1)
            programs[kind] = ep
        else:
            report[f"{kind}_export_s"] = report[f"{kind}_passes_s"] = "shared with the first build"
        ep, how = lower_program(programs[kind], DEVICE, kind)
        report["lowerings"] = how
        t = time.perf_counter()
        promoted: dict[str, int] = {}
        with autotune_choices() as choices:
            packages[kind] = compile_package(ep, kind, workdir / f"{kind}.pt2", info, promoted=promoted,
                                             inductor=inductor)  # decode packages only record (inductor_configs)
        report[f"{kind}_aoti_compile_s"] = round(time.perf_counter() - t, 1)
        report[f"{kind}_autotune_choices"] = choices
        # kernels DSV3_TORCH_PERSISTENT_NORMS=1 made persistent that Inductor would loop (None: switch off, or CPU)
        report[f"{kind}_persistent_norms"] = promoted.get(kind)
        log(f"compiled {kind} in {report[f'{kind}_aoti_compile_s']} s")
        for fqn, tensor in program_constants(ep).items():
            weights.setdefault(fqn, tensor)
        del ep
    gc.collect()
    prefill = packages.get("prefill", packages["decode"])
    # the decode graphs' edges as the runtime would make them from this build's manifest (DSV3_TORCH_PDL)
    waiting = pdl_waiting_kernels(DEVICE, inductor)
    report["pdl_waiting_kernels"] = waiting
    if inductor.definitions:  # DSV3_TORCH_INDUCTOR_PDL: the decode package's kernels left ordinary edges, and why
        report["pdl_inductor_refused"] = inductor.refused()
    if DEVICE == "cuda":
        report["lowerings"] = {**report["lowerings"], "pdl": pdl_note(inductor)}
    pdl = decode_pdl({"pdl_waiting_kernels": waiting}) if DEVICE == "cuda" else None
    return AOTIStep.from_packages({"prefill": prefill, "decode": packages["decode"]}, weights,
                                  torch.device(DEVICE), model.dtype, cuda_graph=DEVICE == "cuda", pdl=pdl)


def decode_inputs(model, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's (tokens [b, 1], start_pos [b], cache [b, L, context + 1, w]): random tokens and
    cache, every row at position `context`; the timed, profiled and PDL-checked steps all read these."""
    a = model.args
    cache = torch.randn(batch, a.n_layers, context + 1, a.latent_cache_width,
                        device=DEVICE).to(model.dtype)  # [b, L, T, w]
    tokens = torch.randint(0, a.vocab_size, (batch, 1), device=DEVICE)
    pos = torch.full((batch,), context, dtype=torch.int64, device=DEVICE)
    return tokens, pos, cache


def time_step_decode(step: Callable, model, batch: int, context: int, iters: int) -> float:
    tokens, pos, cache = decode_inputs(model, batch, context)

    def one():  # what each token of generate runs (dsv3_export/runtime.py _decode)
        step_writing_cache(step, tokens, pos, cache)

    ms = cuda_ms(one, iters)
    cache = None  # frees it (closures read it: no del)
    return ms


def time_graph_replay(step: AOTIStep, model, batch: int, context: int, iters: int) -> float:
    """Milliseconds of the captured decode graph's replay alone (synchronized per replay): the timed step less the
    host's work around the graph (its input copies, the logits' clone, the Python between them). Why: the
    timed batch-1 step exceeded the graph timeline's span by 5-99 us in session 21's builds. The graph replayed is
    the timed step's: the decode step with its cache write (step_writing_cache)."""
    tokens, pos, cache = decode_inputs(model, batch, context)
    step.step_writing_cache(tokens, pos, cache)  # captures this batch's graph (or reuses it)
    if step._graphs.failed:  # the capture failed just now: the LRU's last entry is another batch's graph
        raise RuntimeError("the decode graph's capture failed; no graph of this batch to replay")
    graph = next(reversed(step._graphs.graphs.values()))["graph"]  # the entry just used is the last
    ms = cuda_ms(graph.replay, iters)
    cache = None  # frees it (the graph holds its own reference)
    return ms


@contextlib.contextmanager
def switched_env(env: dict[str, str]):
    """The build switches of one --variant set while its programs are lowered and compiled, restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME:DSV3_TORCH_A=1,DSV3_TORCH_B=0 -> (NAME, {switch: value})."""
    name, _, spec = text.partition(":")
    env = dict(item.partition("=")[::2] for item in filter(None, spec.split(",")))
    if not name.isidentifier() or not env or any(not k.startswith("DSV3_TORCH_") or not v for k, v in env.items()):
        raise ValueError(f"--variant {text!r}: expected NAME:DSV3_TORCH_<SWITCH>=VALUE[,...] (NAME a word)")
    return name, env


OURS_SUFFIX = "-ours"


def port_plan(port: str, waiting: list[str]) -> PdlPlan | None:
    """--pdl-ports' PORT: programmatic edges from PORT into every kernel of `waiting` (the build's list);
    PORT-ours: into our kernels only (kernels/pdl.py's), not Inductor's, so that one build built with
    DSV3_TORCH_INDUCTOR_PDL times both lists (with ordinary edges into them Inductor's waits return at once);
    "0": the graph as captured."""
    if port == "0":
        return None
    if port.endswith(OURS_SUFFIX):
        ours = waiting_kernel_names()
        return PdlPlan(port[:-len(OURS_SUFFIX)], frozenset(w for w in waiting if w in ours))
    return PdlPlan(port, frozenset(waiting))


def pdl_timings(step: AOTIStep, model, batches, context: int, iters: int, ports: list[str],
                waiting: list[str]) -> dict[str, Any]:
    """The same build's decode graph with programmatic edges (engines/cuda_graph_pdl.py) over `waiting` (the
    build's manifest record), per port, then as captured (the control): ms per step, the edit's counts, and
    whether batch-1 logits are bit-identical to the graph as captured. The step keeps its own plan after.
    Each plan is timed twice, in the order ports, control, control, reversed ports, and the mean reported (both
    readings under `_runs`): on the H200 (session 27) one plan timed first and again later in one process read
    1.724 then 1.783 ms, a drift as large as the differences between plans; the mirrored order spreads it evenly."""
    if not waiting_kernel_names():
        return {"pdl": "skipped: kernels compiled without griddepcontrol.wait (DSV3_TRITON_GDC: auto on an sm_90+ "
                       "GPU, or 1)"}
    tokens, pos, cache = decode_inputs(model, 1, context)
    default = step.pdl
    out: dict[str, Any] = {}
    try:  # the step's own plan back even when a port fails: generate and the graph timeline use the step after
        step.set_decode_pdl(None)
        # the graph the timed step replays (with the cache write): every call writes the same row at the same position
        want = step_writing_cache(step, tokens, pos, cache).clone()
        order = [*ports, "0"]
        runs: dict[str, list] = {}
        for port in order + order[::-1]:
            key = f"pdl_{port.replace('-', '_')}" if port != "0" else "pdl_control"
            step.set_decode_pdl(port_plan(port, waiting))
            if f"{key}_edges" not in out:  # first visit: the numbers of the graph this plan makes
                for _ in range(3):  # captured, then replayed
                    got = step_writing_cache(step, tokens, pos, cache)
                out[f"{key}_logits_identical"] = bool(torch.equal(got, want))
                out[f"{key}_edges"] = str(step.pdl_edges) if step.pdl_edges else "as captured"
            for b in batches:
                runs.setdefault(f"decode_ms_b{b}_{key}", []).append(
                    cuda_ms_safe(lambda: time_step_decode(step, model, b, context, iters)))
        for name, readings in runs.items():
            timed = [r for r in readings if isinstance(r, float)]
            out[name] = round(sum(timed) / len(timed), 3) if len(timed) == len(readings) else readings[-1]
            out[f"{name}_runs"] = readings
    finally:
        step.set_decode_pdl(default)
    return out


def rel_err_vs_eager(step, model, tokens, pos, cache) -> float:
    """The engine's logits against the eager step's on the same inputs (the eager step runs first, as before)."""
    want, _ = LatentCacheStep(model).eval()(tokens, pos, cache)
    got, _ = step(tokens, pos, cache)
    return rel_err(got, want)


def decode_rel_err(step, model, bsz: int, prompt_len: int) -> float:
    """The engine's decode logits against the eager step's at batch bsz, over a random cache and positions."""
    a = model.args
    cache = torch.randn(bsz, a.n_layers, prompt_len, a.latent_cache_width, device=DEVICE).to(model.dtype)
    tokens = torch.randint(0, a.vocab_size, (bsz, 1), device=DEVICE)
    pos = torch.randint(0, prompt_len, (bsz,), device=DEVICE)
    return rel_err_vs_eager(step, model, tokens, pos, cache)


def engine_section(model, precision, batches, prompt_len, steps, workdir, kinds,
                   env: dict[str, str] | None = None, programs: dict[str, Any] | None = None,
                   profiles: list | None = None, pdl_ports: list[str] | None = None) -> dict[str, Any]:
    """Build, check and time one engine. profiles: where to leave the engine's torch.profiler runs (a
    function returning their results), to be run after every build of the process is timed (None: none).
    Why deferred: on the H200 (session 9) every in-process build timed after a profiled one was slower
    with the same GPU work (4 layers, batch 1, CUDA graph: 0.65-0.71 ms against 0.54; the same builds
    unprofiled: 0.55-0.61, the defaults built again last 0.56 = first 0.56)."""
    out: dict[str, Any] = {"build_env": dict(env or {})} if env else {}
    with switched_env(env or {}):
        step = build_engine_in_memory(model, precision, kinds, workdir, out, programs)
    a = model.args
    with torch.no_grad():  # decode numerics vs the eager step at batch 2
        cache = torch.randn(2, a.n_layers, prompt_len, a.latent_cache_width, device=DEVICE).to(model.dtype)
        tokens = torch.randint(0, a.vocab_size, (2, 1), device=DEVICE)
        pos = torch.tensor([prompt_len - 1, prompt_len // 2], device=DEVICE)
        out["decode_logits_rel_err_vs_eager_step"] = rel_err_vs_eager(step, model, tokens, pos, cache)
        # batch 1 apart: the decode program's one-row forms (the GEMVs, merge_uv, DSV3_TORCH_MOE_ONE_LAUNCH's MoE)
        # launch only there
        out["decode_logits_rel_err_vs_eager_step_b1"] = rel_err_vs_eager(
            step, model, tokens[:1].contiguous(), pos[:1].contiguous(), cache[:1].contiguous())
        if "prefill" in kinds:  # 64 new tokens (fewer on a short smoke run) after 1 cached one, batch 2
            tokens = torch.randint(0, a.vocab_size, (2, min(64, prompt_len - 1)), device=DEVICE)
            pos = torch.tensor([1, 0], device=DEVICE)
            out["prefill_logits_rel_err_vs_eager_step"] = rel_err_vs_eager(step, model, tokens, pos, cache)
        del cache
        for big in sorted(b for b in set(batches) if b > 2):  # each timed batch above the GEMVs' apart: its kernels
            # may differ (kernels/fp8_gemm_decode.py: a swapped tile up to 16 rows, a direct one above)
            out[f"decode_logits_rel_err_vs_eager_step_b{big}"] = decode_rel_err(step, model, big, prompt_len)
    if "prefill" in kinds:  # the prompt needs the prefill program
        out.update(generate_check(step, model))
    direct = AOTIStep(step._prefill, step._decode, step.device, step.cache_dtype, cuda_graph=False)
    for b in batches:
        out[f"decode_ms_b{b}"] = cuda_ms_safe(lambda: time_step_decode(step, model, b, prompt_len, steps))
        out[f"decode_ms_b{b}_no_graph"] = cuda_ms_safe(lambda: time_step_decode(direct, model, b, prompt_len, steps))
        if step._graphs is not None and not step._graphs.failed:
            out[f"decode_ms_b{b}_replay"] = cuda_ms_safe(lambda: time_graph_replay(step, model, b, prompt_len, steps))
    if DEVICE == "cuda" and pdl_ports:
        out.update(guarded_dict(lambda: pdl_timings(step, model, batches, prompt_len, steps, pdl_ports,
                                                    out.get("pdl_waiting_kernels") or [])))
    if "prefill" in kinds:
        tokens = torch.randint(0, a.vocab_size, (1, prompt_len), device=DEVICE)
        cache = torch.zeros(1, a.n_layers, prompt_len, a.latent_cache_width, device=DEVICE,
                            dtype=model.dtype)
        start = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        out["prefill_ms_b1"] = cuda_ms(lambda: step(tokens, start, cache), iters=3, warmup=1)
    out["decode_uses_cuda_graph"] = step._graphs is not None and not step._graphs.failed
    out["generate_ms_per_token"] = guarded_dict(lambda: generate_ms_per_token(step, model, 1))
    if profiles is not None:  # holds this engine until they run (memory: its packages and CUDA graphs)
        profiles.append(lambda: {key: value for b in PROFILE_BATCHES or [1] for key, value in (
            (f"decode_b{b}_kernels", guarded_dict(lambda: decode_kernel_profile(direct, model, prompt_len, b))),
            (f"decode_b{b}_graph_timeline", guarded_dict(lambda: decode_graph_timeline(step, model, prompt_len, b))))})
    return out


def decode_kernel_profile(step: Callable, model, context: int, batch: int = 1, steps: int = 4,
                          top: int = 60) -> dict[str, Any]:
    """Per-kernel GPU time of decode steps at `batch` (torch.profiler; CPU ops on a CPU smoke run)."""
    from torch.profiler import ProfilerActivity, profile

    tokens, pos, cache = decode_inputs(model, batch, context)
    step(tokens, pos, cache)  # warm
    sync()
    gpu = DEVICE == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        for _ in range(steps):
            step(tokens, pos, cache)
        sync()
    rows = []
    for evt in prof.key_averages():
        us = evt.self_device_time_total if gpu else evt.self_cpu_time_total
        if us > 0 and (not gpu or evt.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((us / steps, evt.count / steps, evt.key))
    rows.sort(reverse=True)
    host = []  # on the GPU also the host side: runtime API calls and ops by self CPU time (a sync, a
    for evt in prof.key_averages() if gpu else []:  # Python fallback or an allocation per layer shows here)
        if evt.device_type == torch.autograd.DeviceType.CPU and evt.self_cpu_time_total > 0:
            host.append((evt.self_cpu_time_total / steps, evt.count / steps, evt.key))
    host.sort(reverse=True)
    return {"steps": steps, "what": "GPU kernels" if gpu else "CPU ops (smoke run)",
            "host_top": [{"us_per_step": round(us, 1), "calls_per_step": round(n, 2), "name": name[:120]}
                         for us, n, name in host[:15]],
            "launches_per_step": round(sum(r[1] for r in rows), 1),
            "busy_ms_per_step": round(sum(r[0] for r in rows) / 1e3, 3),
            "top": [{"us_per_step": round(us, 1), "calls_per_step": round(n, 2), "name": name[:160]}
                    for us, n, name in rows[:top]]}


def kernel_gaps(kernels: list[tuple[str, float, float]], steps: int, top: int = 12) -> dict[str, Any]:
    """Where a replayed decode step's time goes between its kernels: kernels are (name, start_us, end_us)
    of `steps` equal steps in time order (one stream). Why: the CUDA-graph step took 0.43-0.70 ms more
    than its kernels' summed time (session 8); spread evenly over ~700 launches that is the graph's
    launch gap, in a few places it is something else (a memset node, a cuBLAS workspace, a host wait)."""
    kernels = sorted(kernels, key=lambda k: k[1])
    if steps < 1 or not kernels or len(kernels) % steps:
        raise ValueError(f"kernel_gaps: {len(kernels)} kernels do not split into {steps} equal steps")
    per = len(kernels) // steps
    spans, busy, gaps = [], [], []  # gaps: (us, previous kernel, next kernel)
    for s in range(steps):
        run = kernels[s * per:(s + 1) * per]
        spans.append(max(k[2] for k in run) - run[0][1])
        busy.append(sum(k[2] - k[1] for k in run))
        gaps += [(max(0.0, b[1] - a[2]), a[0], b[0]) for a, b in zip(run, run[1:])]
    values = sorted(g[0] for g in gaps)
    by_next: dict[str, list[float]] = {}
    for us, _, nxt in gaps:
        by_next.setdefault(nxt[:80], []).append(us)
    worst_next = sorted(by_next.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"kernels_per_step": per, "span_us": round(sum(spans) / steps, 1), "busy_us": round(sum(busy) / steps, 1),
            "idle_us": round(sum(values) / steps, 1),
            "gap_us_median": round(values[len(values) // 2], 2) if values else 0.0,
            "gap_us_p90": round(values[int(len(values) * 0.9)], 2) if values else 0.0,
            "gap_us_max": round(values[-1], 2) if values else 0.0,
            "gaps_over_5us_per_step": round(sum(v > 5 for v in values) / steps, 1),
            "idle_us_in_gaps_over_5us": round(sum(v for v in values if v > 5) / steps, 1),
            "idle_before": [{"next": name, "us_per_step": round(sum(v) / steps, 1), "gaps_per_step": len(v) // steps,
                             "max_us": round(max(v), 2)} for name, v in worst_next],
            "longest": [{"us": round(us, 2), "after": a[:80], "before": b[:80]}
                        for us, a, b in sorted(gaps, reverse=True)[:top]]}


def decode_graph_timeline(step: Callable, model, context: int, batch: int = 1, steps: int = 3) -> dict[str, Any]:
    """kernel_gaps of decode steps at `batch` replayed from the CUDA graph (torch.profiler's device events:
    kernels, memsets and copies; CUPTI records a graph's kernels one by one)."""
    from torch.profiler import ProfilerActivity, profile

    if DEVICE != "cuda":
        return {"skipped": "no GPU (the timeline is of CUDA-graph replays)"}
    tokens, pos, cache = decode_inputs(model, batch, context)
    for _ in range(2):  # captured and warm
        step_writing_cache(step, tokens, pos, cache)
    sync()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step_writing_cache(step, tokens, pos, cache)  # generate's token: the graph holds the cache write
            sync()
    device = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA]
    return kernel_gaps(device, steps)


def guarded_dict(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the timings above
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def generate_check(step: AOTIStep, model, new_tokens: int = 16) -> dict[str, Any]:
    """Engine.generate, the runtime's prefill + greedy decode loop, driven by the in-memory step
    (an Engine's generate needs only the model args and the step), against the reference model's
    own greedy loop on the same weights. bf16 rounding differs between the two, so a near-tie can
    make them part ways: the identical prefix is reported, not required."""
    engine = Engine(manifest=types.SimpleNamespace(model=model.args.to_dict()), step=step, path=Path("."))
    prompt = [t % model.args.vocab_size for t in (17, 402, 9, 881, 5, 1234, 77, 3)]
    t = time.perf_counter()
    got = engine.generate(prompt, new_tokens)
    sync()
    generate_s = time.perf_counter() - t
    with torch.no_grad():
        want = reference_generate(model, [prompt], new_tokens)[0]
    same = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), new_tokens)
    return {"generate_tokens": got, "generate_s": round(generate_s, 3),
            "generate_identical_prefix_vs_reference": same, "generate_new_tokens": new_tokens}


def _captures(step: AOTIStep) -> int:
    """Decode graphs the step has captured so far (-1 without graphs)."""
    return step._graphs.captures if step._graphs is not None else -1


def generate_ms_per_token(step: AOTIStep, model, batch: int, new_tokens: int = 64) -> dict[str, Any]:
    """Engine.generate's greedy loop per token (one-token prompts: the decode program alone serves),
    with the next step queued before the host reads each token (the runtime's default) and one step
    at a time (queue_ahead=False, the loop before session 9): what a caller of generate sees per token,
    host reads and launches included, against the timing loop's back-to-back steps."""
    out = {}
    new_tokens = min(new_tokens, model.args.max_seq_len - 1)  # the one-token prompt + the new tokens fit
    for name, ahead in (("queued", True), ("one_at_a_time", False)):
        engine = Engine(manifest=types.SimpleNamespace(model=model.args.to_dict()), step=step, path=Path("."),
                        queue_ahead=ahead)
        prompts = [[(17 + 31 * row) % model.args.vocab_size] for row in range(batch)]
        engine.generate(prompts, 4)  # warm (graph captured)
        sync()
        captured = _captures(step)
        t = time.perf_counter()
        engine.generate(prompts, new_tokens)
        sync()
        out[f"b{batch}_{name}"] = round((time.perf_counter() - t) * 1e3 / new_tokens, 3)
        # graphs captured inside the timed call: 0 since session 22 (generate keeps its cache buffer, so the warm
        # call's graph replays; before, each call's new cache was captured again inside the timing)
        out[f"b{batch}_{name}_graph_captures"] = _captures(step) - captured
    return out


def cuda_ms_safe(fn: Callable[[], float]) -> float | str:
    try:
        return round(fn(), 3)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at batch 64: keep the other batches
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        return f"error: {type(e).__name__}: {str(e)[:300]}"


@torch.no_grad()
def eager_section(model, batches, prompt_len, steps, compiled: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    run = torch.compile(model, dynamic=False) if compiled else model
    a = model.args
    for b in batches:
        tokens = torch.randint(0, a.vocab_size, (b, 1), device=DEVICE)
        out[f"decode_ms_b{b}"] = cuda_ms_safe(lambda: cuda_ms(lambda: run(tokens, prompt_len), iters=steps))
    if not compiled:
        prompt = torch.randint(0, a.vocab_size, (1, prompt_len), device=DEVICE)
        out["prefill_ms_b1"] = cuda_ms(lambda: run(prompt, 0), iters=3, warmup=1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="default: 16b on cuda, tiny on cpu")
    p.add_argument("--precisions", default="bf16,fp8")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--profile-batches", default="1",
                   help="comma-separated batches of the per-kernel profile and CUDA-graph timeline (default 1)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting sections after this")
    p.add_argument("--engine-kinds", default="decode,prefill", help="programs to compile (decode first)")
    p.add_argument("--engine-need-s", type=float, default=240.0,
                   help="start the engine section only with this many seconds of budget left")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: engine,eager,compile,profile (the "
                                                         "engines' torch.profiler runs)")
    p.add_argument("--n-layers", type=int, default=None,
                   help="override the preset's layer count (a profile of the per-layer kernels at a fraction "
                        "of the build time; the floor follows the same layer count)")
    p.add_argument("--moe-align", choices=("aten", "kernel", "single"), default=None,
                   help="how the MoE alignment is traced into the package (sets DSV3_TORCH_MOE_ALIGN)")
    p.add_argument("--skip-passes", default="", help=f"comma-separated passes left out of the pipeline: {PASS_NAMES}")
    p.add_argument("--router", choices=("0", "1"), default=None,
                   help="the softmax MoE router as one kernel (sets DSV3_TORCH_ROUTER)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a DSV3_TORCH_* build switch to set (repeatable), e.g. DSV3_TORCH_ABSORB_GEMM=0")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:DSV3_TORCH_X=V[,...]",
                   help="also build and time the engine with these switches (repeatable), from the same "
                        "exported programs: results under engine-NAME")
    p.add_argument("--pdl-ports", default="launch,programmatic",
                   help="decode graphs also timed with programmatic edges from these ports, then as captured ('' "
                        "for none; PORT-ours: into our kernels only, not Inductor's); needs kernels compiled with the "
                        "wait (DSV3_TRITON_GDC, auto on sm_90+)")
    for kind, fields in TUNE_FIELDS.items():
        p.add_argument(f"--tune-{kind}", default=None, metavar=",".join(f.upper() for f in fields),
                       help=f"the {kind} program's example sizes, at which AOTInductor tunes its kernels "
                            "(default: dsv3_export.export.default_tune_shape)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke-test the script (tiny preset)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    opts = p.parse_args(argv)
    # every usage error before anything is changed (the environment, this module's globals)
    env_items = [item.partition("=") for item in opts.env]
    for item, (name, sep, _) in zip(opts.env, env_items):
        if not sep or not name.startswith("DSV3_TORCH_"):
            p.error(f"--env {item!r}: expected DSV3_TORCH_<SWITCH>=VALUE")
    try:
        variants = [parse_variant(v) for v in opts.variant]
    except ValueError as e:
        p.error(str(e))
    skip_passes = set(filter(None, opts.skip_passes.split(",")))
    if skip_passes - set(PASS_NAMES):
        p.error(f"--skip-passes: unknown {sorted(skip_passes - set(PASS_NAMES))}; passes: {PASS_NAMES}")
    try:
        profile_batches = [int(b) for b in opts.profile_batches.split(",")]
    except ValueError:
        profile_batches = []
    if not profile_batches or min(profile_batches) < 1:
        p.error(f"--profile-batches {opts.profile_batches!r}: expected positive integers, e.g. 1,8")
    tune: dict[str, dict[str, int]] = {}
    for kind in TUNE_FIELDS:
        value = getattr(opts, f"tune_{kind}")
        if value:
            try:
                tune[kind] = parse_tune_sizes(kind, value)
            except ValueError as e:
                p.error(f"--tune-{kind} {e}")
    global DEVICE
    DEVICE = opts.device
    opts.preset = opts.preset or ("16b" if DEVICE == "cuda" else "tiny")  # 16b on this CPU: out of memory
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("torch_16b: needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 1
    batches = [int(b) for b in opts.batches.split(",")]
    overrides = {"n_layers": opts.n_layers} if opts.n_layers else {}
    if opts.moe_align:
        os.environ[MOE_ALIGN_ENV] = opts.moe_align
    if opts.router:
        os.environ[ROUTER_ENV] = opts.router
    for name, _, value in env_items:
        os.environ[name] = value
    SKIP_PASSES.update(skip_passes)
    TUNE.update(tune)
    PROFILE_BATCHES[:] = profile_batches
    for port in filter(None, opts.pdl_ports.split(",")):
        if port.removesuffix(OURS_SUFFIX) not in PDL_PORTS:
            p.error(f"--pdl-ports {port!r}: expected a port of {sorted(PDL_PORTS)}, optionally with {OURS_SUFFIX!r}")
    skip = set(filter(None, opts.skip.split(",")))
    meta = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)", "torch": torch.__version__, "preset": opts.preset,
            "batches": batches, "prompt_len": opts.prompt_len, "decode_steps": opts.decode_steps,
            "n_layers_override": opts.n_layers, "moe_align": os.environ.get(MOE_ALIGN_ENV, MOE_ALIGN_DEFAULT),
            "router": os.environ.get(ROUTER_ENV, "1"),
            "skip_passes": sorted(SKIP_PASSES), "tune": TUNE,
            "build_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DSV3_TORCH_")},
            "variants": {name: env for name, env in variants},
            "note": "max_seq_len set to 2 * prompt_len (YaRN off) to keep the reference caches small"}
    report = Report(opts.out / "torch_16b.json", opts.budget_s, meta)
    bandwidth = copy_bandwidth()
    report.data["meta"]["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    for precision in opts.precisions.split(","):
        if report.left() < 60:
            report.put(precision, "all", {"skipped": "no time left"})
            continue
        model = preset_model(opts.preset, torch.bfloat16, DEVICE, seed=0, weight_dtype=precision,
                             max_batch_size=max(batches), max_seq_len=2 * opts.prompt_len, **overrides)
        report.put(precision, "floor", {f"decode_ms_b{b}": round(floor_ms(model, b, opts.prompt_len, bandwidth), 3)
                                        for b in batches})
        # eager first: a native crash in the engine section (a segfault is no exception) keeps its numbers
        if "eager" not in skip:
            report.section(precision, "eager", 30, lambda: eager_section(model, batches, opts.prompt_len,
                                                                          max(2, opts.decode_steps // 2), False))
        programs: dict[str, Any] = {}  # exported + passes once, lowered per variant
        deferred: list[tuple[str, list]] = []  # (section, its profile runs): after every build is timed
        for name, env in ([("", {})] + variants) if "engine" not in skip else []:
            section, profiles = f"engine-{name}" if name else "engine", [] if "profile" not in skip else None
            with tempfile.TemporaryDirectory() as tmp:
                report.section(precision, section, opts.engine_need_s,
                               lambda: engine_section(model, precision, batches, opts.prompt_len, opts.decode_steps,
                                                      Path(tmp), tuple(opts.engine_kinds.split(",")), env, programs,
                                                      profiles, list(filter(None, opts.pdl_ports.split(",")))))
            deferred += [(section, profiles)] if profiles else []
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        for section, profiles in deferred:
            report.put(precision, section, report.data["results"][precision][section] | profiles[0]())
        programs = deferred = None  # frees them (closures read them: no del)
        if "compile" not in skip and precision == "bf16":
            report.section(precision, "compile", 150, lambda: eager_section(model, batches[:1], opts.prompt_len,
                                                                             opts.decode_steps, True))
        model = None  # frees it (closures read it: no del)
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(markdown(report.data, batches))
    return 0


def _engine_sections(sections: dict[str, Any]) -> list[str]:
    """The engine section and the --variant ones (engine-NAME), in build order."""
    return [k for k in sections if k == "engine" or k.startswith("engine-")]


def _engine_notes(label: str, eng: dict[str, Any]) -> list[str]:
    """The generate check and the batch-1 kernel profile of one engine section, as text lines."""
    lines = []
    if "generate_s" in eng:
        lines.append(f"\n{label}: Engine.generate {eng['generate_new_tokens']} tokens in {eng['generate_s']} s, "
                     f"identical to the reference's greedy tokens for the first "
                     f"{eng['generate_identical_prefix_vs_reference']}; decode CUDA graph used: "
                     f"{eng.get('decode_uses_cuda_graph')}")
    gen = eng.get("generate_ms_per_token") or {}
    if "b1_queued" in gen:
        lines.append(f"{label}: Engine.generate, greedy, batch 1: {gen['b1_queued']} ms/token with the next step queued "
                     f"before each token is read, {gen['b1_one_at_a_time']} one step at a time")
    batches = sorted(int(m.group(1)) for m in map(re.compile(r"decode_b(\d+)_kernels$").match, eng) if m)
    for b in batches:
        lines += _profile_notes(label, b, eng.get(f"decode_b{b}_kernels") or {},
                                eng.get(f"decode_b{b}_graph_timeline") or {})
    return lines


def _profile_notes(label: str, b: int, prof: dict[str, Any], tl: dict[str, Any]) -> list[str]:
    """One batch's kernel profile and CUDA-graph timeline, as text lines."""
    lines = []
    if "top" in prof:
        lines.append(f"{label}: batch-{b} decode step, {prof['what']}: {prof['launches_per_step']} per step, "
                     f"{prof['busy_ms_per_step']} ms busy; most time:")
        lines += [f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:<6} {r['name'][:90]}" for r in prof["top"][:12]]
    if prof.get("host_top"):
        lines.append(f"{label}: batch-{b} decode step run directly, host side (self CPU time):")
        lines += [f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:<6} {r['name'][:90]}" for r in prof["host_top"][:10]]
    if "span_us" in tl:
        lines.append(f"{label}: batch-{b} CUDA-graph replay: {tl['kernels_per_step']} device events, span {tl['span_us']} us, "
                     f"busy {tl['busy_us']}, idle {tl['idle_us']} (gap median {tl['gap_us_median']} us, p90 "
                     f"{tl['gap_us_p90']}, max {tl['gap_us_max']}; {tl['gaps_over_5us_per_step']} gaps > 5 us holding "
                     f"{tl['idle_us_in_gaps_over_5us']} us); idle before:")
        lines += [f"  {r['us_per_step']:9.1f} us  x{r['gaps_per_step']:<4} max {r['max_us']:6.2f}  {r['next'][:80]}"
                  for r in tl["idle_before"][:8]]
    elif tl:
        lines.append(f"{label}: graph timeline: {tl}")
    return lines


def markdown(data: dict[str, Any], batches: list[int]) -> str:
    cols = ["prefill ms (b1, {} tok)".format(data["meta"]["prompt_len"])] + [f"decode ms/tok b{b}" for b in batches]
    lines = ["| precision | what | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for precision, sections in data["results"].items():
        engines = _engine_sections(sections)
        rows = [(e, "") for e in engines] + [(f"{e} (no CUDA graph)", "_no_graph") for e in engines]
        rows += [(f"{e} (graph replay alone)", "_replay") for e in engines
                 if f"decode_ms_b{batches[0]}_replay" in sections[e]]
        rows += [(f"{e} (PDL {key[4:]})", f"_{key}") for e in engines for key in ("pdl_launch", "pdl_programmatic",
                                                                                "pdl_control")
                 if f"decode_ms_b{batches[0]}_{key}" in sections[e]]
        for name, key_suffix in rows + [("eager", ""), ("compile", ""), ("floor", "")]:
            sec = sections.get(name.split(" ")[0])
            if sec is None:
                continue
            if "error" in sec or "skipped" in sec:
                if key_suffix:
                    continue
                lines.append(f"| {precision} | {name} | {sec.get('skipped') or sec['error'][:80]} |")
                continue
            cells = [sec.get("prefill_ms_b1", "") if not key_suffix else ""]
            cells += [sec.get(f"decode_ms_b{b}{key_suffix}", "") for b in batches]
            fmt = [f"{c:.2f}" if isinstance(c, float) and math.isfinite(c) else str(c) for c in cells]
            lines.append(f"| {precision} | {name} | " + " | ".join(fmt) + " |")
    for precision, sections in data["results"].items():
        for engine in _engine_sections(sections):
            lines += _engine_notes(f"{precision}" + engine[len("engine"):], sections[engine])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
