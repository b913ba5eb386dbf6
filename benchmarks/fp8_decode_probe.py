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
runs at M <= 2. --decode adds kernels/fp8_gemm_decode.py (what fp8_gemm runs for these calls since session 31; the
tile kernel's autotuned row is then fp8_gemm variant="tile") at its two tiles (pinned config) and at SWEEP; a streaming
Triton read of the weight's bytes (no arithmetic) and the names of the kernels cuBLAS runs (torch.profiler) are
printed beside them. --package first builds the engines' dsv3_aoti::fp8_linear with the decode kernel into an
AOTInductor package (M symbolic, as the decode program) and checks its output at several M. Session 31's calls 1-6
ran this script's earlier form (results/session31/fp8_decode_probe_calls1-6.py.txt), with the decode kernel's
swapped form then named fp8_gemm_swap and a TMA descriptor variant of its weight loads.

    python benchmarks/fp8_decode_probe.py [--rounds 3] [--ms 1,16,64] [--splits 1] [--decode] [--package] [--out DIR]
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
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _timing, kbench

from _timing import interleaved_ms  # noqa: E402
from kbench.common import mean_rel  # noqa: E402

SHAPES = {"w1/w3": (10944, 2048), "w2": (2048, 10944), "wo": (2048, 2048), "wkv_a": (576, 2048)}
SPLITS = {"w1/w3": (1, 2, 3, 4), "w2": (4, 6, 8, 11), "wo": (1, 2, 4, 8), "wkv_a": (1, 2, 4, 8)}
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

# kernels/fp8_gemm_decode.py beyond its pinned config: other stages and widths, either tile (the swapped one from M=1,
# the direct one from M=32), as (tile, config).
_SWAP16 = {"SWAP_AB": True, "BLOCK_M": 16}
_SWAP32 = {"SWAP_AB": True, "BLOCK_M": 32}
_DIRECT = {"SWAP_AB": False, "BLOCK_M": 64}
SWEEP = [
    (_SWAP16, triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4)),
    (_SWAP16, triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=6)),
    (_SWAP16, triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4)),
    (_SWAP32, triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4)),
    (_DIRECT, triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4)),
    (_DIRECT, triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=6)),
]


def _warm_up_gpu(seconds: float = 2.0) -> None:
    """Matmuls until the clocks have risen: the first timed round otherwise runs on an idling GPU."""
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            x @ x
        torch.cuda.synchronize()


def _candidates(m: int, label: str, configs, splits=None):
    """(config, split) for every config whose BLOCK_M suits M (16 rows up to M=16, 32 or 64 from M=16), at every
    split of K in `splits` (default SPLITS[label])."""
    for cfg in configs:
        block_m = cfg.kwargs["BLOCK_M"]
        if (block_m == 16 and m > 16) or (block_m > 16 and m < 16):
            continue
        for split in splits or SPLITS[label]:
            yield cfg, split


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n_words, PER_PROGRAM: tl.constexpr, CHUNK: tl.constexpr):
    """Sums a contiguous PER_PROGRAM-word slice of x per program: a read of the bytes with no arithmetic to speak
    of, all of a program's chunk loads issued before the adds (the loop is unrolled: PER_PROGRAM is a constexpr)."""
    start = tl.program_id(0) * PER_PROGRAM
    acc = tl.zeros((CHUNK,), dtype=tl.int32)
    for i in tl.static_range(0, PER_PROGRAM, CHUNK):
        offs = start + i + tl.arange(0, CHUNK)
        acc += tl.load(x_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def stream_read(words: torch.Tensor, programs: int, chunk: int = 2048, num_warps: int = 8):
    """The streaming read of `words` (int32, contiguous) over `programs` programs: the read floor in this timing."""
    n = words.numel()
    per_program = -(-n // (programs * chunk)) * chunk
    out = torch.empty(-(-n // per_program), dtype=torch.int32, device=words.device)
    _stream_read_kernel[(out.numel(),)](words, out, n, PER_PROGRAM=per_program, CHUNK=chunk, num_warps=num_warps)
    return out


def cublas_kernel_names(a_p, s_a, w_p, s_b) -> list[str]:
    """The CUDA kernels one blockwise _scaled_mm call launches, by torch.profiler."""
    from kbench.fp8 import _scaled_mm_blockwise

    _scaled_mm_blockwise(a_p, s_a, w_p, s_b)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _scaled_mm_blockwise(a_p, s_a, w_p, s_b)
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def probe_shape(label: str, m: int, rounds: int, flush: str, splits=None, decode: bool = False) -> list[dict]:
    """Every candidate at one shape and M, with blockwise _scaled_mm, the GEMV (M <= 2) and torch's read of the
    weight, from CUDA graphs round-robin: one row each, fastest first."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels import fp8_gemm_decode as D
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
    print(f"{label} M={m}: cuBLAS runs {cublas_kernel_names(a_p, s_a, w_p, s_b)}", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for per_sm in (2, 4):
        add(f"reference read: Triton stream over the weight's bytes, {per_sm} programs per SM",
            lambda per_sm=per_sm: stream_read(w.view(torch.int32), per_sm * sms), {"kind": "floor"})
    # what reading the weight's bytes alone costs torch, timed the same way (not a bound: the GEMMs read faster)
    add("reference read: torch sum over the weight's bytes", lambda: w.view(torch.float32).sum(), {"kind": "floor"})
    add("fp8_gemm (the launcher's choice)", lambda: G.fp8_gemm(a, a_s, w, w_s, shape_class="decode"),
        {"kind": "ours", "split": None})
    add("fp8_gemm variant=tile autotuned", lambda: G.fp8_gemm(a, a_s, w, w_s, shape_class="decode", variant="tile"),
        {"kind": "ours", "split": None})
    if decode and m <= D.MAX_M:
        for tile, cfg in ((D.SWAP_TILE, D.CONFIG), (D.DIRECT_TILE, D.CONFIG), *SWEEP):
            if (tile["SWAP_AB"] and tile["BLOCK_M"] > max(16, m)) or (not tile["SWAP_AB"] and m < 32):
                continue
            pinned = " (pinned)" if cfg is D.CONFIG else ""
            tile_label = f"{'swapped' if tile['SWAP_AB'] else 'direct'} BLOCK_M={tile['BLOCK_M']} {G.config_label(cfg)}"

            def run(tile=tile, cfg=cfg):
                return D.fp8_gemm_decode(a, a_s, w, w_s, tile=tile, config=cfg)

            add(f"fp8_gemm_decode {tile_label}{pinned}", run, {"kind": "ours", "split": 1, "config": tile_label})
    for cfg, split in _candidates(m, label, list(G.DECODE_CONFIGS) + EXTRA_CONFIGS, splits):
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


def check_package(workdir: str) -> list[dict]:
    """The engines' dsv3_aoti::fp8_linear in a decode program's form (act_quant, then kernels/fp8_gemm_decode.py's
    two tiles gated by M, engines/torch_triton.py) in a module exported with a symbolic M and compiled by
    AOTInductor as the engines build packages; run at several M against the reference."""
    from torch.export import Dim

    from dsv3_export.engines.torch_cxx import select_cxx
    from dsv3_export.engines.torch_triton import fp8_linear
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.reference import fp8 as R

    cxx = select_cxx().path
    n, k = SHAPES["w1/w3"]
    torch.manual_seed(5)
    w, w_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", w)
            self.register_buffer("w_s", w_s)

        def forward(self, x):
            return fp8_linear(x, self.w, self.w_s, True, True, decode_kernel=True)

    x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)  # traced at the decode program's tuning batch
    ep = torch.export.export(Linear(), (x,), dynamic_shapes={"x": {0: Dim("m", min=1, max=64)}})
    path = os.path.join(workdir, "fp8_linear_decode.pt2")
    torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs={"cpp.cxx": (None, cxx)})
    runner = torch._inductor.aoti_load_package(path)
    rows = []
    for m in (1, 2, 5, 16, 17, 33, 64):
        xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = runner(xm)
        a, a_s = R.act_quant(xm)
        err = mean_rel(out.float(), G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32).to(torch.bfloat16).float())
        ok = err < 1e-3 and tuple(out.shape) == (m, n)
        rows.append(dict(package="fp8_linear decode_kernel", m=m, err=err, ok=ok))
        print(f"package M={m}: err {err:.2e} {'ok' if ok else 'WRONG'}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ms", default="1,16,64")
    parser.add_argument("--shapes", default="w1/w3,w2")
    parser.add_argument("--flush", default="read")
    parser.add_argument("--splits", default=None, help="comma-separated splits of K instead of SPLITS")
    parser.add_argument("--decode", action="store_true", help="add kernels/fp8_gemm_decode.py's tiles and sweep")
    parser.add_argument("--package", action="store_true",
                        help="first build fp8_linear with the decode kernel into an AOTInductor package and check it")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    all_rows = []
    if args.package:
        import tempfile

        with tempfile.TemporaryDirectory() as workdir:
            all_rows += check_package(workdir)
    _warm_up_gpu()
    for label in args.shapes.split(","):
        for m in (int(v) for v in args.ms.split(",")):
            t0 = time.time()
            splits = tuple(int(v) for v in args.splits.split(",")) if args.splits else None
            rows = probe_shape(label, m, args.rounds, args.flush, splits, args.decode)
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
