"""Benchmark the Triton kernels on one GPU at the 16b shapes, against the best torch alternative.

One invocation = one GPU call (H200, torch 2.11, triton 3.6). For every kernel it first checks
correctness on the GPU at the real shapes (against the pure-torch references), then times it with
do_bench's method (benchmarks/_timing.py median_ms: the median of single calls, each after the L2 is emptied; by
a 256 MiB read, or with --l2-flush zero by do_bench's own zeroing, which leaves dirty lines whose write-back the timed
call pays, ~9 us on the H200: benchmarks/l2_flush_probe.py) and reports: time, achieved TB/s or TFLOP/s, the
roofline floor (max(bytes / HBM_BW, flops / peak)) and the ratio to the best alternative timed in the same run:
  fp8 GEMM      torch._scaled_mm with 1x128 x 128x128 block scales (per-tensor scales if the
                blockwise form is refused, and the row says so). For a K that is not a multiple
                of 512 (10944) its operands are zero-padded to the next multiple (outside the
                timing): cuBLAS wants the 128x128 scales' rows round_up(K/128, 4) apart, which
                torch 2.11 did not enforce (mean rel err 2.27 before). M=1 is padded to 16 rows
                (cuBLAS refused it). Zero rows and columns add nothing to the product.
                At the prefill M the Hopper candidates fp8_gemm(variant="gluon") (GPU-only: Gluon
                has no interpreter) and variant="tma_persistent" are checked and timed too, the
                latter's configs each pinned, then autotuned (rows "triton fp8 tma").
                At decode M, fp8_linear's fused path (the GEMM quantizes x itself, one launch) is
                checked and timed beside act_quant + gemm, eagerly and from a CUDA graph.
  fp8 prefill   (--only fp8_prefill; < 60 s) the same baseline at M=4096 (w1/w3, w2; with --full also the
                attention's wq+wkv_a, wo and wkv_a) vs every PREFILL_CANDIDATES config of
                kernels/fp8_gemm_persistent.py pinned (one compile each, no autotuning) and the
                GLUON_CANDIDATES of kernels/fp8_gemm_gluon.py, each checked on its timed bf16 output
                (mean rel. < 1e-3); then the baseline, the Gluon default and fp8_gemm's Triton kernel again
                from CUDA graphs, timed in alternation for 3 rounds (7 with --full): the per-round ratio is
                the acceptance figure.
  grouped GEMM  torch._grouped_mm (bf16), MoE end to end with it
  MLA decode    the eager absorbed einsum math and F.scaled_dot_product_attention; mla_decode is
                also timed as a CUDA-graph replay (its kernels without Python launch cost), and at
                B=32 over forced split counts (each autotuned and checked; the fastest is tabled); the
                traced program's form (cache + kv_new) with the split count chosen in the
                kernels (runtime_splits) and with the fixed 8 splits it used before
  MLA sweep     (mla_sweep, < 60 s) mla_decode's variants (early loads) and split counts, each
                pinned, from CUDA graphs: % of copy bandwidth and error (MLA_SWEEP)
  act_quant     eager torch
  MoE router    (router) kernels/topk.py router_topk against torch's softmax + topk + gather + cat
  GEMV          (gemv, ~9 min on a cold cache: 12 configs compiled per K, K=10944 unrolled) kernels/fp8_gemv.py against
                act_quant + the decode GEMM (ours: the chain the decode program runs), Linears and the MoE at M <= 4;
                the attention Linears at M=1 also with the weight read from HBM (graphs cycling through 128 MB of
                copies: the other sections repeat one weight, which stays in the 50 MB L2 when small)
  norms         (norms) the decode step's attention norm (residual add + RMSNorm) in the GEMV's prologue against
                kernels/rms_norm.py's norm kernel before the same GEMV (ours both)
Device copy bandwidth is measured in the same run. Every section is guarded: an error prints and
the script continues. The default run (fewer shapes, short timing) fits in about 4 minutes of
GPU time including autotuning on a cold Triton cache; `--full` runs every shape with longer timing.

    python benchmarks/kernels.py [--full] [--only copy,quant,fp8,moe,mla,router] [--budget-s 180 (--full: 480)]
                                 [--l2-flush read]
Writes kernels.json and kernels.md to $OUT (after every section) when it is set. The first call of
each kernel autotunes it (compiles and times every config per shape key); --only splits a --full
run into smaller calls. The summary table is printed last (a remote runner may keep only the tail).

The sections live in benchmarks/kbench/, one module per kernel family (common.py: shapes, rows,
timing and checking helpers; fp8.py: fp8, fp8_prefill; quant.py: quant; router.py: router; mla.py:
mla; mla_sweep.py; mla_proj.py: absorb; moe.py: moe, moe_cfg; gemv.py: gemv; norms.py: norms); this
file keeps the command line, the section order (SECTIONS) and the reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

# benchmarks/ on the path: kbench/ beside this script, also when it is loaded by path (the tests) or run from elsewhere
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from kbench.common import (BF16_PEAK, FP8_PEAK, HBM_BW, TINY, Report, Shapes,  # noqa: E402 - needs the path above
                           _bootstrap_imports, bench_copy)
# _blockwise_operands and _pad_k: tests/kernels/test_benchmark_script.py checks them as attributes of this script
from kbench.fp8 import _blockwise_operands, _pad_k, bench_fp8_gemm, bench_fp8_prefill  # noqa: E402, F401
from kbench.gemv import bench_decode_cold, bench_gemv  # noqa: E402
from kbench.mla import bench_mla  # noqa: E402
from kbench.mla_proj import bench_absorb  # noqa: E402
from kbench.mla_sweep import bench_mla_sweep  # noqa: E402
from kbench.moe import bench_moe, bench_moe_configs  # noqa: E402
from kbench.norms import bench_norms  # noqa: E402
from kbench.quant import bench_act_quant  # noqa: E402
import kbench.common as kbench_common  # noqa: E402
from _timing import L2_FLUSHES  # noqa: E402
from kbench.router import bench_router  # noqa: E402


# --full's default budget: session 34's acceptance sections (copy, quant, router, absorb, mla, moe, fp8_prefill,
# fp8) took ~330 s on the H200; 180 s stopped them before fp8_prefill.
FULL_BUDGET_S = 480.0

SECTIONS = {  # cheap sections first: if the time budget runs out, the expensive autotuning goes last
    "copy": ("device copy bandwidth", bench_copy),
    "quant": ("fp8 act_quant / weight_dequant", bench_act_quant),
    "router": ("MoE softmax router in one launch", bench_router),
    "absorb": ("MLA absorbed projections (W_UK, W_UV per head)", bench_absorb),
    "mla": ("MLA absorbed attention", bench_mla),
    "mla_sweep": ("MLA decode variants (early loads, splits), pinned configs, CUDA graphs", bench_mla_sweep),
    "moe": ("MoE: grouped GEMM + fused MoE", bench_moe),
    "moe_cfg": ("grouped GEMM configs at decode (fp8, 16b MoE)", bench_moe_configs),
    "gemv": ("fp8 GEMV with act_quant in registers vs act_quant + tile GEMM, Linears and MoE at M <= 4 (CUDA graphs)",
             bench_gemv),
    "decode_cold": ("batch-1 decode reads from HBM: the GEMV's configs, the MoE gate cuBLAS vs split (CUDA graphs)",
                    bench_decode_cold),
    "norms": ("residual add + RMSNorm inside the GEMV vs a norm kernel before it (CUDA graphs)", bench_norms),
    "fp8_prefill": ("fp8 blockwise GEMM at prefill M: TMA candidates, pinned", bench_fp8_prefill),
    "fp8": ("fp8 blockwise GEMM", bench_fp8_gemm),
}


# --------------------------------------------------------------------------------------------
# output


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def to_markdown(report: Report) -> str:
    lines = [f"# Kernel benchmark on {report.device}", "",
             f"versions: {report.versions}; L2 flush between samples: {report.l2_flush}; "
             f"device copy {_fmt(report.copy_tbps, '.2f')} TB/s; floors use "
             f"{HBM_BW / 1e12:.1f} TB/s, {FP8_PEAK / 1e12:.0f} TFLOP/s fp8, {BF16_PEAK / 1e12:.0f} TFLOP/s bf16", "",
             "| section | case | impl | ms | TFLOP/s | TB/s | floor ms | floor/time | speedup vs best torch | err (tol) | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in report.rows:
        check = "-" if r.error is None else f"{r.error:.2e} ({r.tol:g}) {'ok' if r.ok else 'FAIL'}"
        lines.append(f"| {r.section} | {r.case} | {r.impl} | {_fmt(r.ms, '.4f')} | {_fmt(r.tflops, '.1f')} | "
                     f"{_fmt(r.tbps, '.2f')} | {_fmt(r.floor_ms, '.4f')} | {_fmt(r.frac_of_roofline, '.2f')} | "
                     f"{_fmt(r.speedup_vs_best_alt, '.2f')} | {check} | {r.note} |")
    if report.failures:
        lines += ["", "## failures", *[f"- {f}" for f in report.failures]]
    return "\n".join(lines) + "\n"


def print_table(report: Report) -> None:
    """The summary, compact (~110 characters a row) so that a tail of ~12k characters holds it."""
    print(f"\n{'case':<40} {'impl':<34} {'ms':>9} {'TF/s':>7} {'TB/s':>5} {'%roof':>5} {'vs best':>7} check")
    for r in report.rows:
        check = "" if r.ok is None else ("ok" if r.ok else f"FAIL err={r.error:.2e}")
        print(f"{r.case[:40]:<40} {r.impl[:34]:<34} {_fmt(r.ms, '9.4f')} {_fmt(r.tflops, '7.1f')} "
              f"{_fmt(r.tbps, '5.2f')} "
              f"{_fmt(None if r.frac_of_roofline is None else 100 * r.frac_of_roofline, '5.1f')} "
              f"{_fmt(r.speedup_vs_best_alt, '7.2f')} {check}")
    for f in report.failures:
        print("FAILED:", f[:240])


def write_reports(report: Report, out: Path) -> None:
    """kernels.json + kernels.md, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(device=report.device, versions=report.versions, l2_flush=report.l2_flush, copy_tbps=report.copy_tbps,
                   ceilings=dict(hbm_bw=HBM_BW, fp8_peak=FP8_PEAK, bf16_peak=BF16_PEAK),
                   rows=[asdict(r) for r in report.rows], failures=report.failures)
    for name, text in (("kernels.json", json.dumps(payload, indent=1)), ("kernels.md", to_markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def run_section(report: Report, key: str, sh: Shapes, quick: bool) -> None:
    """One guarded section: an exception is printed and recorded, and the run goes on."""
    title, fn = SECTIONS[key]
    t0 = time.time()
    print(f"\n== {title}", flush=True)
    try:
        fn(report, sh, quick)
    except Exception as e:  # noqa: BLE001 - a benchmark section must never stop the run
        msg = f"{title}: {type(e).__name__}: {e}"
        report.failures.append(msg)
        print("SECTION FAILED:", msg, flush=True)
        traceback.print_exc()
    print(f"   ({time.time() - t0:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="every shape, longer timing (the default run is the ~4-minute quick set)")
    parser.add_argument("--quick", action="store_true", help="the default; kept for old command lines")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new section after this many seconds (default: 180, a ~4-minute run; with "
                             f"--full {FULL_BUDGET_S:.0f}, so that issue #4's sections fit one 600 s device call)")
    parser.add_argument("--l2-flush", choices=L2_FLUSHES, default="read",
                        help="how the L2 is emptied before each timed sample: read (clean lines, the default) or zero "
                             "(triton.testing.do_bench's, dirty lines; every run before session 28)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU through TRITON_INTERPRET=1: checks the script, times nothing useful")
    args = parser.parse_args(argv)
    if args.full and args.quick:
        parser.error("--full and --quick contradict each other")
    quick = not args.full
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        sh = TINY
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (or --cpu-smoke).", file=sys.stderr)
        return 2
    else:
        sh = Shapes()
    if quick:
        sh = dataclasses.replace(sh, decode_m=sh.decode_m[:1] + sh.decode_m[-1:], mla_decode=sh.mla_decode[:2])
    _bootstrap_imports()
    import triton

    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if sh.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.multi_processor_count} SMs)"
    else:
        device = "CPU smoke test (TRITON_INTERPRET=1, tiny shapes)"
    kbench_common.L2_FLUSH = args.l2_flush
    if args.budget_s is None:
        args.budget_s = FULL_BUDGET_S if args.full else 180.0
    report = Report(device=device, l2_flush=args.l2_flush,
                    versions=dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda))
    print(f"{report.device}; {report.versions}; L2 flush {report.l2_flush}", flush=True)
    t0 = time.time()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    for key in [k for k in SECTIONS if k in wanted]:
        if time.time() - t0 > args.budget_s:
            msg = f"{SECTIONS[key][0]}: skipped, the {args.budget_s:.0f} s budget was spent"
            report.failures.append(msg)
            print(msg, flush=True)
            continue
        run_section(report, key, sh, quick)
        if out_dir:  # after every section, so a run killed at its time limit still leaves results
            write_reports(report, out_dir)
    if out_dir:
        write_reports(report, out_dir)
        print(f"wrote {out_dir / 'kernels.json'} and {out_dir / 'kernels.md'}")
    print(f"total {time.time() - t0:.0f} s on {report.device}; {report.versions}; L2 flush {report.l2_flush}",
          flush=True)
    print_table(report)  # last: the device runner returns only the tail of stdout
    wrong = [r for r in report.rows if r.ok is False]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
