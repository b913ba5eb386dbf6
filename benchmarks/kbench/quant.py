"""Section `quant`: kernels/fp8_quant.py act_quant (bit-exact against the reference's) and
weight_dequant, each against the eager torch reference it replaces.
"""

from __future__ import annotations

import torch

from kbench.common import Report, Row, Shapes, add, bench, finish_group, mean_rel, show


def bench_act_quant(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels.fp8_quant import act_quant, weight_dequant
    from dsv3_export.reference import fp8 as R

    for m in (*sh.decode_m, sh.prefill_m):
        for k in (sh.dim, sh.inter):
            case = f"act_quant M={m} K={k}"
            x = torch.randn(m, k, device=sh.device, dtype=torch.bfloat16)
            q, s = act_quant(x)
            q_ref, s_ref = R.act_quant(x)  # on x's device: the kernel matches torch's scale form there
            bad_s = int((s != s_ref).sum())
            bad_q = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
            exact = bad_s == 0 and bad_q == 0
            bytes_ = m * k * 3 + s.numel() * 4
            note = ("bit-exact vs reference" if exact else
                    f"NOT bit-exact: {bad_s}/{s.numel()} scales, {bad_q}/{q.numel()} fp8 bytes differ")
            rows = [add(report, Row("act_quant", case, "triton act_quant", bench(lambda: act_quant(x), sh, quick),
                                    error=max(bad_s / s.numel(), bad_q / q.numel()), tol=0.0, ok=exact,
                                    note=note), bytes_=bytes_),
                    add(report, Row("act_quant", case, "torch eager reference",
                                    bench(lambda: R.act_quant(x), sh, quick)), bytes_=bytes_)]
            finish_group(rows)
            show(case, rows)
    case = f"weight_dequant N={sh.inter} K={sh.dim}"
    w, w_s = R.weight_quant(torch.randn(sh.inter, sh.dim, device=sh.device))
    err = mean_rel(weight_dequant(w, w_s, torch.bfloat16).float(), R.weight_dequant(w, w_s, torch.float32))
    bytes_ = sh.inter * sh.dim * 3
    rows = [add(report, Row("weight_dequant", case, "triton weight_dequant",
                            bench(lambda: weight_dequant(w, w_s, torch.bfloat16), sh, quick), error=err, tol=4e-3,
                            ok=err < 4e-3), bytes_=bytes_),
            add(report, Row("weight_dequant", case, "torch eager reference",
                            bench(lambda: R.weight_dequant(w, w_s, torch.bfloat16), sh, quick)), bytes_=bytes_)]
    finish_group(rows)
    show(case, rows)
