"""What limits the Gluon fp8 prefill GEMM (kernels/fp8_gemm_gluon.py): its promotion, or its tile and data path?

At the 16b prefill shapes (M=4096; w1/w3 N=10944 K=2048, w2 N=2048 K=10944) on one GPU, in one run:
  torch._scaled_mm blockwise    the baseline of issue #4 (1x128 x 128x128 scales; cuBLAS)
  torch._scaled_mm tensorwise   cuBLAS with one scale per tensor: no per-block promotion at all
  gluon                         fp8_gemm_gluon as fp8_gemm(variant="gluon") runs it
  gluon warp-specialized        a 1-warp TMA producer and two consumer warpgroups (64 rows each) that do not wait
                                for each other (fp8_gemm_gluon(warp_specialized=True))
  gluon chained                 the same persistent kernel, tiles, stages and TMA loads, but one fp32 accumulator
                                chained through the wgmmas with no promotion (the scales ignored): this data path's
                                ceiling. Checked against the unscaled product of the same fp8 operands.
If "chained" is about as slow as "gluon", the tile and its loads are the limit, not the promotion.
Timings: benchmarks/_timing.py median_ms (L2 emptied by a 256 MiB read before each sample), of the eager call and of
its CUDA graph replay (no host cost), and the host time of one eager call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from _timing import median_ms  # sibling module of this script
from dsv3_export.kernels.fp8_gemm_gluon import _descriptor, _load_ahead, _start, _tile_offsets, _tma_store


@gluon.jit
def _chained_kernel(a_desc, b_desc, c_desc, M, N, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                    num_warps: gl.constexpr):
    """fp8_gemm_gluon's persistent loop with acc = a @ b^T + acc chained in the tensor core (no scales)."""
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    # the product's schedule and padding (UNROLL 2), shared memory and first loads
    (num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks, total_steps, a_bufs, b_bufs, c_smem, ready, off_m,
     off_n) = _start(a_desc, b_desc, c_desc, M, N, K, 2, STAGES, GROUP_M)
    INSTR_K: gl.constexpr = 256 // a_desc.dtype.primitive_bitwidth
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, INSTR_K])
    for local_tile in range(my_tiles):
        next_tile = gl.minimum(gl.program_id(0) + (local_tile + 1) * gl.num_programs(0), num_pid_m * num_pid_n - 1)
        next_m, next_n = _tile_offsets(next_tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        first_step = local_tile * padded_blocks
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        for kb in range(padded_blocks):
            step = first_step + kb
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # block kb - 1 done: refill its stage
            _load_ahead(a_desc, b_desc, a_bufs, b_bufs, ready, first_step, gl.where(kb > 0, total_steps, 0), kb - 1,
                        padded_blocks, k_blocks, off_m, off_n, next_m, next_n, STAGES)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _load_ahead(a_desc, b_desc, a_bufs, b_bufs, ready, first_step, total_steps, padded_blocks - 1,
                    padded_blocks, k_blocks, off_m, off_n, next_m, next_n, STAGES)
        tma.store_wait(pendings=0)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m, off_n], c_smem)
        off_m = next_m
        off_n = next_n
    tma.store_wait(pendings=0)
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(stage))


def chained(a, b):
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    a_desc = _descriptor(a, [128, 128], gl.float8e4nv)
    b_desc = _descriptor(b, [128, 128], gl.float8e4nv)
    c_desc = _descriptor(c, [128, 128], gl.bfloat16)
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    grid = (min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count),)
    _chained_kernel[grid](a_desc, b_desc, c_desc, m, n, k, GROUP_M=8, STAGES=4, num_warps=8)
    return c


def _ws_tile() -> str:
    """The warp-specialized kernel's "stages,unroll,group_m" in this process (DSV3_GLUON_WS_TILE or its default)."""
    from dsv3_export.kernels import fp8_gemm_gluon_ws as W

    return f"{int(W.WS_STAGES)},{int(W.WS_UNROLL)},{int(W.WS_GROUP_M)}"


def _host_us(fn, calls: int = 20) -> float:
    """Host microseconds per eager call (Python, descriptors, launch), timed while the GPU drains a long queue: if it
    exceeds the flush plus the kernel, median_ms's eager samples include GPU idle time."""
    torch.cuda._sleep(200_000_000)  # keep the GPU busy so that the launches below never wait for it
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def ws_rounds(rounds: int, regs: int, out_dir: str | None) -> None:
    """The warp-specialized kernel (at this process's DSV3_GLUON_WS_TILE) against blockwise _scaled_mm, both from
    CUDA graphs, `rounds` rounds alternating the two (_timing.interleaved_ms): the per-round ratio's median and range,
    steadier than one timing of each (the H200's clocks drift by 5% within a run). Checked on an fp32 c (a bf16 c
    where 6 stages leave no room for the fp32 epilogue tile)."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels.fp8_gemm_gluon import fp8_gemm_gluon
    from dsv3_export.kernels.fp8_gemm_gluon_ws import scales_for_tma
    from dsv3_export.reference import fp8 as R
    from kbench.fp8 import against_blockwise_in_graphs

    from triton.runtime.errors import OutOfResources

    rows = []
    for label, n, k in (("w1/w3", 10944, 2048), ("w2", 2048, 10944)):
        m = 4096
        w, w_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)
        a, a_s = R.act_quant(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        ref = G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
        try:
            out_dtype, out = torch.float32, fp8_gemm_gluon(a, a_s, w, w_s, torch.float32, ws_consumer_regs=regs)
        except OutOfResources:
            out_dtype, out = torch.bfloat16, fp8_gemm_gluon(a, a_s, w, w_s, ws_consumer_regs=regs)
        err = ((out.float() - ref).abs().mean() / ref.abs().mean()).item()
        a_s_tma = scales_for_tma(a_s)  # made once, as cuBLAS's outer-dim-major scales are
        base_ms, gluon_ms, ratios, replayed = against_blockwise_in_graphs(
            a, a_s, w, w_s, lambda: fp8_gemm_gluon(a, a_s_tma, w, w_s, ws_consumer_regs=regs), rounds, "read")
        # what the timed replays wrote (bf16 c): a wrong kernel is off by far more than bf16 rounding (~1.4e-3)
        graph_err = ((replayed.float() - ref).abs().mean() / ref.abs().mean()).item()
        row = dict(case=label, ws_tile=_ws_tile(), rounds=rounds, gluon_ms=statistics.median(gluon_ms),
                   blockwise_ms=statistics.median(base_ms), ratio_median=statistics.median(ratios),
                   ratio_min=ratios[0], ratio_max=ratios[-1], err=err, err_out_dtype=str(out_dtype),
                   graph_err=graph_err, ws_regs=regs, times=dict(blockwise=base_ms, gluon=gluon_ms))
        rows.append(row)
        print(f"{row['ws_tile']} {label}: gluon {row['gluon_ms']:.4f} ms, blockwise _scaled_mm "
              f"{row['blockwise_ms']:.4f} ms; per round {row['ratio_median']:.3f}x (range {ratios[0]:.3f}-"
              f"{ratios[-1]:.3f}); err {err:.1e} ({out_dtype}), the timed graph's {graph_err:.1e} (bf16)", flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"fp8_gluon_ws_rounds_{_ws_tile().replace(',', '-')}.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--ws-only", action="store_true",
                        help="only blockwise _scaled_mm and the warp-specialized form (sweeps: DSV3_GLUON_WS_TILE)")
    parser.add_argument("--ws-regs", type=int, default=232, help="registers per consumer thread (setmaxnreg)")
    parser.add_argument("--ws-rounds", type=int, default=0,
                        help="only the warp-specialized form against blockwise _scaled_mm from CUDA graphs, this many "
                             "rounds alternating the two (sweeps: DSV3_GLUON_WS_TILE)")
    args = parser.parse_args()
    if args.ws_rounds:
        ws_rounds(args.ws_rounds, args.ws_regs, args.out)
        return
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.reference import fp8 as R
    from kbench.common import _graph_of
    from kbench.fp8 import _blockwise_operands, _scaled_mm_blockwise, _scaled_mm_tensorwise

    from dsv3_export.kernels.fp8_gemm_gluon import fp8_gemm_gluon
    from dsv3_export.kernels.fp8_gemm_gluon_ws import scales_for_tma

    rows = []
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for m, n, k, programs in ((200, 264, 400, None), (300, 136, 1296, 2), (4096, 2048, 10944, None)):
        # the warp-specialized form on ragged shapes first (a wrong barrier protocol hangs or is wrong here)
        a, a_s = R.act_quant(torch.randn(m, k, device="cuda") * 2)
        w, w_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)
        ref = G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
        out = fp8_gemm_gluon(a, a_s, w, w_s, torch.float32, warp_specialized=True, programs=programs,
                             ws_consumer_regs=args.ws_regs)
        torch.cuda.synchronize()
        err = ((out - ref).abs().mean() / ref.abs().mean()).item()
        print(f"ws check M={m} N={n} K={k} programs={programs}: mean rel err {err:.2e}", flush=True)
    for label, n, k in (("w1/w3", 10944, 2048), ("w2", 2048, 10944)):
        m = 4096
        w, w_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)
        a, a_s = R.act_quant(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        ref = G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
        unscaled = a.float() @ w.float().t()
        a_p, s_a, w_p, s_b = _blockwise_operands(a, a_s, w, w_s)
        a_s_tma = scales_for_tma(a_s)  # the warp-specialized form's, made once as cuBLAS's are
        cases = (("torch._scaled_mm blockwise", lambda: _scaled_mm_blockwise(a_p, s_a, w_p, s_b)[:m], ref),
                 ("torch._scaled_mm tensorwise", lambda: _scaled_mm_tensorwise(a, w), unscaled),
                 ("gluon", lambda: G.fp8_gemm(a, a_s, w, w_s, variant="gluon"), ref),
                 ("gluon warp-specialized", lambda: fp8_gemm_gluon(a, a_s_tma, w, w_s, warp_specialized=True,
                                                                    ws_consumer_regs=args.ws_regs), ref),
                 ("gluon chained (no promotion)", lambda: chained(a, w), unscaled))
        base = None
        if args.ws_only:
            cases = tuple(c for c in cases if c[0] in ("torch._scaled_mm blockwise", "gluon warp-specialized"))
        graph_base = None
        for name, fn, want in cases:
            err = ((fn().float() - want).abs().mean() / want.abs().mean()).item()
            ms = median_ms(fn, "read")
            base = base or ms
            host_us = _host_us(fn)
            graph_ms = median_ms(_graph_of(fn).replay, "read")  # the same call without its host cost
            graph_base = graph_base or graph_ms
            tflops = 2 * m * n * k / (ms * 1e-3) / 1e12
            rows.append(dict(case=label, impl=name, ms=ms, tflops=tflops, vs_blockwise=base / ms, err=err,
                             graph_ms=graph_ms, graph_vs_blockwise=graph_base / graph_ms, host_us=host_us,
                             ws_tile=_ws_tile(), ws_regs=args.ws_regs))
            print(f"{label:<6} {name:<30} {ms:.4f} ms {tflops:7.1f} TFLOP/s  {base / ms:.2f}x of blockwise "
                  f"_scaled_mm  err {err:.1e} | CUDA graph {graph_ms:.4f} ms {graph_base / graph_ms:.2f}x | host "
                  f"{host_us:.0f} us per call", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tile = _ws_tile().replace(",", "-")
        tag = f"_ws{tile}_r{args.ws_regs}" if args.ws_only else ""
        with open(os.path.join(args.out, f"fp8_gluon_probe{tag}.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
