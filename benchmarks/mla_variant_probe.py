"""Probe: MLA decode split-kernel variants (benchmarks/mla_probe/final_*.py, copies of
kernels/mla_decode_kernels.py) against the current kernel, pinned configs, CUDA graphs (split + merge),
checked against mla_decode_ref. One GPU call; prints a table and writes $OUT/mla_probe.json."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kbench.common import _bootstrap_imports  # noqa: E402

_bootstrap_imports()
from dsv3_export.kernels import mla_decode as kd  # noqa: E402
from dsv3_export.kernels.mla_attention import mla_decode_ref  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def _load(name):
    path = Path(__file__).resolve().parent / "mla_probe" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mla_probe_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._mla_decode_split_kernel


VARIANTS = {"orig": kd._mla_decode_split_kernel, "A": _load("final_A"), "B": _load("final_B")}
CONFIGS = {  # (BLOCK_N, warps, stages, maxnreg)
    "BN32 w4 s3": triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=3),
    "BN32 w4 s2 r168": triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=2, maxnreg=168),
    "BN64 w8 s3": triton.Config({"BLOCK_N": 64, "PREFETCH": 0}, num_warps=8, num_stages=3),
    "BN64 w4 s2 P2": triton.Config({"BLOCK_N": 64, "PREFETCH": 2}, num_warps=4, num_stages=2),
}
SHAPES = [((32, 4096), False, 8), ((1, 1024), True, None), ((8, 4096), True, None), ((64, 1024), True, None)]
if not GPU:
    SHAPES = [((3, 70), False, 2), ((1, 33), True, None)]
    CONFIGS = {"BN32 w4 s3": CONFIGS["BN32 w4 s3"]}


def bench(fn):
    if not GPU:
        fn()
        return float("nan")
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_of(fn, outs):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs.append(fn())
    return g


def main():
    torch.manual_seed(0)
    h, c, r, scale = (16, 512, 64, (128 + 64) ** -0.5) if GPU else (4, 64, 16, 0.2)
    copy_tbps = None
    if GPU:
        n = 1 << 29
        src, dst = torch.empty(n, dtype=torch.uint8, device=DEV), torch.empty(n, dtype=torch.uint8, device=DEV)
        copy_tbps = 2 * n / (bench(lambda: dst.copy_(src)) * 1e-3) / 1e12
        print(f"copy {copy_tbps:.2f} TB/s", flush=True)
    rows = []
    for (bsz, ctx), new, splits in SHAPES:
        cache = torch.randn(bsz, ctx, c + r, device=DEV, dtype=torch.bfloat16)
        kv, pe = cache[..., :c], cache[..., c:]
        q = torch.randn(bsz, h, c, device=DEV, dtype=torch.bfloat16)
        qp = torch.randn(bsz, h, r, device=DEV, dtype=torch.bfloat16)
        seqlens = torch.full((bsz,), ctx - new, dtype=torch.int32, device=DEV)
        kw = dict(kv_new=cache[:, -1, :c], pe_new=cache[:, -1, c:]) if new else {}
        kw.update({"runtime_splits": True} if splits is None else {"num_splits": splits})
        ref = mla_decode_ref(q.float(), qp.float(), kv.float(), pe.float(),
                             torch.full((bsz,), ctx, dtype=torch.int32, device=DEV), scale)
        nbytes = bsz * ctx * (c + r) * 2
        for cname, cfg in CONFIGS.items():
            for vname, kern in VARIANTS.items():
                kd._mla_decode_split_kernel = kern
                label = f"B={bsz} ctx={ctx} {cname} {vname}"
                try:
                    call = lambda: kd.mla_decode(q, qp, kv, pe, seqlens, scale, config=cfg, **kw)  # noqa: E731
                    outs = [call()]
                    fn = call
                    if GPU:
                        outs = []
                        fn = graph_of(call, outs).replay
                    ms = bench(fn)
                    if GPU:
                        torch.cuda.synchronize()
                    err = ((outs[0].float() - ref).abs().mean() / ref.abs().mean()).item()
                    pct = 100 * nbytes / (ms * 1e-3) / 1e12 / copy_tbps if GPU else float("nan")
                    rows.append(dict(case=label, us=ms * 1e3, pct_copy=pct, err=err))
                    print(f"{label:<40} {ms * 1e3:8.1f} us {pct:5.1f}% of copy err {err:.2e}", flush=True)
                except Exception as e:  # noqa: BLE001 - a point that does not run is a result
                    print(f"{label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    rows.append(dict(case=label, failed=f"{type(e).__name__}: {str(e)[:300]}"))
        kd._mla_decode_split_kernel = VARIANTS["orig"]
    out = os.environ.get("OUT")
    if out:
        Path(out, "mla_probe.json").write_text(json.dumps(dict(copy_tbps=copy_tbps, rows=rows), indent=1))


if __name__ == "__main__":
    main()
