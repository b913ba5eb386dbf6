"""Section `absorb`: MLA decode's absorbed projections, kernels/mla_absorb.py head_gemm (q_nope @ W_UK,
lat @ W_UV per head, one launch on the strided views) against the einsums it replaces; on the GPU also
from CUDA graphs, checked on the graph's own output.
"""

from __future__ import annotations

import torch

from kbench.common import Report, Row, Shapes, _graph_of, add, bench, finish_group, guarded, mean_rel, show


# MLA's absorbed projections at the 16b head dims (qk_nope_head_dim, v_head_dim); the CPU smoke
# test's dims are off the kernel's blocks.
ABSORB_HEAD_DIMS = {"cuda": (128, 128), "cpu": (40, 24)}
ABSORB_TOL = 1e-2  # mean rel err vs the bf16 einsum: both round an fp32 sum to bf16


def bench_absorb(report: Report, sh: Shapes, quick: bool) -> None:
    """The decode program's absorbed MLA projections, q_nope @ W_UK and lat @ W_UV per head:
    kernels/mla_absorb.py head_gemm (one launch on the strided q_nope slice and the wkv_b views)
    against the einsums it replaces (Inductor / eager torch: permute copy + bmm + copy). On the GPU
    both also from CUDA graphs (the decode step's form), checked on the graph's own output."""
    from dsv3_export.kernels.mla_absorb import head_gemm

    h, c = sh.n_heads, sh.kv_lora
    dn, dv = ABSORB_HEAD_DIMS[sh.device]
    w = (torch.randn(h * (dn + dv), c, device=sh.device) * c**-0.5).bfloat16().view(h, dn + dv, c)  # [h, dn + dv, c]
    w_uk, w_uv = w[:, :dn], w[:, dn:]  # [h, dn, c], [h, dv, c]
    for m in ((1, 8, 64) if sh.device == "cuda" else sh.decode_m):
        q = torch.randn(m, 1, h, dn + sh.rope, device=sh.device).bfloat16()  # the q projection [b, 1, h, dn + r]
        q_nope = q[..., :dn]  # [b, 1, h, dn], strided
        lat = torch.randn(m, h, c, device=sh.device).bfloat16()  # mla_decode's output [b, h, c]
        projections = (
            ("W_UK", dn, c, lambda: head_gemm(q_nope[:, 0], w_uk),  # [b, h, c]
             lambda: torch.einsum("bshd,hdc->bshc", q_nope, w_uk).contiguous()),  # [b, 1, h, c]
            ("W_UV", c, dv, lambda: head_gemm(lat, w_uv.transpose(1, 2)),  # [b, h, dv]
             lambda: torch.einsum("bshc,hdc->bshd", lat[:, None], w_uv)),  # [b, 1, h, dv]
        )
        for name, k, n, ours, theirs in projections:
            case = f"{name} M={m} H={h} K={k} N={n}"
            bytes_, flops = 2 * (h * k * n + m * h * (k + n)), 2 * m * h * k * n
            ref = theirs().float().view(m, h, n)

            def checked(impl: str, fn, graph: bool):
                out = []
                timed = _graph_of(lambda: out.append(fn()) or out[-1]).replay if graph else fn
                ms = bench(timed, sh, quick)
                err = mean_rel((out[-1] if graph else fn()).float().view(m, h, n), ref)
                return add(report, Row("absorb", case, impl, ms, error=err, tol=ABSORB_TOL, ok=err < ABSORB_TOL),
                           bytes_=bytes_, flops=flops)

            rows = [guarded(report, f"absorb {case} triton", lambda: checked("triton head_gemm", ours, False)),
                    guarded(report, f"absorb {case} torch", lambda: checked("torch einsum", theirs, False))]
            if sh.device == "cuda":
                rows += [guarded(report, f"absorb {case} triton graph",
                                 lambda: checked("triton head_gemm (CUDA graph)", ours, True)),
                         guarded(report, f"absorb {case} torch graph",
                                 lambda: checked("torch einsum (CUDA graph)", theirs, True))]
            rows = [r for r in rows if r]
            finish_group(rows)
            show(case, rows)

