"""Does editing a captured CUDA graph's edges into programmatic ones (engines/cuda_graph_pdl.py) work on
this GPU and driver, keep results exact, and shorten a chain of short dependent kernels?

    python benchmarks/pdl_probe.py [--kernels 300] [--out DIR]

One graph per mode from the same launches: "none" (as captured), "programmatic" and "launch" (the two
ports). Kernels: `shift` (each block reads another block's slice of the previous kernel's output, so
an early read shows as a wrong result) and `gemv` (an 8 MB bf16 weight streamed against the previous
output, with its weight L2 prefetch before or after the wait). "no wait" runs kernels compiled without the
wait; "unsafe" gives those programmatic edges (a race the check may catch). Last, the chain launched directly
(no graph) with and without the wait: what the wait costs outside PDL.
Prints one table of replay ms (median of 30) and mismatches against eager; writes probe.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import os

os.environ.setdefault("DSV3_TRITON_GDC", "1")  # before kernels/pdl.py is imported: wait_for_producer compiles the wait

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv3_export.engines.cuda_graph_pdl import PdlPlan, capture_graph, kernel_names  # noqa: E402
from dsv3_export.kernels.pdl import wait_for_producer  # noqa: E402

N_SHIFT = 1 << 18  # fp32 elements per shift buffer (1 MB)
BLOCK = 2048
GEMV_N, GEMV_K = 2048, 2048


@triton.jit
def _probe_shift_kernel(x_ptr, y_ptr, n, WAIT: tl.constexpr, BLOCK: tl.constexpr):
    if WAIT:
        wait_for_producer()
    pid = tl.program_id(0)
    src = (pid + 7) % tl.num_programs(0)  # another block's slice of the producer's output
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + src * BLOCK + offs, mask=src * BLOCK + offs < n, other=0.0)
    tl.store(y_ptr + pid * BLOCK + offs, x * 0.5 + 1.0, mask=pid * BLOCK + offs < n)


@triton.jit
def _probe_gemv_kernel(w_ptr, x_ptr, y_ptr, N, K, WAIT: tl.constexpr, PREFETCH_FIRST: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if PREFETCH_FIRST:  # the weight does not depend on the producer: pull it into L2 before waiting
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            lines = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [lines.to(tl.int64)], dtype=tl.int32,
                                      is_pure=False, pack=1)
    if WAIT:
        wait_for_producer()
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]).to(tl.float32)
        x = tl.load(x_ptr + offs_k).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + offs_n, (acc * (1.0 / K)).to(y_ptr.dtype.element_ty))


def chain(bufs, w, kernels: int, wait: bool, prefetch_first: bool):
    """`kernels` launches alternating shift / gemv, each reading the previous one's output."""
    a, b, _, g1 = bufs
    for i in range(kernels):
        if i % 2 == 0:
            src, dst = (a, b) if i % 4 == 0 else (b, a)
            _probe_shift_kernel[(triton.cdiv(N_SHIFT, BLOCK),)](src, dst, N_SHIFT, WAIT=wait, BLOCK=BLOCK)
        else:
            _probe_gemv_kernel[(GEMV_N // 16,)](w, a[:GEMV_K], g1, GEMV_N, GEMV_K, WAIT=wait,
                                                 PREFETCH_FIRST=prefetch_first, BLOCK_N=16, BLOCK_K=256)
            a[:GEMV_N].add_(g1)  # torch kernel: never waits, keeps an ordinary edge
    return a, b, g1


def reset(bufs, init) -> None:
    """The chain's buffers back to their starting values."""
    for t, t0 in zip(bufs, init):
        t.copy_(t0)


def capture(bufs, w, kernels, wait, prefetch_first, port, names):
    init = [t.clone() for t in bufs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(bufs, w, kernels, wait, prefetch_first)  # compile / load outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    reset(bufs, init)
    plan = PdlPlan(port, frozenset(names)) if port else None
    graph, _, edges = capture_graph(lambda: chain(bufs, w, kernels, wait, prefetch_first), plan)
    return graph, init, edges


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kernels", type=int, default=300)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    w = (torch.randn(GEMV_N, GEMV_K, device=dev) * 0.1).to(torch.bfloat16)
    bufs = [torch.randn(N_SHIFT, device=dev), torch.zeros(N_SHIFT, device=dev), torch.zeros(GEMV_N, device=dev),
            torch.zeros(GEMV_N, device=dev)]
    init = [t.clone() for t in bufs]
    chain(bufs, w, args.kernels, True, False)
    want = [t.clone() for t in bufs]
    reset(bufs, init)
    names = {"_probe_shift_kernel", "_probe_gemv_kernel"}
    modes = [("none", True, False, None), ("programmatic", True, False, "programmatic"),
             ("launch", True, False, "launch"), ("none, prefetch first", True, True, None),
             ("launch, prefetch first", True, True, "launch"), ("no wait, as captured", False, False, None),
             ("unsafe (no wait, launch)", False, False, "launch")]
    rows = []
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"driver CUDA {torch._C._cuda_getDriverVersion() if hasattr(torch._C, '_cuda_getDriverVersion') else '?'}")
    last_graph = None
    for label, wait, prefetch, port in modes:
        try:
            graph, start, edges = capture(bufs, w, args.kernels, wait, prefetch, port, names)
            last_graph = graph
        except Exception as e:  # noqa: BLE001 - report and go on to the next mode
            print(f"{label}: FAILED {type(e).__name__}: {e}")
            rows.append({"mode": label, "error": f"{type(e).__name__}: {e}"})
            continue
        times, bad = [], 0
        for rep in range(33):
            reset(bufs, init)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            graph.replay()
            e1.record()
            torch.cuda.synchronize()
            if rep >= 3:
                times.append(e0.elapsed_time(e1))
            bad += sum(int(not torch.equal(t, t_want)) for t, t_want in zip(bufs, want))
        row = {"mode": label, "ms": statistics.median(times), "mismatching_replays": bad,
               "edges": str(edges) if edges else "as captured"}
        rows.append(row)
        print(f"{label:28s} {row['ms']:.4f} ms  mismatches {bad:3d}  {row['edges']}")
    for wait in (True, False, True):  # the chain launched directly (no graph): what the wait costs there
        chain(bufs, w, args.kernels, wait, False)
        torch.cuda.synchronize()
        times = []
        for _ in range(12):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            chain(bufs, w, args.kernels, wait, False)
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        row = {"mode": f"direct launches, {'with' if wait else 'no'} wait", "ms": statistics.median(times[2:])}
        rows.append(row)
        print(f"{row['mode']:28s} {row['ms']:.4f} ms")
    names_seen = sorted(set(kernel_names(last_graph.raw_cuda_graph()))) if last_graph is not None else []
    print("kernel names in the last graph:", names_seen)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe.json").write_text(json.dumps({"rows": rows, "names": names_seen}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
