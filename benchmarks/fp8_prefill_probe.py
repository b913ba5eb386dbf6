"""Experiments on the fp8 prefill GEMM against cuBLAS: candidate forms of the Gluon kernel, timed and clocked.

Candidates (--impls) against blockwise torch._scaled_mm (issue #4's baseline) at the 16b prefill shapes (M=4096),
all captured in CUDA graphs and timed round-robin (kbench.fp8.several_against_blockwise_in_graphs):
  ws      the product kernel (kernels/fp8_gemm_gluon_ws.py) on outer-dim-major activation scales, made once outside
          the timing as they are for _scaled_mm (act_quant(..., outer_scales=True) writes them so)
  ws_row  the same on act_quant's default row-major scales: each call copies them outer-dim-major first
Session 33's 2-CTA TMA multicast kernel and session 34's outer-dim-major global scale loads were candidates here too
(benchmarks/RESULTS.md); the code of the first is at commit 194e0ab.
--clocks N then replays each GEMM back to back for N s while nvidia-smi samples the SM clock and the board power:
at these shapes the H200 holds ~630 W and lowers its clock, so a kernel's time is its cycles over the clock its
energy per cycle leaves it (session 33).
Each candidate is first checked on ragged shapes, with several tiles per program, against fp8_gemm_ref (a wrong
barrier protocol hangs or is wrong there: run it under `timeout`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import triton

# (label, N, K) at M=4096: the dense FFN's w1/w3 and w2, the attention's fused wq+wkv_a, wo, and wkv_a alone
SHAPES = (("w1/w3", 10944, 2048), ("w2", 2048, 10944), ("wq+wkv_a", 3648, 2048), ("wo", 2048, 2048),
          ("wkv_a", 576, 2048))
# (M, N, K, programs): ragged edges in every dimension; programs=2 puts several tiles on each program
CHECKS = ((200, 264, 400, None), (300, 136, 1296, 2), (513, 576, 2048, 3), (4096, 2048, 10944, None))


IMPLS = ("ws", "ws_row")


def candidate(name: str, a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, programs=None):
    """A call of candidate `name` on these operands (its scale layout prepared here, outside any timing)."""
    from dsv3_export.kernels.fp8_gemm_gluon import fp8_gemm_gluon
    from dsv3_export.kernels.fp8_gemm_gluon_ws import scales_for_tma

    if name not in IMPLS:
        raise ValueError(f"unknown candidate {name!r}; expected one of {IMPLS}")
    scales = scales_for_tma(a_s) if name == "ws" else a_s
    return lambda out_dtype=torch.bfloat16: fp8_gemm_gluon(a, scales, w, w_s, out_dtype, programs=programs)


def check(impls: list[str], tol: float) -> list[dict]:
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.reference import fp8 as R
    from kbench.common import mean_rel

    rows = []
    for m, n, k, programs in CHECKS:
        torch.manual_seed(m + n + k)
        a, a_s = R.act_quant(torch.randn(m, k, device="cuda") * 2)
        w, w_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)
        ref = G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
        for name in impls:
            call = candidate(name, a, a_s, w, w_s, programs)
            for out_dtype in (torch.float32, torch.bfloat16):
                out = call(out_dtype)
                torch.cuda.synchronize()
                err = mean_rel(out, ref)
                ok = bool(torch.isfinite(out).all()) and err < (tol if out_dtype == torch.float32 else 1e-2)
                rows.append(dict(impl=name, m=m, n=n, k=k, programs=programs, out=str(out_dtype), err=err, ok=ok))
                print(f"check {name} M={m} N={n} K={k} programs={programs} {out_dtype}: mean rel err {err:.2e} "
                      f"{'ok' if ok else 'FAILED'}", flush=True)
    return rows


def timed(impls: list[str], rounds: int) -> list[dict]:
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.reference import fp8 as R
    from kbench.common import mean_rel
    from kbench.fp8 import several_against_blockwise_in_graphs

    rows = []
    for label, n, k in SHAPES:
        m = 4096
        torch.manual_seed(n + k)
        w, w_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)
        a, a_s = R.act_quant(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        ref = G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
        candidates = {name: candidate(name, a, a_s, w, w_s) for name in impls}
        base_ms, results = several_against_blockwise_in_graphs(a, a_s, w, w_s, candidates, rounds, "read")
        row = dict(case=label, m=m, n=n, k=k, rounds=rounds, blockwise_ms=statistics.median(base_ms),
                   times=dict(blockwise=base_ms))
        line = f"{label:9s} blockwise {row['blockwise_ms']:.4f} ms"
        for name, (ms, ratios, written) in results.items():
            row[f"{name}_ms"] = statistics.median(ms)
            row[f"{name}_ratio"] = statistics.median(ratios)
            row[f"{name}_ratio_range"] = [ratios[0], ratios[-1]]
            row[f"{name}_graph_err"] = mean_rel(written, ref)  # what the timed replays wrote (bf16 c)
            row["times"][name] = ms
            line += (f" | {name} {row[f'{name}_ms']:.4f} ms {row[f'{name}_ratio']:.3f}x ({ratios[0]:.3f}-"
                     f"{ratios[-1]:.3f}) err {row[f'{name}_graph_err']:.1e}")
        rows.append(row)
        print(line, flush=True)
    return rows


def _smi_samples(lines: list[str]) -> list[tuple[float, float, float]]:
    """(unix time, SM MHz, W) from nvidia-smi's csv lines: timestamp, clocks.sm, power.draw."""
    import datetime

    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        try:
            when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((when, float(parts[1].split()[0]), float(parts[2].split()[0])))
        except (ValueError, IndexError):
            continue
    return out


def clocks(impls: list[str], seconds: float, out_dir: str | None) -> list[dict]:
    """Each GEMM's CUDA graph replayed back to back for `seconds` (no L2 flush: the steady state of a long prefill),
    after 1 s idle, while nvidia-smi samples this GPU's SM clock and board power every 50 ms into a file: us per
    call, mean MHz and W, and cycles per call (us x MHz), all over the middle 80% of each run (the clock settles
    after the start). The order of the GEMMs is one pass, then the reverse (ABBA), so that heat favours none.
    Equal cycles at unequal clocks and equal power: one kernel spends more energy per cycle, which the power cap
    turns into clock."""
    import subprocess
    import tempfile
    import time

    from dsv3_export.reference import fp8 as R
    from kbench.common import _graph_of
    from kbench.fp8 import _blockwise_operands, _scaled_mm_blockwise

    log = os.path.join(out_dir or tempfile.mkdtemp(), "nvidia_smi_clocks.csv")
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    gpu = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    smi = subprocess.Popen(["nvidia-smi", f"--id={gpu}", "--query-gpu=timestamp,clocks.sm,power.draw",
                            "--format=csv,noheader", "-lms", "50", "-f", log])
    phases = []
    try:
        for label, n, k in SHAPES[:2]:
            m = 4096
            w, w_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)
            a, a_s = R.act_quant(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            a_p, s_a, w_p, s_b = _blockwise_operands(a, a_s, w, w_s)
            fns = {"blockwise": lambda: _scaled_mm_blockwise(a_p, s_a, w_p, s_b)}
            fns.update({name: candidate(name, a, a_s, w, w_s) for name in impls})
            graphs = {name: _graph_of(fn) for name, fn in fns.items()}
            for name in list(graphs) + list(graphs)[::-1]:
                time.sleep(1.0)
                marks = [(time.time(), 0)]  # (wall time, calls done) at each synchronize
                while marks[-1][0] - marks[0][0] < seconds:
                    for _ in range(50):
                        graphs[name].replay()
                    torch.cuda.synchronize()
                    marks.append((time.time(), marks[-1][1] + 50))
                phases.append(dict(case=label, impl=name, marks=marks))
    finally:
        time.sleep(0.2)
        smi.terminate()
        smi.wait()
    with open(log) as f:
        samples = _smi_samples(f.read().splitlines())
    rows = []
    for ph in phases:
        marks = ph["marks"]
        span = marks[-1][0] - marks[0][0]
        lo, hi = marks[0][0] + 0.1 * span, marks[-1][0] - 0.1 * span
        window = [mark for mark in marks if lo <= mark[0] <= hi]
        inside = [(mhz, w) for when, mhz, w in samples if lo <= when <= hi]
        if len(window) < 2 or len(inside) < 0.5 * (hi - lo) / 0.05:  # nvidia-smi should have ~20 samples a second
            raise RuntimeError(f"clocks: {ph['case']} {ph['impl']}: {len(inside)} nvidia-smi samples and "
                               f"{len(window)} timing marks in {hi - lo:.1f} s ({log})")
        us = (window[-1][0] - window[0][0]) / (window[-1][1] - window[0][1]) * 1e6
        mhz = statistics.mean(v for v, _ in inside)
        watts = statistics.mean(w for _, w in inside)
        row = dict(case=ph["case"], impl=ph["impl"], us=us, mhz=mhz, watts=watts, samples=len(inside),
                   kcycles=us * mhz / 1e3)
        rows.append(row)
        print(f"clocks {row['case']:6s} {row['impl']:9s} {us:7.1f} us/call at {mhz:6.0f} MHz, {watts:5.0f} W "
              f"({len(inside)} samples): {row['kcycles']:6.1f} kcycles/call", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--impls", default="ws,ws_row", help=f"comma-separated candidates among {IMPLS}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--clocks", type=float, default=0.0,
                        help="also replay each GEMM back to back this many seconds with nvidia-smi sampling clocks")
    parser.add_argument("--tol", type=float, default=1e-3, help="mean relative error bound of the fp32 checks")
    args = parser.parse_args()
    impls = [name for name in args.impls.split(",") if name]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown or not impls:
        parser.error(f"--impls {args.impls!r}: unknown {unknown}; expected some of {IMPLS}")

    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, impls=impls,
                  checks=check(impls, args.tol))
    if not all(r["ok"] for r in result["checks"]):
        raise SystemExit("fp8_prefill_probe: a check failed; not timing")
    if not args.check_only and args.rounds:
        result["rows"] = timed(impls, args.rounds)
    if args.clocks and not args.check_only:
        result["clocks"] = clocks(impls, args.clocks, args.out)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "fp8_prefill_check.json" if args.check_only else "fp8_prefill_probe.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
