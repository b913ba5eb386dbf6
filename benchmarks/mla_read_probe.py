"""How fast the H200 reads MLA decode's cache with decode's access pattern and no attention math.

    python3 benchmarks/mla_read_probe.py [--out DIR]

Why: issue #4's MLA target is 70% of the measured copy bandwidth (reads + writes of torch's copy_) at B=32,
context 4096. Session 27 found the split kernel at 68% alone, more L2 prefetch and more programs per SM slower
(benchmarks/mla_merge_probe.py), so the question is what a read-only stream of the same bytes reaches: the same
[B, T, 512 + 64] bf16 cache, B x splits programs each reading its contiguous chunk of rows in [BN, 512] + [BN, 64]
tiles (the split kernel's loads), with the math replaced by a running sum that keeps every load live. Beside it:
torch's own reductions over the same bytes, and the same stream over more, shorter chunks (an upper bound of what
the decomposition could get). Timings: triton.testing.do_bench medians from CUDA graphs, L2 flushed between samples.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from _timing import copy_tbps as device_copy_tbps  # sibling module of this script
import triton.language as tl


@triton.jit
def _stream_rows(kv_ptr, pe_ptr, out_ptr, T, SPLITS, stride_b, stride_t,
                 C: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """Program (b, s) reads rows [s * T / SPLITS, (s + 1) * T / SPLITS) of batch row b, BLOCK_N rows per step.
    DOT: the column sums as a product with ones (16 rows), so that the loads take the split kernel's path (the
    software pipeliner stages a dot's operands through shared memory with cp.async, num_stages - 1 tiles ahead);
    else plain loads summed in registers."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    chunk = tl.cdiv(T, SPLITS)
    start = s * chunk
    end = tl.minimum(start + chunk, T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, C)
    offs_r = tl.arange(0, R)
    acc = tl.zeros((C,), dtype=tl.float32)
    acc_r = tl.zeros((R,), dtype=tl.float32)
    acc_d = tl.zeros((16, C), dtype=tl.float32)
    acc_dr = tl.zeros((16, R), dtype=tl.float32)
    ones = tl.full((16, BLOCK_N), 1.0, dtype=kv_ptr.dtype.element_ty)
    for n0 in range(start, end, BLOCK_N):
        rows = tl.minimum(n0 + offs_n, end - 1)  # like the split kernel: re-read the last row, no masks
        kv = tl.load(kv_ptr + b * stride_b + rows[:, None] * stride_t + offs_c[None, :])
        pe = tl.load(pe_ptr + b * stride_b + rows[:, None] * stride_t + offs_r[None, :])
        if DOT:
            acc_d = tl.dot(ones, kv, acc_d)
            acc_dr = tl.dot(ones, pe, acc_dr)
        else:
            acc += tl.sum(kv.to(tl.float32), axis=0)
            acc_r += tl.sum(pe.to(tl.float32), axis=0)
    if DOT:
        acc = tl.sum(acc_d, axis=0) / 16
        acc_r = tl.sum(acc_dr, axis=0) / 16
    tl.store(out_ptr + (b * SPLITS + s) * (C + R) + offs_c, acc)
    tl.store(out_ptr + (b * SPLITS + s) * (C + R) + C + offs_r, acc_r)


@triton.jit
def _stream_rows_tma(cache_ptr, out_ptr, B, T, SPLITS, C: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """_stream_rows with DOT through TMA: device-side descriptors over the cache as [B * T, C + R] rows (a box is at
    most 256 wide: the latent part in two halves)."""
    rows = B * T
    half: tl.constexpr = C // 2
    desc_c = tl.make_tensor_descriptor(cache_ptr, shape=[rows, C + R], strides=[C + R, 1], block_shape=[BLOCK_N, half])
    desc_r = tl.make_tensor_descriptor(cache_ptr, shape=[rows, C + R], strides=[C + R, 1], block_shape=[BLOCK_N, R])
    b = tl.program_id(0)
    s = tl.program_id(1)
    chunk = tl.cdiv(T, SPLITS)
    start = s * chunk
    end = tl.minimum(start + chunk, T)
    acc_lo = tl.zeros((16, C // 2), dtype=tl.float32)
    acc_hi = tl.zeros((16, C // 2), dtype=tl.float32)
    acc_r = tl.zeros((16, R), dtype=tl.float32)
    ones = tl.full((16, BLOCK_N), 1.0, dtype=cache_ptr.dtype.element_ty)
    for n0 in range(start, end, BLOCK_N):  # chunks are BLOCK_N multiples here
        row = b * T + n0
        acc_lo = tl.dot(ones, desc_c.load([row, 0]), acc_lo)
        acc_hi = tl.dot(ones, desc_c.load([row, C // 2]), acc_hi)
        acc_r = tl.dot(ones, desc_r.load([row, C]), acc_r)
    base = out_ptr + (b * SPLITS + s) * (C + R)
    tl.store(base + tl.arange(0, C // 2), tl.sum(acc_lo, axis=0) / 16)
    tl.store(base + C // 2 + tl.arange(0, C // 2), tl.sum(acc_hi, axis=0) / 16)
    tl.store(base + C + tl.arange(0, R), tl.sum(acc_r, axis=0) / 16)


@triton.jit
def _flat_read(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """One BLOCK-element slice of the flat cache per program, summed: reads laid out like torch's copy_ kernel
    (many short programs, every load of a program issued before the first is used)."""
    pid = tl.program_id(0)
    x = tl.load(x_ptr + pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid, tl.sum(x.to(tl.float32), axis=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    bsz, ctx, c, r = 32, 4096, 512, 64
    cache = torch.randn(bsz, ctx, c + r, device="cuda", dtype=torch.bfloat16)
    kv, pe = cache[..., :c], cache[..., c:]
    nbytes = cache.numel() * 2
    copy_tbps = device_copy_tbps()
    print(f"copy {copy_tbps:.2f} TB/s (read + write); cache {nbytes / 1e6:.0f} MB; 70% of copy = "
          f"{0.7 * copy_tbps:.2f} TB/s = {nbytes / (0.7 * copy_tbps * 1e12) * 1e6:.1f} us", flush=True)
    rows = []
    ref = cache.float().sum(dim=1)  # [B, C + R]

    def column_sums_error(splits):
        """The check of a stream's output: its programs' column sums [B * splits, C + R], summed over the splits,
        against the cache's (mean relative)."""
        def check(o):
            got = o.view(bsz, splits, c + r).sum(dim=1)
            return ((got - ref).abs().mean() / ref.abs().mean()).item()
        return check

    def point(name, fn, check=None):
        try:
            fn()
        except Exception as exc:  # e.g. a tile that does not fit: printed, the others still run
            print(f"{name}: failed {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            return
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
        torch.cuda.synchronize()
        err = None if check is None else check(out)
        tbps = nbytes / (ms * 1e-3) / 1e12
        rows.append(dict(name=name, us=ms * 1e3, tbps=tbps, pct_of_copy=100 * tbps / copy_tbps, err=err))
        print(f"{name:<52} {ms * 1e3:7.2f} us {tbps:5.2f} TB/s = {100 * tbps / copy_tbps:5.1f}% of copy"
              + ("" if err is None else f"  err {err:.1e}"), flush=True)

    point("torch sum (fp32 accumulate)", lambda: cache.sum(dtype=torch.float32))
    point("torch amax", lambda: cache.amax())
    for block, warps in ((8192, 4), (8192, 8), (16384, 8), (4096, 4)):
        flat_out = torch.empty(cache.numel() // block, device="cuda", dtype=torch.float32)

        def flat(block=block, warps=warps, flat_out=flat_out):
            _flat_read[(cache.numel() // block,)](cache, flat_out, BLOCK=block, num_warps=warps)
            return flat_out

        point(f"flat read, {block * 2 // 1024} KB per program, w{warps}", flat,
              lambda o: abs(o.sum().item() - ref.sum().item()) / ref.abs().sum().item())
    for dot, splits, bn, warps, stages in ((True, 8, 32, 4, 3), (True, 8, 32, 4, 4), (True, 8, 32, 4, 5),
                                           (True, 8, 64, 4, 3), (True, 8, 64, 8, 3), (True, 8, 16, 4, 5),
                                           (True, 8, 16, 4, 8), (True, 16, 32, 4, 3), (True, 32, 32, 4, 3),
                                           (True, 4, 32, 4, 6), (False, 8, 32, 4, 3), (False, 8, 64, 4, 3),
                                           (False, 32, 32, 4, 3)):
        out = torch.empty(bsz * splits * (c + r), device="cuda", dtype=torch.float32)

        def run(splits=splits, bn=bn, warps=warps, stages=stages, out=out, dot=dot):
            _stream_rows[(bsz, splits)](kv, pe, out, ctx, splits, cache.stride(0), cache.stride(1), C=c, R=r,
                                        BLOCK_N=bn, DOT=dot, num_warps=warps, num_stages=stages)
            return out

        point(f"stream{' dot' * dot} {bsz}x{splits} programs BN{bn} w{warps} s{stages}", run, column_sums_error(splits))
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    for splits, bn, warps, stages in ((8, 32, 4, 3), (8, 32, 4, 4), (8, 64, 4, 3), (8, 64, 4, 4),
                                      (16, 64, 4, 3), (4, 32, 4, 5)):
        out = torch.empty(bsz * splits * (c + r), device="cuda", dtype=torch.float32)

        def run_tma(splits=splits, bn=bn, warps=warps, stages=stages, out=out):
            _stream_rows_tma[(bsz, splits)](cache, out, bsz, ctx, splits, C=c, R=r, BLOCK_N=bn, num_warps=warps,
                                            num_stages=stages)
            return out

        point(f"stream tma {bsz}x{splits} programs BN{bn} w{warps} s{stages}", run_tma, column_sums_error(splits))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mla_read_probe.json"), "w") as f:
            json.dump(dict(copy_tbps=copy_tbps, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
