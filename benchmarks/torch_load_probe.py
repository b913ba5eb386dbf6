"""Which stage of loading / running a torch (AOTInductor) engine dies natively, and where.

    python benchmarks/torch_load_probe.py [--device cuda] [--precision bf16] [--engine DIR]
                                          [--stages build,linear,...] [--out DIR] [--blocking]

Why: on the H200 (torch 2.11) `benchmarks/torch_tiny_cuda.py` built the tiny CUDA engine, then the
process died with "Segmentation fault" and nothing else (results/torch_tiny_cuda_segfault.log):
load, weight attach, prefill, decode or the decode CUDA-graph capture. This script builds the
engine once (stage `build`, unless --engine names one), then runs every stage below in its OWN
Python process, so one crash cannot hide the next stage, with
  * faulthandler on (PYTHONFAULTHANDLER=1): the Python stack of a fatal signal;
  * a native stack: a small SIGSEGV/SIGBUS/SIGABRT/SIGILL/SIGFPE handler (C, compiled here with
    the system cc, LD_PRELOADed) printing backtrace_symbols_fd of the crashing thread, which names
    the library (libcuda, libtorch_cuda, the package's model .so, ...) and exported function;
  * progress lines "@ step" flushed before each native call, so the last one names the call;
  * TORCH_SHOW_CPP_STACKTRACES=1 for C++ exceptions that do come back as Python errors;
  * --blocking adds CUDA_LAUNCH_BLOCKING=1 (a kernel fault then surfaces at its launch);
  * --aten-only builds without our kernels/ Triton ops (DSV3_TORCH_TRITON_OPS=0): if that engine
    runs where the default one dies, the crash is in launching our triton_op kernels from AOTI.

Stages (each loads from scratch; later ones include the earlier steps):
    build              build_engine(tiny, torch, device, precision) into --out/engine
    linear             a plain Linear compiled with AOTInductor (C++ compiler chosen as the build does), constants in the .so, loaded by
                       the C++ loader and run; then the same with package_constants_in_so=False and
                       user-managed constants (the session-1 crash was reported for a plain Linear)
    linear_fresh       the two Linear packages loaded and run in a fresh process (compile and load
                       in one process, as torch_tiny_cuda.py does, vs load alone)
    load               both packages through the C++ loader, no weights (constant names, metadata)
    attach             + weights checked and handed over (user_managed=True)
    prefill            + one prefill run ([2, 7] tokens into a cache of 11), synchronized
    decode             + one decode run without a CUDA graph
    decode_threadsafe  the same with run_single_threaded=False (how loading ran before this change)
    graph              AOTIStep with decode CUDA graphs: capture + 2 replays (CUDA only)
    graph_threadsafe   the same with run_single_threaded=False (event record / query / sync of the
                       thread-safe container run inside the capture)
    engine             dsv3_export.runtime.load_engine + prefill + 3 decode steps, as torch_tiny_cuda.py
    aoti_load_package  torch._inductor.aoti_load_package(decode.pt2) + weights + decode (session 1's path)
Writes torch_load_probe.json to --out (default $OUT or .), prints a table: stage, status (ok, error,
SIGSEGV, ...), seconds, last progress step; the stderr tail of each failure follows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("build", "linear", "linear_fresh", "load", "attach", "prefill", "decode", "decode_threadsafe", "graph", "graph_threadsafe",
          "engine",
          "aoti_load_package")
CUDA_ONLY = {"graph", "graph_threadsafe"}

_SEGV_HANDLER_C = r"""
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void dsv3_on_fatal(int sig) {
    void* frames[64];
    const char head[] = "\n=== native stack (dsv3 probe handler) ===\n";
    write(2, head, sizeof(head) - 1);
    int n = backtrace(frames, 64);
    backtrace_symbols_fd(frames, n, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void dsv3_install(void) {
    int sigs[] = {SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE};
    for (unsigned i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = dsv3_on_fatal;
        sa.sa_flags = SA_RESETHAND | SA_NODEFER;
        sigaction(sigs[i], &sa, 0);
    }
}
"""


def step(name: str) -> None:
    """Progress marker, flushed before a call that may die natively."""
    print(f"@ {name}", flush=True)


# --- the stages (run in a child process) --------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine_parts(engine: Path):
    from dsv3_export.manifest import verify_engine_dir
    from dsv3_export.reference.args import ModelArgs

    manifest = verify_engine_dir(engine)
    return manifest, ModelArgs.from_dict(manifest.model), dict(manifest.backend_info)


def _inputs(args, cache_dtype, device, seqlen: int):
    import torch

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, args.vocab_size, (2, seqlen), generator=g).to(device)
    start = torch.tensor([0, 3] if seqlen > 1 else [9, 4]).to(device)
    cache = torch.randn(2, args.n_layers, 11, args.latent_cache_width, generator=g).to(device, cache_dtype)
    return tokens, start, cache


def _describe(name: str, out) -> None:
    import torch

    logits, new_kv = out
    finite = bool(torch.isfinite(logits.float()).all())
    print(f"{name}: logits {tuple(logits.shape)} {logits.dtype} finite={finite}, new_kv {tuple(new_kv.shape)}",
          flush=True)


def _linear(device):
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24).to(device)
    return lin, torch.randn(3, 40, device=device)


def _run_linear(tag: str, path: Path, lin, x, device) -> None:
    from dsv3_export.engines.torch_step import attach_weights, load_package

    step(f"linear {tag}: load (C++ loader)")
    model = load_package(path, device)
    if tag == "user_managed":
        step(f"linear {tag}: load_constants")
        attach_weights(model, path, dict(lin.state_dict()), device)
    step(f"linear {tag}: run")
    got = model(x)
    got = got[0] if isinstance(got, (list, tuple)) else got
    _sync(device)
    want = lin(x)
    err = ((got - want).norm() / want.norm()).item()
    print(f"linear {tag}: rel err {err:.2e}", flush=True)
    if not err < 1e-3:
        raise AssertionError(f"linear {tag}: rel err {err}")


def stage_linear(device, work: Path, fresh: bool) -> None:
    """Compile (unless fresh) and run a plain Linear package, constants in the .so and user-managed."""
    import torch

    from dsv3_export.engines.torch_cxx import select_cxx

    lin, x = _linear(device)
    work.mkdir(parents=True, exist_ok=True)
    cxx = select_cxx().path  # as the build does (DSV3_TORCH_CXX forces one; session 3: $CXX broke loading)
    for tag in ("in_so", "user_managed"):
        path = work / f"linear_{tag}.pt2"
        if not fresh:
            step(f"linear {tag}: compile")
            torch._inductor.aoti_compile_and_package(
                torch.export.export(lin, (x,)), package_path=str(path),
                inductor_configs={"aot_inductor.package_constants_in_so": tag == "in_so", "cpp.cxx": (None, cxx)})
        _run_linear(tag, path, lin, x, device)


def stage_packages(stage: str, engine: Path, device) -> None:
    import torch

    from dsv3_export.engines.base import torch_dtype
    from dsv3_export.engines.torch_step import AOTIStep, attach_weights, load_package, load_weights

    manifest, args, info = _engine_parts(engine)
    cache_dtype = torch_dtype(manifest.kv_cache["dtype"])
    single = stage not in ("decode_threadsafe", "graph_threadsafe")
    models = {}
    for kind, name in info["packages"].items():
        step(f"load {kind} (run_single_threaded={single})")
        models[kind] = load_package(engine / name, device, single)
        fqns = models[kind].get_constant_fqns()
        print(f"{kind}: {len(fqns)} constants; metadata {models[kind].get_metadata()}", flush=True)
    if stage == "load":
        return
    step("read weights")
    weights = load_weights(engine / info["weights"], device)
    handed = {}
    for kind, model in models.items():
        step(f"attach weights to {kind}")
        handed[kind] = attach_weights(model, engine / info["packages"][kind], weights, device, info.get("constants"))
    if stage == "attach":
        return
    with torch.no_grad():
        step("prefill run")
        _describe("prefill", models["prefill"](*_inputs(args, cache_dtype, device, 7)))
        step("prefill synchronize")
        _sync(device)
        if stage == "prefill":
            return
        step("decode run (no CUDA graph)")
        _describe("decode", models["decode"](*_inputs(args, cache_dtype, device, 1)))
        step("decode synchronize")
        _sync(device)
        if stage in ("decode", "decode_threadsafe"):
            return
        step(f"AOTIStep with CUDA graphs (run_single_threaded={single})")
        packages = {kind: engine / name for kind, name in info["packages"].items()}
        run = AOTIStep.from_packages(packages, weights, device, cache_dtype, cuda_graph=True,
                                     constants=info.get("constants"), single_threaded=single)
        tokens, start, cache = _inputs(args, cache_dtype, device, 1)
        for i in range(3):
            step(f"graph decode {i} ({'capture' if i == 0 else 'replay'})")
            out = run(tokens, start, cache)
            _sync(device)
        _describe("graph decode", out)
        graphs = run._graphs
        print(f"graph: captured={graphs is not None and not graphs.failed} "
              f"({len(graphs.graphs) if graphs else 0} graphs)", flush=True)
        if graphs is None or graphs.failed:
            raise RuntimeError("decode CUDA graph capture failed (fell back to running the package)")


def stage_engine(engine: Path, device) -> None:
    import torch

    from dsv3_export.runtime import load_engine

    step("load_engine")
    eng = load_engine(engine)
    cache = eng.new_cache(2, 16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, eng.args.vocab_size, (2, 5), generator=g).to(device)
        step("engine prefill")
        _describe("engine prefill", eng.step(tokens, torch.zeros(2, dtype=torch.int64, device=device), cache))
        for i in range(3):
            step(f"engine decode {i}")
            out = eng.step(tokens[:, i:i + 1].contiguous(), torch.tensor([5 + i, 5 + i], device=device), cache)
            _sync(device)
        _describe("engine decode", out)
    graphs = getattr(eng.step, "_graphs", None)
    print(f"engine: decode CUDA graph {'on' if graphs is not None and not graphs.failed else 'off'}", flush=True)


def stage_aoti_load_package(engine: Path, device) -> None:
    import torch

    from dsv3_export.engines.base import torch_dtype
    from dsv3_export.engines.torch_step import load_weights, prepare_constants

    manifest, args, info = _engine_parts(engine)
    path = engine / info["packages"]["decode"]
    step("torch._inductor.aoti_load_package(decode)")
    model = torch._inductor.aoti_load_package(str(path))
    step("read weights")
    weights = load_weights(engine / info["weights"], device)
    constants = prepare_constants(path, list(model.get_constant_fqns()), weights, device, info.get("constants"))
    step("load_constants")
    model.load_constants(constants, check_full_update=True, user_managed=True)
    step("decode run")
    with torch.no_grad():
        _describe("decode", model(*_inputs(args, torch_dtype(manifest.kv_cache["dtype"]), device, 1)))
    _sync(device)


def stage_build(engine: Path, device: str, precision: str) -> None:
    from rich.console import Console

    from dsv3_export.build import BuildOptions, build_engine

    step(f"build_engine tiny torch {device} {precision}")
    build_engine(BuildOptions(preset="tiny", backend="torch", device=device, precision=precision, out=engine, seed=0),
                 console=Console(stderr=True))


def run_stage(stage: str, engine: Path, work: Path, device_name: str, precision: str) -> None:
    if stage == "selftest_segv":  # checks the crash reporting itself
        import ctypes

        step("read address 0")
        ctypes.string_at(0)
        return
    if stage == "build":
        stage_build(engine, device_name, precision)
        return
    import torch

    from dsv3_export.engines.torch_step import exact_device

    device = exact_device(torch.device(device_name))
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    if stage in ("linear", "linear_fresh"):
        stage_linear(device, work / "linear", fresh=stage == "linear_fresh")
    elif stage == "engine":
        stage_engine(engine, device)
    elif stage == "aoti_load_package":
        stage_aoti_load_package(engine, device)
    else:
        stage_packages(stage, engine, device)
    print(f"stage {stage}: done", flush=True)


# --- the parent ---------------------------------------------------------------------------------

def build_handler(work: Path) -> Path | None:
    """The native-stack handler as a shared library, or None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = work / "dsv3_segv_handler.c", work / "dsv3_segv_handler.so"
    src.write_text(_SEGV_HANDLER_C)
    done = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        print(f"probe: native handler not built ({done.stderr.strip()[:300]})", file=sys.stderr)
        return None
    return lib


def status_of(returncode: int | None) -> str:
    if returncode is None:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"error (exit {returncode})"


def launch(stage: str, a: argparse.Namespace, engine: Path, work: Path, handler: Path | None) -> dict:
    # TORCH_DISABLE_ADDR2LINE: with C++ stack traces on, symbolizing every exception torch throws and
    # catches while compiling made the tiny build take > 150 s on the H200 (session 3)
    env = dict(os.environ, PYTHONFAULTHANDLER="1", TORCH_SHOW_CPP_STACKTRACES="1", TORCH_DISABLE_ADDR2LINE="1",
               PYTHONUNBUFFERED="1")
    if handler is not None:
        env["LD_PRELOAD"] = ":".join(p for p in (str(handler), env.get("LD_PRELOAD", "")) if p)
    if a.blocking:
        env["CUDA_LAUNCH_BLOCKING"] = "1"
    if a.aten_only:
        env["DSV3_TORCH_TRITON_OPS"] = "0"
    cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--stage", stage,
           "--engine", str(engine), "--work", str(work), "--device", a.device, "--precision", a.precision]
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout, check=False)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    steps = [line[2:] for line in stdout.splitlines() if line.startswith("@ ")]
    return {"stage": stage, "status": status_of(rc), "returncode": rc, "seconds": round(time.perf_counter() - t, 1),
            "last_step": steps[-1] if steps else None, "stdout_tail": stdout[-3000:], "stderr_tail": stderr[-6000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--engine", type=Path, default=None, help="an already built tiny torch engine (skips build)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per stage")
    p.add_argument("--blocking", action="store_true", help="CUDA_LAUNCH_BLOCKING=1 in every stage")
    p.add_argument("--keep", action="store_true", help="keep the built engine (its path is printed)")
    p.add_argument("--aten-only", action="store_true",
                   help="build with DSV3_TORCH_TRITON_OPS=0: no kernels/ Triton ops in the packages, Inductor's only")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.precision = a.precision or ("bf16" if a.device == "cuda" else "fp32")
    if a.stage is not None:
        run_stage(a.stage, a.engine, a.work, a.device, a.precision)
        return 0
    stages = [s for s in a.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES) - {"selftest_segv"})
    if unknown:
        p.error(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    if a.device == "cpu":
        skipped = [s for s in stages if s in CUDA_ONLY]
        stages = [s for s in stages if s not in CUDA_ONLY]
    else:
        skipped = []
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dsv3_probe_"))
    engine = a.engine if a.engine is not None else work / "engine"
    if a.engine is not None and "build" in stages:
        stages.remove("build")
    if a.engine is None and "build" not in stages and any(s not in ("linear", "linear_fresh", "selftest_segv") for s in stages):
        p.error("without --engine the stages need `build`")
    handler = build_handler(work)
    report = {"device": a.device, "precision": a.precision, "engine": str(engine), "aten_only": a.aten_only,
              "native_handler": handler is not None,
              "skipped": skipped, "stages": []}
    for stage in stages:
        result = launch(stage, a, engine, work, handler)
        report["stages"].append(result)
        print(f"{stage:<18} {result['status']:<16} {result['seconds']:>7.1f} s   last step: {result['last_step']}",
              flush=True)
        (a.out / "torch_load_probe.json").write_text(json.dumps(report, indent=1))
        if stage == "build" and result["status"] != "ok":
            print("probe: build failed; the other stages need the engine", file=sys.stderr)
            break
    for r in report["stages"]:
        if r["status"] != "ok":
            print(f"\n===== {r['stage']}: {r['status']} (last step: {r['last_step']}) =====\n"
                  f"--- stdout tail ---\n{r['stdout_tail'][-1500:]}\n--- stderr tail ---\n{r['stderr_tail'][-4500:]}")
    if a.keep:
        print(f"probe: kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
