"""The launches Nsight Compute should read: MLA decode at issue #4's point and the batch-1 MoE GEMMs.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats --csv --page details \\
        python3 benchmarks/ncu_probe.py

Why: MLA decode at B=32, ctx 4096 stays at ~62% of copy bandwidth over every tile, split count and
pipeline depth swept (sessions 4-8), and the batch-1 grouped GEMMs at ~50% of their weight bytes'
time; a timing cannot say whether a kernel waits on DRAM, on latency (too few bytes in flight:
occupancy) or on its own instructions. Each case runs PINNED configs (no autotuning) REPEATS times to
warm up, then once between cudaProfilerStart / Stop (what ncu --profile-from-start off profiles: every
kernel of that one call), then is timed outside the profiled range.
Cases: an elementwise kernel over the MLA caches' bytes (the bandwidth reference), mla_decode split kernels
(two configs: the list's first and the 64-wide tile) at 8 splits, the fp8 MoE's up (SwiGLU) and down
grouped GEMMs at T=1 with the decode program's tuned tiles, the batch-1 attention fp8 GEMMs at two tiles. Also
runs without ncu (prints timings).
"""

from __future__ import annotations

import argparse

import torch

from _timing import cuda_ms  # noqa: E402 - sibling module of this script


def mla_cases(bsz: int = 32, ctx: int = 4096, heads: int = 16, c: int = 512, r: int = 64):
    """(name, fn, bytes read) for the MLA decode split kernel at pinned configs, and a copy of the same bytes."""
    import triton

    from dsv3_export.kernels import mla_decode as kd

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(bsz, heads, c, device="cuda", dtype=torch.bfloat16, generator=g)
    qp = torch.randn(bsz, heads, r, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(bsz, ctx, c, device="cuda", dtype=torch.bfloat16, generator=g)
    pe = torch.randn(bsz, ctx, r, device="cuda", dtype=torch.bfloat16, generator=g)
    seqlens = torch.full((bsz,), ctx, device="cuda", dtype=torch.int32)
    nbytes = kv.numel() * 2 + pe.numel() * 2
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    cases = [("neg (reads the MLA cache bytes, writes as many)", lambda: torch.neg(src, out=dst), nbytes)]
    wide = triton.Config({"BLOCK_N": 64, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=4, num_stages=2)
    for cfg in (kd.DECODE_CONFIGS[0], wide):
        cases.append((f"mla_decode B={bsz} ctx={ctx} 8 splits [{cfg}]",
                      lambda cfg=cfg: kd.mla_decode(q, qp, kv, pe, seqlens, 0.1, num_splits=8, config=cfg),
                      nbytes))
    return cases


def moe_cases(dim: int = 2048, inter: int = 1408, routed: int = 64, topk: int = 6):
    """(name, fn, weight bytes read) for the fp8 MoE's grouped GEMMs at T=1, shared experts fused (k = topk + 2)."""
    import triton

    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.kernels import moe as M
    from dsv3_export.reference import fp8 as R

    torch.manual_seed(0)
    e, k = routed + 2, topk + 2

    def experts(n, kdim):
        pairs = [R.weight_quant(torch.randn(n, kdim, device="cuda") / kdim**0.5) for _ in range(e)]
        return torch.stack([p for p, _ in pairs]), torch.stack([s for _, s in pairs])

    w13, w13s = experts(2 * inter, dim)
    w2, w2s = experts(dim, inter)
    x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
    ids = torch.cat([torch.randperm(routed, device="cuda")[:topk], torch.arange(routed, e, device="cuda")])[None]
    tw = torch.rand(1, k, device="cuda")
    sorted_ids, expert_ids, npp = M.moe_align(ids, e, M.choose_block_m(1, k, e))
    xq, xs = Q.act_quant(x)
    h = M.grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True,
                       config=M.GROUPED_GEMM_CONFIGS[0])
    hq, hs = Q.act_quant(h)
    up_bytes, down_bytes = k * 2 * inter * dim, k * dim * inter
    cases = []
    for bn, warps, stages in ((32, 4, 5), (64, 4, 4), (128, 8, 3)):
        cfg = triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        cases.append((f"moe up+SwiGLU T=1 [{cfg}]", lambda cfg=cfg: M.grouped_gemm(
            xq, w13, sorted_ids, expert_ids, npp, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True, config=cfg), up_bytes))
        cases.append((f"moe down T=1 [{cfg}]", lambda cfg=cfg: M.grouped_gemm(
            hq, w2, sorted_ids, expert_ids, npp, 1, a_scale=hs, w_scale=w2s, topk_weights=tw.flatten(), config=cfg),
            down_bytes))
    return cases


def fp8_cases(dim: int = 2048, fused_qkv: int = 16 * 192 + 576):
    """(name, fn, weight bytes read) for the batch-1 fp8 GEMMs of an attention layer (wq + wkv_a fused, wo) at the
    decode list's first tile and at the 64 x 128 wgmma tile that tuning at 64 x 1024 picked (session 12)."""
    import triton

    from dsv3_export.kernels import fp8_gemm as kg
    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.reference import fp8 as R

    torch.manual_seed(0)
    x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
    xq, xs = Q.act_quant(x)
    cases = []
    for n in (fused_qkv, dim):
        w, ws = R.weight_quant(torch.randn(n, dim, device="cuda") / dim**0.5)
        for cfg in (kg.DECODE_CONFIGS[0], triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4,
                                                        num_stages=4)):
            cases.append((f"fp8 GEMM M=1 N={n} K={dim} [{cfg}]",
                          lambda w=w, ws=ws, cfg=cfg: kg.fp8_gemm(xq, xs, w, ws, shape_class="decode", config=cfg),
                          n * dim))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="launches of each case (ncu: skip the first ones)")
    parser.add_argument("--only", default="mla,moe,fp8")
    args = parser.parse_args(argv)
    cases = []
    if "mla" in args.only:
        cases += mla_cases()
    if "moe" in args.only:
        cases += moe_cases()
    if "fp8" in args.only:
        cases += fp8_cases()
    cudart = torch.cuda.cudart()
    for name, fn, nbytes in cases:
        for _ in range(args.repeats):
            fn()
        torch.cuda.synchronize()
        cudart.cudaProfilerStart()
        fn()
        torch.cuda.synchronize()
        cudart.cudaProfilerStop()
        ms = cuda_ms(fn, warmup=1, reps=20)
        print(f"{name}: {ms * 1e3:.1f} us, {nbytes / (ms * 1e-3) / 1e12:.2f} TB/s of its bytes", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
