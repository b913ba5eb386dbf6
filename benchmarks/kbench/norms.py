"""Norms section: the decode step's residual add + RMSNorm inside the kernel that reads its output, from CUDA graphs.

  norms  attention: kernels/rms_norm.py's norm kernel + fp8_gemv (two launches, as the decode program runs the
         Linear with an Inductor norm kernel before it) against fp8_gemv_normed (the norm in the GEMV's prologue,
         engines/torch_attn_norm.py DSV3_TORCH_ATTN_NORM=gemv), wq + wkv_a at M = 1, 2 with the weight read from
         HBM; ffn: the norm kernel + the split gate with act_quant(x) against the gate kernel computing the norm
         itself (engines/torch_gate_norm.py DSV3_TORCH_GATE_NORM=1, row by row up to ROW_QUANT_MAX_ROWS rows) at
         M = 1, 2, 8. Why: the 27-layer A/Bs time whole steps; these time the kernels they change, so a loss shows
         where it is (session 23: the gate norm's first form, 9.2 us a call inside the step).
"""

from __future__ import annotations

import torch

from kbench.common import Report, Row, Shapes, add, guarded, show
from kbench.gemv import COLD_BYTES, _cold_graph_ms, _linear_shapes, _ratio_vs_first

NORM_M_GEMV = (1, 2)
NORM_M_GATE = (1, 2, 8)


def bench_norms(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels import fp8_gemv as V
    from dsv3_export.kernels import rms_norm as N
    from dsv3_export.kernels import router_gate as RG
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
    e = sh.n_experts
    gate = torch.randn(e, d, device=sh.device, dtype=torch.bfloat16) / d**0.5
    for m in NORM_M_GATE if sh.device == "cuda" else NORM_M_GATE[:1]:
        r = (torch.randn(m, d, device=sh.device) * 4).to(torch.bfloat16)
        delta = torch.randn(m, d, device=sh.device).to(torch.bfloat16)
        case = f"ffn norm + MoE gate partials with act_quant(x) M={m} E={e} D={d}"
        x, _ = N.add_rms_norm(r, delta, nw, 1e-6)
        want = RG.gate_partials(x, gate, quant_x=True)[0]
        got = RG.gate_partials_normed(r, delta, nw, 1e-6, gate, quant_x=True)[0]
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        rows = [guarded(report, f"norms {case} two launches", lambda: add(report, Row(
            "norms", case, "baseline: add_rms_norm + gate_partials (two launches)", _cold_graph_ms(
                lambda: RG.gate_partials(N.add_rms_norm(r, delta, nw, 1e-6)[0], gate, quant_x=True), [()], sh,
                quick)), bytes_=e * d * 2))]
        rows.append(guarded(report, f"norms {case} normed", lambda: add(report, Row(
            "norms", case, "gate_partials_normed (the norm in the gate kernel)", _cold_graph_ms(
                lambda: RG.gate_partials_normed(r, delta, nw, 1e-6, gate, quant_x=True), [()], sh, quick),
            error=err, tol=1e-2, ok=err < 1e-2, note="partials vs the two launches' (x may differ by a rounding)"),
            bytes_=e * d * 2)))
        _ratio_vs_first(rows)
        show(case, [row for row in rows if row])
