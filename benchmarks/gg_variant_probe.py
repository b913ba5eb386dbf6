"""Probe: the MoE grouped GEMM's one-token (direct-mode) W8A8 forms from a SASS study, against the current
kernel, pinned configs, CUDA graphs of ROUTINGS calls with different routings (cold L2, as the decode step
reads each layer's experts once). One GPU call; prints a table and writes $OUT/gg_probe.json.

benchmarks/gg_probe/variant.py is a copy of kernels/moe.py whose kernel has a constexpr DIRECT_FORM
(grouped_gemm_spec passes the module global; 0 = the current code):
  lean   (1) the same mma.sync dot and scale products (same bits as orig), no per-step masks, int32 tile
             offsets, scalar scales loaded one step ahead
  swap   (2) w [BN, BK] x a^T [BK, 16]: fp8 wgmma m64n16k32 at BLOCK_N >= 64 (no ldmatrix, no e4m3 -> f16),
             gate and up rows in one tile, acc += dot * (a_s * w_s); BLOCK_N < 64 runs lean
  swap2  (3) swap with the gate and up as two dots, acc += dot * a_s * w_s (the original product order)
The aligned path (T > 1) is the original code in every form, compiled into the same kernel (registers can
differ): the T=8 rows check it did not regress.

Timed at the 16b shapes (D=2048, I=1408, E=64 routed + 2 shared experts, k=6+2): the up GEMM (+SwiGLU),
the down GEMM (x routing weight) and the whole fp8 MoE as kernels/moe.py fused_moe runs it at T=1
(act_quant x, up, act_quant h, down, combine; act_quant pinned to ACT_QUANT_CONFIGS[0] for every row).
Errors: max over the routings of mean |out - orig| / mean |orig|, orig = the current kernel at the same
config; 'same' = bit-identical to it. Compiles run first in parallel worker processes (GG_PROBE_JOBS,
default 12; 0 = none) that fill Triton's cache, so the timed process only loads them.
CPU (TRITON_INTERPRET=1): tiny shapes, one call per row, no timing (the numerics and the plumbing).
Run: python3 benchmarks/gg_variant_probe.py
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kbench.common import TINY, Shapes, _bootstrap_imports  # noqa: E402

_bootstrap_imports()
from dsv3_export.kernels import fp8_quant as Q  # noqa: E402
from dsv3_export.kernels import moe as M  # noqa: E402
from kbench.moe import _decode_experts, _decode_tokens  # noqa: E402

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
ROUTINGS = 8
HBM_BW = 4.2e12


def _load_variant():
    spec = importlib.util.spec_from_file_location("gg_probe_variant", HERE / "gg_probe" / "variant.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


V = _load_variant()
VARIANTS = {"orig": (M, 0), "lean": (V, 1), "swap": (V, 2), "swap2": (V, 3)}
CONFIGS = {
    "BN32 w4 s5": triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=5),  # the builds' picks
    "BN64 w4 s4": triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
    "BN32 w2 s5": triton.Config({"BLOCK_N": 32}, num_warps=2, num_stages=5),
    "BN64 w4 s5": triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=5),
    "BN128 w4 s4": triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4),
}
# (tokens, config, variants): orig first in each (the reference of its config)
PLAN = [
    (1, "BN32 w4 s5", ("orig", "lean")),
    (1, "BN64 w4 s4", ("orig", "lean", "swap", "swap2")),
    (1, "BN32 w2 s5", ("orig", "lean")),
    (1, "BN64 w4 s5", ("orig", "swap")),
    (1, "BN128 w4 s4", ("orig", "swap")),
    (8, "BN32 w4 s5", ("orig", "lean")),
    (8, "BN64 w4 s4", ("orig", "lean", "swap")),
]
ACT_CFG = Q.ACT_QUANT_CONFIGS[0]
if not GPU:  # the interpreter ignores warps and stages: one config per BLOCK_N
    PLAN = [(1, "BN32 w4 s5", ("orig", "lean")), (1, "BN64 w4 s4", ("orig", "lean", "swap", "swap2")),
            (1, "BN128 w4 s4", ("orig", "swap")), (8, "BN64 w4 s4", ("orig", "lean", "swap"))]


class Setup:
    """The experts and the routings of t tokens (ROUTINGS per graph)."""

    def __init__(self, sh: Shapes):
        torch.manual_seed(0)
        self.sh = sh
        self.e, self.k, self.w13, self.w13s, self.w2, self.w2s = _decode_experts(sh)
        self.calls = {}

    def routings(self, t: int, n: int):
        if t not in self.calls:
            self.calls[t] = [_decode_tokens(self.sh, t, self.e, self.k) for _ in range(n)]
        return self.calls[t]


def _use(variant: str):
    mod, form = VARIANTS[variant]
    V.DIRECT_FORM = form  # read by V.grouped_gemm_spec at each launch (and at graph capture)
    return mod


def flows(s: Setup, variant: str, cfg: triton.Config, t: int, n_routings: int):
    """-> {part: [fn per routing]}: the up GEMM, the down GEMM (each on precomputed inputs) and the MoE."""
    mod = _use(variant)
    e, k = s.e, s.k
    bm = M.choose_block_m(t, k, e)
    parts = {"up": [], "down": [], "moe": []}
    for x, ids, tw, _ in s.routings(t, n_routings):
        (s_ids, e_ids, npp), direct = M.moe_routing(ids, e, bm, direct=True)
        xq, xs = Q.act_quant(x, config=ACT_CFG)
        _use("orig")
        h0 = M.grouped_gemm(xq, s.w13, s_ids, e_ids, npp, k, a_scale=xs, w_scale=s.w13s, fuse_swiglu=True,
                            out_dtype=x.dtype, direct_ids=direct, config=cfg)
        hq, hs = Q.act_quant(h0, config=ACT_CFG)  # the down GEMM's input: the same for every variant
        mod = _use(variant)

        def up(xq=xq, xs=xs, s_ids=s_ids, e_ids=e_ids, npp=npp, direct=direct, dt=x.dtype, mod=mod):
            return mod.grouped_gemm(xq, s.w13, s_ids, e_ids, npp, k, a_scale=xs, w_scale=s.w13s, fuse_swiglu=True,
                                    out_dtype=dt, direct_ids=direct, config=cfg)

        def down(hq=hq, hs=hs, s_ids=s_ids, e_ids=e_ids, npp=npp, direct=direct, tw=tw, dt=x.dtype, mod=mod):
            return mod.grouped_gemm(hq, s.w2, s_ids, e_ids, npp, 1, a_scale=hs, w_scale=s.w2s, topk_weights=tw,
                                    out_dtype=dt, direct_ids=direct, config=cfg)

        def moe(x=x, ids=ids, tw=tw, mod=mod):  # kernels/moe.py fused_moe at act_quant=True, direct=True
            (s_i, e_i, n_p), d = mod.moe_routing(ids, e, bm, direct=True)
            q, qs = Q.act_quant(x, config=ACT_CFG)
            h = mod.grouped_gemm(q, s.w13, s_i, e_i, n_p, k, a_scale=qs, w_scale=s.w13s, fuse_swiglu=True,
                                 out_dtype=x.dtype, direct_ids=d, config=cfg)
            hq_, hs_ = Q.act_quant(h, config=ACT_CFG)
            y = mod.grouped_gemm(hq_, s.w2, s_i, e_i, n_p, 1, a_scale=hs_, w_scale=s.w2s, topk_weights=tw.contiguous(),
                                 out_dtype=x.dtype, direct_ids=d, config=cfg)
            return y.view(t, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)

        parts["up"].append(up)
        parts["down"].append(down)
        parts["moe"].append(moe)
    return parts


def _compile_worker(tasks):
    """Worker process: run each (t, config, variant) flow once, filling Triton's cache."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    s = Setup(Shapes() if GPU else TINY)  # the timed shapes: the same specializations, the same cache entries
    for t, cname, variant in tasks:
        for fns in flows(s, variant, CONFIGS[cname], t, 1).values():
            _use(variant)
            fns[0]()
    if GPU:
        torch.cuda.synchronize()
    return len(tasks)


def precompile(jobs: int, timeout_s: float = 45.0) -> None:
    """Fill Triton's cache from worker processes (spawned: CUDA), each running a share of the flows once."""
    from concurrent.futures import ProcessPoolExecutor, wait

    tasks = [(t, c, v) for t, c, vs in PLAN for v in vs]
    if jobs <= 0:
        return
    t0 = time.time()
    groups = [tasks[i::jobs] for i in range(min(jobs, len(tasks)))]
    pool = ProcessPoolExecutor(len(groups), mp_context=mp.get_context("spawn"))
    futures = []
    try:
        futures = [pool.submit(_compile_worker, g) for g in groups]
        done, late = wait(futures, timeout=timeout_s)
        errors = [f.exception() for f in done if f.exception() is not None]
        print(f"precompiled {len(tasks)} flows in {len(groups)} processes: {time.time() - t0:.1f} s"
              + (f"; {len(late)} workers past the timeout, terminated (the timed process compiles the rest)" if late else "")
              + (f"; {len(errors)} failed, first: {type(errors[0]).__name__}: {str(errors[0])[:200]}" if errors else ""),
              flush=True)
    finally:
        if any(not f.done() for f in futures):  # a late worker must not outlive the wait
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def graph_of(fns):
    """fns (one per routing) captured in one CUDA graph; -> (replay, outputs of the captured calls)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [f() for f in fns]
    return g.replay, outs


def rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().mean() / ref.abs().mean().clamp_min(1e-30)).item()


def main():
    sh = Shapes() if GPU else TINY
    t_start = time.time()
    if GPU or "GG_PROBE_JOBS" in os.environ:  # on the CPU only when asked (a check of the plumbing)
        precompile(int(os.environ.get("GG_PROBE_JOBS", "12")))
    s = Setup(sh)
    d, i = sh.dim, sh.moe_inter
    n_routings = ROUTINGS if GPU else 2
    rows = []
    for t, cname, variants in PLAN:
        cfg = CONFIGS[cname]
        calls = s.routings(t, n_routings)
        active = sum(c[3] for c in calls) / len(calls)
        weight_bytes = {"up": active * 2 * i * d, "down": active * d * i, "moe": active * 3 * i * d}
        refs = {}
        for variant in variants:
            try:
                parts = flows(s, variant, cfg, t, n_routings)
                for part, fns in parts.items():
                    _use(variant)
                    if GPU:
                        replay, outs = graph_of(fns)
                        replay()
                        torch.cuda.synchronize()
                        ms = triton.testing.do_bench(replay, warmup=10, rep=60, return_mode="median") / len(fns)
                    else:
                        outs, ms = [f() for f in fns], float("nan")
                    if variant == "orig":
                        refs[part] = [o.clone() for o in outs]
                    ref = refs[part]
                    err = max(rel(o.float(), r.float()) for o, r in zip(outs, ref))
                    same = all(torch.equal(o, r) for o, r in zip(outs, ref))
                    finite = all(bool(torch.isfinite(o).all()) for o in outs)
                    us = ms * 1e3
                    floor_us = weight_bytes[part] / HBM_BW * 1e6
                    row = dict(t=t, part=part, config=cname, variant=variant, us=us, pct_floor=100 * floor_us / us,
                               err=err, same=same, finite=finite)
                    rows.append(row)
                    print(f"T={t} {part:<4} {cname:<11} {variant:<5} {us:7.2f} us  {row['pct_floor']:5.1f}% of "
                          f"floor  err {err:.2e} {'same bits' if same else ''}{'' if finite else ' NOT FINITE'}",
                          flush=True)
            except Exception as ex:  # noqa: BLE001 - a row that does not run is a result
                msg = f"{type(ex).__name__}: {str(ex)[:300]}"
                print(f"T={t} {cname} {variant}: FAILED {msg}", flush=True)
                rows.append(dict(t=t, config=cname, variant=variant, failed=msg))
    _use("orig")
    print(f"\n== gg_variant_probe ({'H200' if GPU else 'CPU interpreter, tiny shapes'}; us per call, "
          f"{n_routings} routings per CUDA graph; x = orig time / this; err vs orig at the same config)")
    base = {(r["t"], r["part"], r["config"]): r["us"] for r in rows if r.get("variant") == "orig" and "us" in r}
    print(f"{'T':>2} {'config':<11} {'variant':<6} | {'up us':>7} {'x':>5} {'err':>8} | {'down us':>7} {'x':>5} "
          f"{'err':>8} | {'moe us':>7} {'x':>5} {'err':>8} | bits")
    for t, cname, variants in PLAN:
        for variant in variants:
            got = {r["part"]: r for r in rows if (r["t"], r["config"], r["variant"]) == (t, cname, variant)
                   and "part" in r}
            if not got:
                print(f"{t:>2} {cname:<11} {variant:<6} | FAILED")
                continue
            cells = []
            for part in ("up", "down", "moe"):
                r = got[part]
                x = base.get((t, part, cname), float("nan")) / r["us"] if r["us"] == r["us"] else float("nan")
                cells.append(f"{r['us']:7.2f} {x:5.2f} {r['err']:8.1e}")
            bits = "same" if all(r["same"] for r in got.values()) else "differ"
            bad = "" if all(r["finite"] for r in got.values()) else " NOT FINITE"
            print(f"{t:>2} {cname:<11} {variant:<6} | " + " | ".join(cells) + f" | {bits}{bad}")
    print(f"total {time.time() - t_start:.1f} s")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gg_probe.json").write_text(json.dumps(dict(rows=rows), indent=1))


if __name__ == "__main__":
    main()
