"""Probe: MLA absorbed per-head projections (kernels/mla_absorb.py head_gemm) against the variants in
benchmarks/hg_probe/ (dotT: the dot swapped so the weight's columns sit on the MMA's M side, K/N masks
dropped on even shapes; fma: a CUDA-core form, the whole [K, BLOCK_N] weight tile in one load, tl.sum per row).

16b decode shapes: W_UK x = q_nope[:, 0] ([B, 16, 128] slice of q [B, 1, 16, 192]) @ w[:, :128] ([16, 128, 512],
N contiguous) and W_UV lat [B, 16, 512] @ w[:, 128:].transpose(1, 2) ([16, 512, 128], K contiguous), w a view
of wkv_b [16 * 256, 512]. B = 1, 8, 64; pinned configs; each case is one CUDA graph of NCOPIES calls, each on
its own wkv_b copy (NCOPIES x 4 MB > the 50 MB L2: cold weights, as in the decode step), time per call =
graph time / NCOPIES; error = max |y - y_orig| / max |y_orig| against the original's first config and
against the fp32 einsum. Prints a table; writes $OUT/hg_probe.json when OUT is set.
On CPU (TRITON_INTERPRET=1) it runs tiny shapes (K, N not multiples of the tiles) once each, errors only.
HG_FULL=1: every variant config and more original configs; HG_AUTOTUNE=1: also print the configs the
autotuner picks at the decode bucket (batch 64 inputs); both add compiles (over the 40 s budget)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kbench.common import _bootstrap_imports  # noqa: E402

_bootstrap_imports()
from dsv3_export.kernels import mla_absorb as ka  # noqa: E402

T0 = time.time()
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
FULL = os.environ.get("HG_FULL") == "1"


def _load(name):
    path = Path(__file__).resolve().parent / "hg_probe" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"hg_probe_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DOTT, FMA = _load("dotT"), _load("fma")
# c0 BN32 BK64 w4, c8 BN16 BK128 w4, c9 BN16 BK64 w2, c12 BM64 (wgmma)
ORIG_IDX = (0, 8, 9, 2, 10, 12) if FULL else (0, 8, 9, 12)
VARIANTS = {}  # name -> (head_gemm, config)
for i in ORIG_IDX:
    c = ka.HEAD_GEMM_CONFIGS[i]
    kw = c.kwargs
    name = f"orig c{i} M{kw['BLOCK_M']}N{kw['BLOCK_N']}K{kw['BLOCK_K']}w{c.num_warps}s{c.num_stages}"
    VARIANTS[name] = (ka.head_gemm, c)
for cname in (DOTT.CONFIGS if FULL else ("N32 K128 w2", "N32 K64 w2")):
    VARIANTS[f"dotT {cname}"] = (DOTT.head_gemm, DOTT.CONFIGS[cname])
for cname in (FMA.CONFIGS if FULL else ("N32 R1 w4", "N16 R1 w4", "N8 R1 w4", "N16 R8 w4")):
    VARIANTS[f"fma {cname}"] = (FMA.head_gemm, FMA.CONFIGS[cname])

if GPU:
    H, DN, DV, C, DR = 16, 128, 128, 512, 64
    BATCHES = (1, 8, 64)
    NCOPIES = 32  # 32 x 4 MB wkv_b copies = 128 MB > 50 MB L2; 2 MB read per call
else:  # tiny, K and N not multiples of the tiles
    H, DN, DV, C, DR = 2, 40, 24, 72, 8
    BATCHES = (1, 3)
    NCOPIES = 2
    VARIANTS = {k: v for j, (k, v) in enumerate(VARIANTS.items()) if j % 2 == 0 or k.startswith("fma")}


def graph_of(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def time_graph(g, reps=15):
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2] * 1e3  # us per graph


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    wkv_b = [torch.randn(H * (DN + DV), C, device=DEV, dtype=dt) * 0.05 for _ in range(NCOPIES)]
    w_uk = [w.view(H, DN + DV, C)[:, :DN] for w in wkv_b]  # [H, DN, C] N contiguous
    w_uv = [w.view(H, DN + DV, C)[:, DN:].transpose(1, 2) for w in wkv_b]  # [H, C, DV] K contiguous
    rows, empty_us = [], None
    if GPU:  # a graph of NCOPIES empty-ish launches: the per-launch floor inside a graph
        z = torch.zeros(1, device=DEV)
        empty_us = time_graph(graph_of(lambda: [z.add_(1) for _ in range(NCOPIES)])) / NCOPIES
        print(f"graph floor (tiny elementwise kernel) {empty_us:.2f} us/call", flush=True)
    cases = []
    for proj in ("UK", "UV"):
        for b in BATCHES:
            if proj == "UK":
                q = torch.randn(b, 1, H, DN + DR, device=DEV, dtype=dt)
                cases.append((proj, b, q[:, 0, :, :DN], w_uk))  # [b, H, DN] strided
            else:
                cases.append((proj, b, torch.randn(b, H, C, device=DEV, dtype=dt), w_uv))  # [b, H, C]
    if GPU and os.environ.get("HG_SERIAL") != "1":  # compile every kernel up front on threads (ptxas runs in parallel)
        from concurrent.futures import ThreadPoolExecutor

        def warm(job):
            (fn, cfg), x, w = job
            try:
                fn(x, w[0], config=cfg)
            except Exception:  # noqa: BLE001 - the timed loop reports it
                pass
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(warm, [(v, x, w) for _, _, x, w in cases for v in VARIANTS.values()]))
        torch.cuda.synchronize()
        print(f"compiled [{time.time() - T0:.0f}s]", flush=True)
    for proj, b, x, ws in cases:
        m, _, k = x.shape
        n = ws[0].shape[2]
        ref = ka.head_gemm_ref(x, ws[0]).float()  # einsum in fp32 rounded to bf16
        ref32 = torch.einsum("mhk,hkn->mhn", x.float(), ws[0].float())
        base = None
        for vname, (fn, cfg) in VARIANTS.items():
            label = f"{proj} B={b} {vname}"
            try:
                outs = [torch.empty(m, H, n, device=DEV, dtype=dt) for _ in range(NCOPIES)]
                y = fn(x, ws[0], out=outs[0], config=cfg).float()
                if base is None:
                    base = y
                err_orig = ((y - base).abs().max() / base.abs().max()).item()
                err_ref = ((y - ref32).abs().max() / ref32.abs().max()).item()
                err_bf = ((y - ref).abs().max() / ref.abs().max()).item()
                us = float("nan")
                if GPU:
                    g = graph_of(lambda: [fn(x, ws[i], out=outs[i], config=cfg) for i in range(NCOPIES)])
                    us = time_graph(g) / NCOPIES
                    del g
                rows.append(dict(proj=proj, b=b, variant=vname, us=us, err_orig=err_orig, err_fp32=err_ref,
                                 err_bf16_ref=err_bf))
                print(f"{label:<40} {us:7.2f} us/call  err vs orig {err_orig:.1e} vs fp32 {err_ref:.1e} "
                      f"vs bf16 ref {err_bf:.1e}  [{time.time() - T0:.0f}s]", flush=True)
            except Exception as e:  # noqa: BLE001 - a point that does not run is a result
                print(f"{label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append(dict(proj=proj, b=b, variant=vname, failed=f"{type(e).__name__}: {str(e)[:300]}"))
    if GPU and os.environ.get("HG_AUTOTUNE") == "1":  # what the decode program's tuner picks (bucket 64, 28 compiles)
        for proj, b, x, ws in cases:
            if b == max(BATCHES):
                out = torch.empty(x.shape[0], H, ws[0].shape[2], device=DEV, dtype=x.dtype)
                ka.launch(*ka.head_gemm_spec(x, ws[0], out, ka.DECODE_MAX_M), None)
        torch.cuda.synchronize()
        picks = {str(key): str(cfg) for key, cfg in ka._head_gemm_tuned.cache.items()}
        print(f"autotuner picks (key M_BUCKET, K, N, dtypes...): {picks}", flush=True)
        rows.append(dict(autotune=picks))
    # compact table: variant x (proj, B)
    cols = [(p, b) for p in ("UK", "UV") for b in BATCHES]
    print("\nus/call (cold weights, CUDA graph of %d calls)%s" % (
        NCOPIES, "" if GPU else " -- CPU interpreter: errors only"), flush=True)
    print(f"{'variant':<28}" + "".join(f"{p} B={b:<3}".rjust(11) for p, b in cols) + "   max err vs orig", flush=True)
    for vname in VARIANTS:
        cells, errs = [], []
        for p, b in cols:
            r = next((r for r in rows if r.get("proj") == p and r["b"] == b and r["variant"] == vname), None)
            if r is None or "failed" in r:
                cells.append("FAIL".rjust(11))
            else:
                cells.append(f"{r['us']:11.2f}")
                errs.append(r["err_orig"])
        print(f"{vname:<28}" + "".join(cells) + f"   {max(errs) if errs else float('nan'):.1e}", flush=True)
    print(f"total {time.time() - T0:.1f} s", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "hg_probe.json").write_text(json.dumps(dict(gpu=GPU, ncopies=NCOPIES, graph_floor_us=empty_us,
                                                              rows=rows, seconds=time.time() - T0), indent=1))


if __name__ == "__main__":
    main()
