"""How the L2 flush between timed samples changes the MLA decode's share of the copy bandwidth (issue #4's target).

triton.testing.do_bench empties the L2 by zeroing a 256 MiB buffer, which leaves it full of dirty lines: the timed
call's first reads evict them and wait for their write-back (up to ~50 MB). Session 27's read probe saw a flat read of
the 151 MB cache reach only 78.5% of the copy bandwidth, which a fixed ~10 us per call would explain. This probe times
the same calls three ways in one run (benchmarks/_timing.py):
  zero    do_bench's flush (the L2 left dirty), as every earlier MLA figure;
  read    a 256 MiB read instead (the L2 left clean, as in a decode step whose earlier kernels write kilobytes);
  rotate  N_ROTATE distinct caches read one after the other in one CUDA graph (N_ROTATE x 151 MB does not fit the
          L2), per call; a read flush before each group, none between its calls: the steady state of a model whose
          layers each read their own cache.
Rows: the copy the target divides by (512 MiB each way, eager as in kernels.py, and the cache's size), a flat read
of the cache (no math), and mla_decode at batch 32, context 4096 (the default config, split + reduce, from a CUDA
graph), checked against mla_decode_ref.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from _timing import L2_FLUSHES, copy_tbps, median_ms  # sibling modules of this script
from mla_read_probe import _flat_read

N_ROTATE = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()

    from dsv3_export.kernels.mla_attention import mla_decode_ref
    from dsv3_export.kernels.mla_decode import mla_decode

    bsz, ctx, h, c, r, scale = 32, 4096, 16, 512, 64, 0.1
    g = torch.Generator(device="cuda").manual_seed(28)
    caches = [torch.randn(bsz, ctx, c + r, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(N_ROTATE)]
    q = torch.randn(bsz, h, c, device="cuda", dtype=torch.bfloat16, generator=g)
    qp = torch.randn(bsz, h, r, device="cuda", dtype=torch.bfloat16, generator=g)
    seqlens = torch.full((bsz,), ctx, dtype=torch.int32, device="cuda")
    cache_bytes = caches[0].numel() * 2

    def attend(cache):
        return mla_decode(q, qp, cache[..., :c], cache[..., c:], seqlens, scale)

    block = 8192  # session 27's best flat read: 16 KB per program, 4 warps
    flat_out = torch.empty(caches[0].numel() // block, device="cuda", dtype=torch.float32)

    def flat(cache):
        _flat_read[(cache.numel() // block,)](cache, flat_out, BLOCK=block, num_warps=4)
        return flat_out

    def copier(nbytes):
        src = torch.empty(N_ROTATE, nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return lambda i: dst[i].copy_(src[i])

    def runner(calls, graphed):
        """One callable running calls in order: replaying a CUDA graph of them, or eagerly (the copies: a captured
        copy_ becomes a graph memcpy node, which session 28's first run timed at 2.7 TB/s against 4.2 eagerly)."""
        outs = [call() for call in calls]  # compile / autotune outside the capture
        torch.cuda.synchronize()
        if not graphed:
            return lambda: [call() for call in calls], outs
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [call() for call in calls]
        return graph.replay, outs

    rows = []

    def measure(name, one, nbytes, graphed=True, check=None):
        """one(i) runs the call on buffer i; times buffer 0 under each flush, then all N_ROTATE back to back."""
        row = dict(name=name, bytes=nbytes, graphed=graphed)
        run, outs = runner([lambda: one(0)], graphed)
        for flush in L2_FLUSHES:
            row[f"us_{flush}"] = median_ms(run, flush, samples=args.samples) * 1e3
        if check is not None:
            row["err"] = check(outs[0], 0)
        run, outs = runner([lambda i=i: one(i) for i in range(N_ROTATE)], graphed)
        row["us_rotate"] = median_ms(run, "read", samples=args.samples) * 1e3 / N_ROTATE
        if check is not None:
            row["err"] = max(row["err"], max(check(o, i) for i, o in enumerate(outs)))
        rows.append(row)
        return row

    def attention_error(out, i):
        cache = caches[i]
        ref = mla_decode_ref(q.float(), qp.float(), cache[..., :c].float(), cache[..., c:].float(), seqlens, scale)
        return ((out.float() - ref).abs().mean() / ref.abs().mean()).item()

    big_copy = copier(1 << 29)
    for _ in range(500):  # ~0.2 s of copies first: session 28's first run read 2.7 TB/s when the copy was timed first
        big_copy(0)
    torch.cuda.synchronize()
    do_bench_tbps = copy_tbps()
    measure("copy 512 MiB each way", big_copy, 2 << 29, graphed=False)
    measure(f"copy {cache_bytes / 2e6:.0f} MB each way (the cache's bytes moved)", copier(cache_bytes // 2),
            cache_bytes, graphed=False)
    measure(f"copy {cache_bytes / 2e6:.0f} MB each way, CUDA graph", copier(cache_bytes // 2), cache_bytes)
    measure("flat read of the cache (16 KB per program, w4)", lambda i: flat(caches[i]), cache_bytes)
    measure("mla_decode B=32 ctx 4096 (CUDA graph)", lambda i: attend(caches[i]), cache_bytes, check=attention_error)
    copy_big = measure("copy 512 MiB each way, again (the bandwidth the rows divide by)", big_copy, 2 << 29,
                       graphed=False)

    modes = (*L2_FLUSHES, "rotate")
    tbps = {m: copy_big["bytes"] / (copy_big[f"us_{m}"] * 1e-6) / 1e12 for m in modes}
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"cache {cache_bytes / 1e6:.0f} MB; {args.samples} samples per median")
    print("copy bandwidth (512 MiB each way): " + ", ".join(f"{m} {tbps[m]:.2f} TB/s" for m in modes)
          + f"; _timing.copy_tbps (eager, zero flush) {do_bench_tbps:.2f} TB/s")
    print(f"{'row':<58}" + "".join(f"{m:>22}" for m in modes))
    for row in rows:
        row["pct_of_copy"] = {m: 100 * row["bytes"] / (row[f"us_{m}"] * 1e-6) / 1e12 / tbps[m] for m in modes}
        cells = "".join(f"{row[f'us_{m}']:9.2f} us {row['pct_of_copy'][m]:6.1f}%  " for m in modes)
        print(f"{row['name']:<58}{cells}" + (f" err {row['err']:.2e}" if "err" in row else ""))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "l2_flush_probe.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           copy_tbps=tbps, copy_tbps_eager=do_bench_tbps, samples=args.samples, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
