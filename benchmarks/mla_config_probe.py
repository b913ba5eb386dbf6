"""Which MLA decode split-kernel config the decode program should run: every kernels/mla_decode.py
DECODE_CONFIGS entry, pinned, at the 16b decode program's shapes, timed the way the step runs it.

Why: the decode program is autotuned once, at 64 x 1024, and session 18's six builds picked four
different configs there (BN16 w8 s5, BN64 w4 s2 P1, BN32 w8 s3, BN32 w8 s4), with the same config
timed 19 and 44 us in two builds; at batch 1 the picks then ran 7.1 to 11.9 us per call in the step
profiles (192 to 321 us per 27-layer step). A graph of one call (kbench mla_sweep) is dominated by the
graph launch at batch 1 (session 16: 14.3 us for every config), so here each point is a CUDA graph of
LAYERS calls over LAYERS separate caches, as the step's layers are: split + merge, runtime splits, the
new token beside the cache, us per call. Checked against mla_decode_ref on the last call's output.

GPU: `python3 benchmarks/mla_config_probe.py` (prints a table; $OUT/mla_config_probe.json when OUT is
set). CPU (TRITON_INTERPRET=1): tiny shapes, two configs, errors only (the plumbing).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kbench.common import _bootstrap_imports, _graph_of  # noqa: E402

_bootstrap_imports()
from dsv3_export.kernels import mla_decode as kd  # noqa: E402
from dsv3_export.kernels.mla_attention import mla_decode_ref  # noqa: E402

GPU = torch.cuda.is_available()
H, C, R = (16, 512, 64) if GPU else (4, 64, 16)
SCALE = (128 + 64) ** -0.5  # the 16b preset's softmax scale: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
SHAPES = ((1, 1024), (8, 1024), (64, 1024)) if GPU else ((1, 45), (3, 70))  # (batch, cached keys + the new one)
LAYERS = 27 if GPU else 2
CONFIGS = kd.DECODE_CONFIGS if GPU else kd.DECODE_CONFIGS[:2]


def label(cfg) -> str:
    kw = cfg.kwargs
    return (f"BN{kw['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}" + (f" P{kw['PREFETCH']}" if kw["PREFETCH"] else "")
            + (f" r{cfg.maxnreg}" if cfg.maxnreg else ""))


def inputs(bsz: int, ctx: int, g: torch.Generator):
    dev = "cuda" if GPU else "cpu"
    caches = [torch.randn(bsz, ctx, C + R, generator=g).to(dev, torch.bfloat16) for _ in range(LAYERS)]
    q = torch.randn(bsz, H, C, generator=g).to(dev, torch.bfloat16)
    qp = torch.randn(bsz, H, R, generator=g).to(dev, torch.bfloat16)
    seqlens = torch.full((bsz,), ctx - 1, dtype=torch.int32, device=dev)
    return caches, q, qp, seqlens


def run_point(cfg, caches, q, qp, seqlens):
    def step():
        outs = []
        for cache in caches:
            kv, pe = cache[:, :-1, :C], cache[:, :-1, C:]
            outs.append(kd.mla_decode(q, qp, kv, pe, seqlens, SCALE, kv_new=cache[:, -1, :C], pe_new=cache[:, -1, C:],
                                      runtime_splits=True, config=cfg))
        return outs

    if not GPU:
        return None, step()[-1]
    step()  # compiles outside the graph
    captured = []
    graph = _graph_of(step, captured)
    outs = captured[0]
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    return ms * 1e3 / LAYERS, outs[-1]


def main() -> int:
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    rows, failures = [], 0
    for bsz, ctx in SHAPES:
        caches, q, qp, seqlens = inputs(bsz, ctx, g)
        full = torch.full((bsz,), ctx, dtype=torch.int32, device=q.device)
        last = caches[-1].float()
        ref = mla_decode_ref(q.float(), qp.float(), last[..., :C], last[..., C:], full, SCALE)
        for cfg in CONFIGS:
            try:
                us, out = run_point(cfg, caches, q, qp, seqlens)
            except Exception as exc:  # a config that does not fit: recorded, not fatal
                rows.append(dict(batch=bsz, ctx=ctx, config=label(cfg), error=f"{type(exc).__name__}: {exc}"[:200]))
                print(f"B={bsz} ctx={ctx} {label(cfg)}: failed {rows[-1]['error']}", flush=True)
                continue
            err = ((out.float() - ref).abs().mean() / ref.abs().mean()).item()
            failures += err >= 1e-2
            rows.append(dict(batch=bsz, ctx=ctx, config=label(cfg), us_per_call=us, mean_rel_err=err))
            print(f"B={bsz} ctx={ctx} {label(cfg):22s} " + (f"{us:7.2f} us" if us is not None else "") +
                  f"  err {err:.1e}", flush=True)
        del caches
    print(f"{len(rows)} points in {time.time() - t0:.0f} s, {failures} wrong")
    if os.environ.get("OUT"):
        meta = dict(gpu=torch.cuda.get_device_name() if GPU else "cpu", torch=torch.__version__, layers=LAYERS)
        Path(os.environ["OUT"], "mla_config_probe.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
