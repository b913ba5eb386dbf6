"""Which tile and split-K make the decode fp8 GEMM (kernels/fp8_gemm.py) fastest, against blockwise `_scaled_mm`?

Issue #4's decode rows at the 16b MLP shapes had the autotuned Triton GEMM at 0.96-0.97x of cuBLAS for w1/w3
(N=10944 K=2048: 171 tiles of 64 columns on 132 SMs, split_k 1 by _choose_split_k), both far from the weight read's
floor (22.4 MB: 5.3 us at 4.2 TB/s, measured 12.8-13.7 us). The autotuner times eager calls, which on a slow host
measure the host's launch path as much as the kernel. This probe pins every candidate (DECODE_CONFIGS plus a few
more) at every split of K in SPLITS, captures each in a CUDA graph and times them all round-robin with blockwise
`_scaled_mm` (benchmarks/_timing.py interleaved_ms, the L2 emptied by a 256 MiB read before each sample), per M.
Every candidate is checked against fp8_gemm_ref rounded to bf16 on what its graph wrote (mean rel. < 1e-3). A torch
sum over the weight's bytes, timed the same way, shows what torch's own read of that size costs here.
kernels/fp8_gemv.py's GEMV (act_quant of bf16 x in registers, so it does more than the GEMM it is compared with)
runs at M <= 2.

    python benchmarks/fp8_decode_probe.py [--rounds 3] [--ms 1,16,64] [--out DIR]
Prints, per shape and M, the candidates fastest first as ratios against blockwise `_scaled_mm` (median of the
per-round ratios, the range beside it), and writes fp8_decode_probe.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _timing, kbench

from _timing import interleaved_ms  # noqa: E402
from kbench.common import mean_rel  # noqa: E402

SHAPES = {"w1/w3": (10944, 2048), "w2": (2048, 10944)}
SPLITS = {"w1/w3": (1, 2, 3, 4), "w2": (4, 6, 8, 11)}
# Beyond DECODE_CONFIGS: more warps or stages per CTA for the same tiles (more bytes in flight per SM).
EXTRA_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 8}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 8}, num_warps=2, num_stages=8),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=8),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=8, num_stages=6),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "GROUP_M": 8}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
]


def _candidates(m: int, label: str, configs):
    """(config, split) for every config whose BLOCK_M suits M (16 rows up to M=16, 32 or 64 from M=16), at every
    split of K in SPLITS."""
    for cfg in configs:
        block_m = cfg.kwargs["BLOCK_M"]
        if (block_m == 16 and m > 16) or (block_m > 16 and m < 16):
            continue
        for split in SPLITS[label]:
            yield cfg, split


def probe_shape(label: str, m: int, rounds: int, flush: str) -> list[dict]:
    """Every candidate at one shape and M, with blockwise _scaled_mm, the GEMV (M <= 2) and torch's read of the
    weight, from CUDA graphs round-robin: one row each, fastest first."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels import fp8_gemv as V
    from dsv3_export.reference import fp8 as R
    from kbench.common import _graph_of
    from kbench.fp8 import _blockwise_operands, _scaled_mm_blockwise

    n, k = SHAPES[label]
    torch.manual_seed(m * 7 + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a, a_s = R.act_quant(x)
    w, w_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)
    ref = G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32).to(torch.bfloat16).float()  # as a bf16 c rounds it
    a_p, s_a, w_p, s_b = _blockwise_operands(a, a_s, w, w_s)
    fns, outputs, meta = {}, {}, {}

    def add(name, fn, info):
        written: list = []
        fns[name] = _graph_of(fn, written).replay
        outputs[name] = written
        meta[name] = info

    add("torch._scaled_mm blockwise", lambda: _scaled_mm_blockwise(a_p, s_a, w_p, s_b), {"kind": "baseline"})
    # what reading the weight's bytes alone costs torch, timed the same way (not a bound: the GEMMs read faster)
    add("reference read: torch sum over the weight's bytes", lambda: w.view(torch.float32).sum(), {"kind": "floor"})
    add("fp8_gemm autotuned (the launcher's choice)", lambda: G.fp8_gemm(a, a_s, w, w_s, shape_class="decode"),
        {"kind": "ours", "split": None})
    for cfg, split in _candidates(m, label, list(G.DECODE_CONFIGS) + EXTRA_CONFIGS):
        tiles = -(-m // cfg.kwargs["BLOCK_M"]) * -(-n // cfg.kwargs["BLOCK_N"])
        name = f"{G.config_label(cfg)} split {split} ({tiles * split} CTAs)"
        add(name, lambda cfg=cfg, split=split: G.fp8_gemm(a, a_s, w, w_s, split_k=split, config=cfg,
                                                           shape_class="decode"),
            {"kind": "ours", "split": split, "config": G.config_label(cfg), "ctas": tiles * split})
    if m <= V.GEMV_MAX_ROWS:
        for cfg in V.GEMV_CONFIGS:
            add(f"fp8_gemv (act_quant inside) {cfg.kwargs} w{cfg.num_warps}",
                lambda cfg=cfg: V.fp8_gemv(x, w, w_s, torch.bfloat16, config=cfg), {"kind": "gemv"})
    torch.cuda.synchronize()
    times = interleaved_ms(fns, flush, rounds=rounds)
    base = times["torch._scaled_mm blockwise"]
    rows = []
    for name, ms in times.items():
        err = 0.0 if meta[name]["kind"] == "floor" else mean_rel(outputs[name][0][:m], ref)
        ratios = sorted(b / t for b, t in zip(base, ms))
        rows.append({"shape": label, "m": m, "n": n, "k": k, "impl": name, "ms": statistics.median(ms),
                     "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
                     "err": err, "ok": err < (5e-3 if meta[name]["kind"] == "gemv" else 1e-3), **meta[name]})
    return sorted(rows, key=lambda r: -r["ratio_median"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ms", default="1,16,64")
    parser.add_argument("--shapes", default="w1/w3,w2")
    parser.add_argument("--flush", default="read")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    all_rows = []
    for label in args.shapes.split(","):
        for m in (int(v) for v in args.ms.split(",")):
            t0 = time.time()
            rows = probe_shape(label, m, args.rounds, args.flush)
            all_rows += rows
            print(f"\n{label} M={m} ({time.time() - t0:.0f} s): ratio = blockwise _scaled_mm / candidate", flush=True)
            for r in rows:
                flag = "" if r["ok"] else f"  WRONG err {r['err']:.2e}"
                print(f"  {r['ratio_median']:.3f}x ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})  {r['ms'] * 1e3:7.2f} us"
                      f"  {r['impl']}{flag}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_decode_probe.json").write_text(json.dumps(all_rows, indent=1))


if __name__ == "__main__":
    main()
