"""Export the 16b preset on the meta device and run every pass: wall time and peak RSS.

    .venv/bin/python benchmarks/export_16b_meta.py [--preset 16b] [--kinds prefill,decode] [--n-layers N]

No weight is materialized (meta device), so this measures the compiler itself: torch.export and
the pass pipeline on a 27-layer, 64-expert graph (--n-layers: the preset's first N layers, e.g. the
dense one and two MoE ones, at a fraction of the time). Prints one line per stage and per pass.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from dsv3_export.export import export_step
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.pipeline import run_pipeline
from dsv3_export.reference import ModelArgs, Transformer


def peak_rss_gib() -> float:
    """This process's peak resident set since it started. Linux: VmHWM, which exec resets; ru_maxrss is
    not reset by exec and so reported the forking parent's RSS (a pytest-xdist worker's 1.5 GiB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="16b")
    parser.add_argument("--kinds", default="prefill,decode")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp8"))
    parser.add_argument("--n-layers", type=int, default=None, help="default: the preset's")
    args = parser.parse_args(argv)
    model_args = ModelArgs.preset(args.preset)
    if args.n_layers is not None:
        model_args = model_args.replace(n_layers=args.n_layers)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    start = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(model_args, dtype=dtype).eval()
    print(f"build on meta: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        program = export_step(model, kind)
        t1 = time.perf_counter()
        print(f"{args.preset} {kind}: export {t1 - t0:.1f} s, {len(program.graph.nodes)} nodes, "
              f"peak RSS {peak_rss_gib():.2f} GiB")
        program, reports = run_pipeline(program, PassConfig(precision=args.precision))
        for r in reports:
            print(f"  {r.summary()}")
        print(f"{args.preset} {kind}: passes {time.perf_counter() - t1:.1f} s, {len(program.graph.nodes)} nodes, "
              f"peak RSS {peak_rss_gib():.2f} GiB")
    print(f"total {time.perf_counter() - start:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
