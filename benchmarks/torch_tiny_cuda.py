"""Smoke check of the torch backend on one GPU with the tiny preset: build, load, compare, time.

    python benchmarks/torch_tiny_cuda.py [--precisions bf16,fp8] [--device cuda] [--out DIR]

For each precision: `build_engine` (export -> passes -> dsv3 ops lowered to our Triton kernels on
CUDA -> AOTInductor packages) into a temporary directory, `load_engine` (hash check, package
load, CUDA graphs for decode), then
  * step logits vs the eager LatentCacheStep on the same weights (prefill 2 x 7 tokens into a
    cache of 11 at start positions 0 and 3, and one decode step): relative error;
  * 32 greedy tokens of `Engine.generate` vs the reference model's own loop (same weights and
    compute dtype): identical prefix length (bf16 kernels round differently from eager, so an
    early tie can diverge; the step errors above say whether the numbers agree);
  * whether decode replayed a CUDA graph; decode ms/token at batch 1 (tiny model: launch-bound).
Minutes matter on the lent GPU, so the tiny preset keeps this under ~2 minutes. Writes
torch_tiny_cuda.json to --out (default $OUT or .) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(precision: str, device: str, work: Path) -> dict:
    from dsv3_export.build import BuildOptions, build_engine
    from dsv3_export.checkpoint import preset_model
    from dsv3_export.reports.reference import reference_generate
    from dsv3_export.runtime import load_engine
    from dsv3_export.step import LatentCacheStep

    out: dict = {}
    t = time.perf_counter()
    build_engine(BuildOptions(preset="tiny", backend="torch", device=device, precision=precision,
                              out=work / precision, seed=0))
    out["build_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    engine = load_engine(work / precision)
    out["load_s"] = round(time.perf_counter() - t, 1)
    # Drawn on the CPU, as build_engine draws a preset's weights, then moved: the same seed gives
    # other numbers on a CUDA generator (a reference drawn on the GPU is another model).
    model = preset_model("tiny", engine.step.cache_dtype, "cpu", seed=0, weight_dtype=precision,
                         attn_impl="absorb").to(device).eval()
    a = model.args
    gen = torch.Generator(device="cpu").manual_seed(7)
    cache = torch.randn(2, a.n_layers, 11, a.latent_cache_width, generator=gen).to(device, engine.step.cache_dtype)
    tokens = torch.randint(0, a.vocab_size, (2, 7), generator=gen).to(device)
    start = torch.tensor([0, 3], device=device)
    with torch.no_grad():
        want, _ = LatentCacheStep(model).eval()(tokens, start, cache)
        got, _ = engine.step(tokens, start, cache)
        out["prefill_logits_rel_err"] = rel_err(got, want)
        pos = torch.tensor([9, 4], device=device)
        want, _ = LatentCacheStep(model).eval()(tokens[:, :1], pos, cache)
        got, _ = engine.step(tokens[:, :1], pos, cache)
        out["decode_logits_rel_err"] = rel_err(got, want)
    prompt = [17, 402, 9, 881, 5]
    with torch.no_grad():
        ref = reference_generate(model, [prompt], 32)[0]  # the reference model's own buffer-cache loop
    eng = engine.generate(prompt, 32)
    out["greedy_equal"] = ref == eng
    out["greedy_identical_prefix"] = next((i for i, (x, y) in enumerate(zip(ref, eng)) if x != y), 32)
    graphs = getattr(engine.step, "_graphs", None)
    out["decode_cuda_graph"] = graphs is not None and not getattr(graphs, "failed", True)
    one = torch.tensor([[1]], device=device)
    c1 = engine.new_cache(1, 64)
    p1 = torch.tensor([32], device=device)
    for _ in range(3):
        engine.step(one, p1, c1)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        engine.step(one, p1, c1)
    if device == "cuda":
        torch.cuda.synchronize()
    out["decode_ms_b1"] = round((time.perf_counter() - t) / 20 * 1e3, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default="bf16,fp8")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("torch_tiny_cuda: needs a CUDA GPU (or --device cpu)", file=sys.stderr)
        return 2
    report: dict = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                    "torch": torch.__version__, "results": {}}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for precision in a.precisions.split(","):
            try:
                report["results"][precision] = check(precision, a.device, Path(tmp))
            except Exception as e:  # noqa: BLE001 - report and go on to the next precision
                failed = True
                report["results"][precision] = {"error": f"{type(e).__name__}: {str(e)[:2000]}",
                                                "traceback": traceback.format_exc()[-3000:]}
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "torch_tiny_cuda.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "traceback"} for k, v in report["results"].items()},
                     indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
