"""Norms section: the decode step's residual add + RMSNorm inside the kernel that reads its output, from CUDA graphs.

  norms  the attention norm: kernels/rms_norm.py's norm kernel + fp8_gemv (two launches, as the decode program runs
         the Linear with an Inductor norm kernel before it) against fp8_gemv_normed (the norm in the GEMV's prologue,
         engines/torch_attn_norm.py DSV3_TORCH_ATTN_NORM=gemv), wq + wkv_a at M = 1, 2 with the weight read from
         HBM. Why: the 27-layer A/Bs time whole steps; these time the kernels they change, so a loss shows where it is.
"""

from __future__ import annotations

import torch

from kbench.common import Report, Row, Shapes, add, guarded, show
from kbench.gemv import COLD_BYTES, _cold_graph_ms, _linear_shapes, _ratio_vs_first

NORM_M_GEMV = (1, 2)


def bench_norms(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels import fp8_gemv as V
    from dsv3_export.kernels import rms_norm as N
    from dsv3_export.reference import fp8 as R

    torch.manual_seed(0)
    d = sh.dim
    nw = (1 + 0.2 * torch.randn(d, device=sh.device)).to(torch.bfloat16)
    name, n, k = _linear_shapes(sh)[0]  # wq + wkv_a
    w, w_s = R.weight_quant(torch.randn(n, k, device=sh.device) / k**0.5)
    n_copies = max(2, -(-COLD_BYTES // (n * k))) if sh.device == "cuda" else 2
    copies = [(w.clone(), w_s.clone()) for _ in range(n_copies)]
    for m in NORM_M_GEMV if sh.device == "cuda" else NORM_M_GEMV[:1]:
        r = (torch.randn(m, d, device=sh.device) * 4).to(torch.bfloat16)
        delta = torch.randn(m, d, device=sh.device).to(torch.bfloat16)
        case = f"attention norm + {name} M={m} N={n} K={k}, {n_copies} weight copies (cold L2)"
        x, _ = N.add_rms_norm(r, delta, nw, 1e-6)
        want = V.fp8_gemv(x, w, w_s)
        got, h = V.fp8_gemv_normed(r, delta, nw, 1e-6, w, w_s)
        same = bool(torch.equal(got, want) and torch.equal(h, r + delta))
        rows = [guarded(report, f"norms {case} two launches", lambda: add(report, Row(
            "norms", case, "baseline: add_rms_norm + fp8_gemv (two launches), cold L2", _cold_graph_ms(
                lambda wq, ws: V.fp8_gemv(N.add_rms_norm(r, delta, nw, 1e-6)[0], wq, ws), copies, sh, quick)),
            bytes_=n * k))]
        rows.append(guarded(report, f"norms {case} normed", lambda: add(report, Row(
            "norms", case, "fp8_gemv_normed (the norm in the prologue), cold L2", _cold_graph_ms(
                lambda wq, ws: V.fp8_gemv_normed(r, delta, nw, 1e-6, wq, ws), copies, sh, quick),
            error=0.0 if same else 1.0, tol=0.0, ok=same, note="y and h bit for bit the two launches'"),
            bytes_=n * k)))
        _ratio_vs_first(rows)
        show(case, [row for row in rows if row])
