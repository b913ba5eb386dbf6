"""ONNX Runtime CUDA engines of the 16b preset (random weights) on one GPU: build, check, time.

    PYTHONPATH=/tmp/site python benchmarks/onnxruntime_16b.py [--precisions bf16,fp8]
        [--batches 1,8,64] [--context 1024] [--decode-steps 8] [--work /tmp/ort16b]
        [--budget-s 560] [--out DIR] [--n-layers N] [--skip-reference] [--delete-engines]
        [--wait-builds SECONDS]

Needs onnxruntime-gpu (CUDAExecutionProvider) on PYTHONPATH. Made for one device call: each
section runs in try/except, checks the time left against its estimate (skipped with a reason
when it would not fit) and the JSON is rewritten after every section, so a call stopped at its
limit still returns what was measured. Engines are built into --work and reused when a later
call on the same warm machine finds them there (delete --work to rebuild). A full 16b build takes
5-8 minutes and up to ~75 GB of host RAM, so the usual way is to run benchmarks/ort_builds_16b.sh in
the background and this script with --wait-builds: the reference is loaded and timed first (the GPU
is idle while the engines are built), then each engine is timed as soon as its build's marker file
appears, all in one process (see benchmarks/device_chain.sh); an engine whose build failed or
did not finish in time is not built here (one complete in --work is still used). Sections:

  floor      measured device copy bandwidth; bytes a decode step must read at batch b (dense
             weights + expected distinct routed experts + the KV cache of `context` positions)
             / bandwidth, per precision
  build      dsv3-export build --preset 16b --backend onnxruntime --device cuda --precision P
             (export -> passes -> ONNX -> engine dir), seconds and file sizes
  engine     load_engine (hash check, session creation) seconds; prefill of `context` tokens at
             batch 1; decode ms/token (one token per row per step) at each batch over a cache of
             `context` positions; accuracy of the engine's logits vs the eager step (same weights,
             bf16) on a 2 x 64 prompt: relative error and top-1 agreement
  reference  the reference model in eager PyTorch (DeepSeek's MoE loop, buffer cache), bf16,
             same timings

Prints a Markdown table on stdout; writes onnxruntime_16b.json to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _floor import decode_step_bytes  # noqa: E402 - sibling module of this script
from _report import Report, log  # noqa: E402 - sibling module of this script
from _timing import cuda_ms  # noqa: E402 - sibling module of this script

PRESET_SEED = 0



# --- floor -------------------------------------------------------------------------------------
def copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    n = int(gib * 2**30)
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = cuda_ms(lambda: b.copy_(a), warmup=2, reps=10)
    a = b = None  # frees them (the timed lambda closes over both: no del)
    return 2 * n / (ms / 1e3)


def decode_bytes(args, batch: int, context: int, precision: str) -> float:
    """Bytes one decode step at `batch` must read (benchmarks/_floor.py), for the model as the
    `precision` checkpoint stores it (built on the meta device: no memory)."""
    from dsv3_export.reference.model import Transformer

    with torch.device("meta"):
        model = Transformer(args.replace(dtype=precision), dtype=torch.bfloat16)
    return decode_step_bytes(model, batch, context)


# --- engine ------------------------------------------------------------------------------------
def _reusable_engine(path: Path):
    """The manifest of a complete engine directory at path (hashes not checked), or None: build it."""
    from dsv3_export.manifest import verify_engine_dir

    try:
        return verify_engine_dir(path, check_hashes=False)
    except Exception:  # noqa: BLE001 - missing or incomplete
        return None


def wait_for_build(work: Path, precision: str, timeout_s: float) -> dict[str, Any]:
    """Wait for benchmarks/ort_builds_16b.sh (running in the background) to finish this engine:
    it leaves engine-P.done, or engine-P.failed with the exit code."""
    start = time.perf_counter()
    done, failed = work / f"engine-{precision}.done", work / f"engine-{precision}.failed"
    while not (done.exists() or failed.exists()) and time.perf_counter() - start < timeout_s:
        time.sleep(2.0)
    state = "done" if done.exists() else f"failed rc={failed.read_text().strip()}" if failed.exists() else "timed out"
    log(f"{precision}/wait: {state} after {time.perf_counter() - start:.0f} s")
    return {"state": state, "waited_s": round(time.perf_counter() - start, 1)}


def build(precision: str, work: Path, n_layers: int | None) -> dict[str, Any]:
    from rich.console import Console

    from dsv3_export.build import BuildOptions, build_engine

    out = work / f"engine-{precision}"
    manifest = _reusable_engine(out)
    if manifest is not None:
        return {"reused": str(out), "files": {n: e.size for n, e in manifest.files.items()}}
    summary = build_engine(BuildOptions(preset="16b", backend="onnxruntime", device="cuda", precision=precision,
                                        out=out, seed=PRESET_SEED, max_batch_size=64,
                                        config_overrides=(("n_layers", n_layers),) if n_layers else ()),
                           console=Console(stderr=True))
    m = summary.manifest
    return {"build_seconds": summary.seconds, "files": {n: e.size for n, e in m.files.items()},
            "lowerings": m.lowerings, "passes": {p["name"]: p["matches"] for p in m.passes},
            "top_ops": dict(list(m.op_histogram.items())[:15])}


def reference_model(n_layers: int | None, max_batch: int):
    """The 16b reference model with the same weights as the engines (drawn on the CPU), on the GPU."""
    from dsv3_export.checkpoint import preset_model

    over = {"max_batch_size": max_batch, "attn_impl": "absorb"}
    if n_layers:
        over["n_layers"] = n_layers
    model = preset_model("16b", torch.bfloat16, "cpu", seed=PRESET_SEED, **over)
    return model.to("cuda")


def time_engine(precision: str, work: Path, batches: list[int], context: int, steps: int,
                reference: Any) -> dict[str, Any]:
    from dsv3_export.runtime import load_engine
    from dsv3_export.step import write_cache
    from dsv3_export.step import LatentCacheStep

    start = time.perf_counter()
    engine = load_engine(work / f"engine-{precision}")
    free, total = torch.cuda.mem_get_info()
    out: dict[str, Any] = {"load_seconds": round(time.perf_counter() - start, 1),
                           "gpu_used_after_load_gib": round((total - free) / 2**30, 2),
                           # process lifetime peak (the CPU-drawn reference counts too): session creation
                           # folds the fp8 weights on the host, ~90 GiB extrapolated for 16b fp8
                           "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}
    args = engine.args
    gen = torch.Generator(device="cuda").manual_seed(1)
    vocab = args.vocab_size

    tokens = torch.randint(0, vocab, (1, context), device="cuda", generator=gen)
    cache = engine.new_cache(1, context)
    zero = torch.zeros(1, dtype=torch.int64, device="cuda")
    out["prefill_ms"] = round(cuda_ms(lambda: engine.step(tokens, zero, cache), warmup=1, reps=3), 2)
    del cache
    decode = {}
    for b in batches:
        try:
            cache = engine.new_cache(b, context + steps + 4)
            cache.normal_(generator=gen)
            pos = torch.full((b,), context, dtype=torch.int64, device="cuda")
            tok = torch.randint(0, vocab, (b, 1), device="cuda", generator=gen)

            def one_step():
                _, new_kv = engine.step(tok, pos, cache)
                write_cache(cache, new_kv, pos)

            decode[b] = round(cuda_ms(one_step, warmup=2, reps=steps), 3)
            del cache
        except Exception as e:  # noqa: BLE001
            decode[b] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()
    out["decode_ms_per_step"] = decode
    if reference is not None:  # same weights: the eager latent-cache step is the numerical reference
        prompt = torch.randint(0, vocab, (2, 64), device="cuda", generator=gen)
        cache = engine.new_cache(2, 64)
        zeros = torch.zeros(2, dtype=torch.int64, device="cuda")
        got, _ = engine.step(prompt, zeros, cache)
        with torch.no_grad():
            want, _ = LatentCacheStep(reference)(prompt, zeros, cache)
        got, want = got.float(), want.float()
        out["vs_eager_step"] = {"rel_err": ((got - want).norm() / want.norm()).item(),
                                "top1_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    start = time.perf_counter()  # the user-facing loop: prefill + greedy decode through Engine.generate
    out["generate_sample"] = engine.generate([1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=16)
    out["generate_seconds"] = round(time.perf_counter() - start, 3)
    engine = None  # frees it (closures read it: no del)
    return out


def time_reference(model, batches: list[int], context: int, steps: int) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(2)
    vocab = model.args.vocab_size
    out: dict[str, Any] = {"impl": "reference Transformer, eager, bf16, absorb attention, MoE loop"}
    with torch.no_grad():
        tokens = torch.randint(0, vocab, (1, context), device="cuda", generator=gen)
        out["prefill_ms"] = round(cuda_ms(lambda: model(tokens, 0), warmup=1, reps=3), 2)
        decode = {}
        for b in batches:
            if b > model.args.max_batch_size:
                decode[b] = f"batch {b} > max_batch_size {model.args.max_batch_size}"
                continue
            tok = torch.randint(0, vocab, (b, 1), device="cuda", generator=gen)
            decode[b] = round(cuda_ms(lambda: model(tok, context), warmup=2, reps=steps), 3)
        out["decode_ms_per_step"] = decode
    return out


def markdown(data: dict[str, Any], batches: list[int]) -> str:
    rows = ["| engine | prefill ms (1x%s) | %s |" % (data["meta"]["context"],
                                                       " | ".join(f"decode ms/step b={b}" for b in batches)),
            "|---|---|" + "---|" * len(batches)]
    for key, sections in data["results"].items():
        for name in ("engine", "reference"):
            r = sections.get(name)
            if not isinstance(r, dict) or "decode_ms_per_step" not in r:
                continue
            dec = r["decode_ms_per_step"]
            cells = [str(dec.get(b, dec.get(str(b), "-"))) for b in batches]
            rows.append(f"| {key} {name} | {r.get('prefill_ms', '-')} | {' | '.join(cells)} |")
        floor = sections.get("floor")
        if isinstance(floor, dict) and "decode_floor_ms" in floor:
            cells = [f"{floor['decode_floor_ms'][str(b)]:.3f}" for b in batches]
            rows.append(f"| {key} bandwidth floor | - | {' | '.join(cells)} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default="bf16,fp8")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("/tmp/ort16b"))
    p.add_argument("--budget-s", type=float, default=560.0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--n-layers", type=int, default=None, help="smaller model for a smoke run")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--wait-builds", type=float, default=0.0,
                   help="wait up to this many seconds per engine for ort_builds_16b.sh's marker file")
    p.add_argument("--delete-engines", action="store_true", help="delete each engine after timing it (disk)")
    a = p.parse_args()
    precisions = [x for x in a.precisions.split(",") if x]
    batches = [int(x) for x in a.batches.split(",") if x]
    import onnxruntime as ort

    from dsv3_export.manifest import installed_versions
    from dsv3_export.reference import ModelArgs

    meta = {"context": a.context, "batches": batches, "decode_steps": a.decode_steps, "versions": installed_versions(),
            "onnxruntime_providers": ort.get_available_providers(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    report = Report(a.out / "onnxruntime_16b.json", a.budget_s, meta)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        report.put("setup", "error", {"error": "onnxruntime has no CUDAExecutionProvider; put onnxruntime-gpu on "
                                               "PYTHONPATH (../shared/tools/device-wheels)"})
        print(json.dumps(report.data, indent=2))
        return 1
    args = ModelArgs.preset("16b").replace(max_batch_size=64, **({"n_layers": a.n_layers} if a.n_layers else {}))
    a.work.mkdir(parents=True, exist_ok=True)

    def floor() -> dict[str, Any]:
        bw = copy_bandwidth()
        out = {"copy_bandwidth_tb_s": round(bw / 1e12, 3)}
        for prec in precisions:
            out[prec] = {str(b): decode_bytes(args, b, a.context, prec) / bw * 1e3 for b in batches}
        return out

    fl = report.section("all", "floor", 20, floor)
    for prec in precisions:
        if isinstance(fl, dict) and prec in fl:
            report.put(prec, "floor", {"decode_floor_ms": fl[prec]})
    holder: dict[str, Any] = {}

    def load_reference() -> dict[str, Any]:
        holder["model"] = reference_model(a.n_layers, max(batches))
        free, total = torch.cuda.mem_get_info()
        return {"gpu_used_gib": round((total - free) / 2**30, 2)}

    if not a.skip_reference:
        report.section("reference", "load", 120, load_reference)
    reference = holder.get("model")
    if reference is not None:  # first: the GPU is free while the background builds still run
        report.section("bf16", "reference", 60, lambda: time_reference(reference, batches, a.context, a.decode_steps))
    for prec in precisions:
        waited = wait_for_build(a.work, prec, a.wait_builds) if a.wait_builds else None
        if waited is not None:
            report.put(prec, "wait", waited)
        reusable = _reusable_engine(a.work / f"engine-{prec}") is not None  # reused: seconds; built: minutes
        if waited is not None and waited["state"] != "done" and not reusable:
            continue  # not built here too: a build still running writes there, both need ~75 GB of RAM
        built = report.section(prec, "build", 5 if reusable else 240, lambda: build(prec, a.work, a.n_layers))
        if built is None or "error" in built:
            continue
        report.section(prec, "engine", 90, lambda: time_engine(prec, a.work, batches, a.context, a.decode_steps,
                                                                reference))
        if a.delete_engines:
            shutil.rmtree(a.work / f"engine-{prec}", ignore_errors=True)  # disk: 31 GB bf16, 16 GB fp8
    print(markdown(report.data, batches))
    print(f"\nJSON: {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
