"""Where MLA decode's time goes at issue #4's point (B=32, context 4096): the split kernel, the merge, the gap.

    python3 benchmarks/mla_merge_probe.py [--out DIR] [--sweep-only]

Why: the split kernel alone ran at 50.1 us under Nsight Compute (session 12, before session 16's rewrite), which
is ~72% of the copy bandwidth, while split + merge from a CUDA graph is 56.4 us (64%). This times, from CUDA
graphs at the split kernel's default config (pinned, 8 splits; the reduce kernel at its num_warps):
  split alone; split + reduce with the edges as captured; the same with the edge into the reduce kernel made
  programmatic (engines/cuda_graph_pdl.py: how the engine's decode graph runs on sm_90 by default) on both ports;
  the reduce alone over ready partials at 1 / 2 / 4 / 8 warps; the traced program's form (runtime splits, the new
  token beside the cache) with and without programmatic edges.
Then (SWEEP) split + reduce at pinned split-kernel configs, the registered ones and new ones (3 or 4 programs per SM
with L2 prefetch ahead of a one-buffer pipeline), at 8 splits and at the split count that makes one wave of them.
Why (session 27, the sm_90 SASS of the default BN32 w4 s3): it holds two KV buffers, and the next tile's cp.async is
issued only after the value wgmma has drained the buffer it overwrites, so a program has one tile in flight while it
computes; more bytes in flight per SM need more programs or L2 prefetches.
Each attention output (split + reduce) is checked against mla_decode_ref after its timing (the split-alone and
reduce-alone rows time parts and have no % of copy); the copy bandwidth is measured in the same run.
Timings: triton.testing.do_bench medians (one replay per sample, L2 flushed between samples).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from _timing import copy_tbps as device_copy_tbps  # sibling module of this script


# (BLOCK_N, num_warps, num_stages, PREFETCH, maxnreg[, PREFETCH_BULK[, variant]]), split counts. Shared memory per
# program at H=16 (sm_90 ptxas, session 27; KV buffers = num_stages - 1 at BN <= 32, one at BN64 s2): BN32 s3 91 KB
# (2 buffers, 2 per SM), BN32 s2 55 KB (1 buffer; 3 per SM at <= 168 registers), BN16 s3 55 KB (4 per SM at <= 128
# registers, 32 B spilled), BN16 s5 90.5 KB (4 buffers), BN64 s2 92 KB (1 buffer; w4 232 registers, w8 128).
SWEEP = [
    ((32, 4, 3, 0, None), (8,)),
    ((32, 4, 3, 0, None, 2), (8,)),  # kernels/mla_decode.py BULK_PREFETCH_CONFIGS
    ((32, 4, 3, 0, None, 4), (8,)),
    ((32, 4, 3, 0, None, 0, "lazy"), (8,)),  # kernels/mla_variants.py: the running max raised lazily
    ((32, 4, 3, 0, None, 2, "lazy"), (8,)),
    ((64, 4, 2, 2, None, 0, "lazy"), (8,)),
    ((32, 4, 3, 2, None), (8,)),
    ((32, 4, 3, 3, None), (8,)),
    ((32, 4, 3, 5, None), (8,)),
    ((64, 4, 2, 1, None), (8,)),
    ((64, 4, 2, 2, None), (8,)),
    ((64, 4, 2, 3, None), (8,)),
    ((64, 8, 2, 0, None), (8,)),
    ((64, 8, 2, 2, None), (8,)),
    ((64, 8, 2, 3, None), (8,)),
    ((64, 8, 3, 0, None), (8,)),
    ((32, 8, 3, 0, None), (8,)),
    ((32, 8, 3, 3, None), (8,)),
    ((32, 4, 2, 0, 168), (8, 12)),
    ((32, 4, 2, 2, 168), (8, 12)),
    ((32, 4, 2, 3, 168), (8, 12)),
    ((16, 4, 5, 0, None), (8,)),
    ((16, 4, 5, 6, None), (8,)),
    ((16, 4, 3, 4, 128), (8, 16)),
    ((16, 4, 3, 8, 128), (16,)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--sweep-only", action="store_true", help="only the config sweep")
    args = parser.parse_args()

    from dsv3_export.engines.cuda_graph_pdl import PdlPlan, capture_graph
    from dsv3_export.kernels import mla_decode as kd
    from dsv3_export.kernels._common import traceable
    from dsv3_export.kernels.mla_attention import mla_decode_ref
    from dsv3_export.kernels.pdl import GDC, waiting_kernel_names

    bsz, ctx, h, c, r, splits, scale = 32, 4096, 16, 512, 64, 8, 0.1
    g = torch.Generator(device="cuda").manual_seed(27)
    cache = torch.randn(bsz, ctx, c + r, device="cuda", dtype=torch.bfloat16, generator=g)
    kv, pe = cache[..., :c], cache[..., c:]
    q = torch.randn(bsz, h, c, device="cuda", dtype=torch.bfloat16, generator=g)
    qp = torch.randn(bsz, h, r, device="cuda", dtype=torch.bfloat16, generator=g)
    full = torch.full((bsz,), ctx, dtype=torch.int32, device="cuda")
    short = full - 1  # the traced form: the last key arrives beside the cache
    ref = mla_decode_ref(q.float(), qp.float(), kv.float(), pe.float(), full, scale)
    cache_bytes = bsz * ctx * (c + r) * 2

    copy_tbps = device_copy_tbps()
    floor_us = cache_bytes / (copy_tbps * 1e12) * 1e6
    waiting = waiting_kernel_names()
    print(f"copy {copy_tbps:.2f} TB/s; floor {floor_us:.1f} us (cache {cache_bytes / 1e6:.0f} MB); GDC={GDC}; "
          f"waiting kernels {len(waiting)}", flush=True)
    cfg = kd.DECODE_CONFIGS[0]
    rows = []

    def reduce(parts, warps=None):
        out = torch.empty((bsz, h, c), dtype=q.dtype, device="cuda")
        spec = kd.reduce_spec(parts, out)
        extra = {} if warps is None else {"num_warps": warps}
        traceable(spec.kernel)[spec.grid({})](*spec.args, **spec.kwargs, **extra)
        return out

    def split(**kw):
        return kd.mla_decode_partials(q, qp, kv, pe, full, scale, num_splits=splits, config=cfg, **kw)

    def traced_form():
        parts = kd.mla_decode_partials(q, qp, kv, pe, short, scale, kv_new=cache[:, -1, :c], pe_new=cache[:, -1, c:],
                                       runtime_splits=True, config=cfg)
        return reduce(parts)

    def point(name, record, port=None, check=True, whole=True):
        record()  # compile outside the graph
        torch.cuda.synchronize()
        plan = PdlPlan(port, waiting) if port else None
        graph, out, edges = capture_graph(record, plan)
        ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
        torch.cuda.synchronize()
        err = None
        if check:
            o = out if isinstance(out, torch.Tensor) else None
            err = ((o.float() - ref).abs().mean() / ref.abs().mean()).item() if o is not None else None
        us = ms * 1e3
        pct = 100 * floor_us / us if whole else None  # parts (the split or the reduce alone) are no attention
        row = dict(name=name, us=us, pct_of_copy=pct, err=err, edges=str(edges) if edges else "as captured")
        rows.append(row)
        print(f"{name:<58} {us:7.2f} us " + (f"{pct:5.1f}% of copy" if whole else " " * 16)
              + f"  err {err if err is None else f'{err:.2e}'}  [{row['edges']}]", flush=True)

    if not args.sweep_only:
        point("split alone (8 splits, BN32 w4 s3)", lambda: split(), check=False, whole=False)
        for warps in (None, 1, 2, 8):
            label = f"split + reduce (reduce w{warps or 'default'})"
            point(label, lambda w=warps: reduce(split(), w))
            if GDC:
                point(label + ", programmatic edge", lambda w=warps: reduce(split(), w), port="programmatic")
        if GDC:
            point("split + reduce, launch-port edge", lambda: reduce(split()), port="launch")
        parts = split()
        for warps in (None, 1, 2, 8):
            point(f"reduce alone over ready partials (w{warps or 'default'})", lambda w=warps: reduce(parts, w),
                  check=False, whole=False)
        point("traced form (runtime splits, new token beside the cache)", traced_form)
        if GDC:
            point("traced form, programmatic edges", traced_form, port="programmatic")
    for spec, split_counts in SWEEP:
        bn, warps, stages, prefetch, maxnreg, bulk, variant = (*spec, *(0, "pointer")[len(spec) - 5:])
        sweep_cfg = triton.Config({"BLOCK_N": bn, "PREFETCH": prefetch, "PREFETCH_BULK": bulk}, num_warps=warps,
                                  num_stages=stages, maxnreg=maxnreg)
        for n_splits in split_counts:
            name = (f"sweep {variant} {n_splits} splits BN{bn} w{warps} s{stages} P{prefetch}"
                    + (f" r{maxnreg}" * bool(maxnreg)) + (f" bulk{bulk}" * bool(bulk)))

            def record(c=sweep_cfg, s=n_splits, v=variant):
                return reduce(kd.mla_decode_partials(q, qp, kv, pe, full, scale, num_splits=s, config=c, variant=v))

            try:
                point(name, record)
            except Exception as exc:  # a config that does not fit: printed, the sweep goes on
                print(f"{name}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "mla_merge_probe_sweep.json" if args.sweep_only else "mla_merge_probe.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(dict(copy_tbps=copy_tbps, floor_us=floor_us, gpu=torch.cuda.get_device_name(),
                           torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
