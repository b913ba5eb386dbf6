"""Section `router`: the softmax MoE router in one launch (kernels/topk.py router_topk) against torch's
chain of ops (softmax, top-k, gather, the shared experts' columns). Ids are checked exactly.
"""

from __future__ import annotations

import torch

from kbench.common import Report, Row, Shapes, add, bench, finish_group, show


def _torch_router(logits: torch.Tensor, k: int, n_routed: int, n_shared: int = 2):
    """The reference Gate's ops (softmax router, scale 1) and fuse_shared_experts' columns, as torch runs them."""
    p = logits.softmax(dim=-1, dtype=torch.float32)
    ids = torch.topk(p, k, dim=-1)[1]
    weights = p.gather(1, ids).to(logits.dtype)
    shared = torch.arange(n_routed, n_routed + n_shared, device=logits.device).expand(logits.shape[0], n_shared)
    return torch.cat([weights, weights.new_ones(logits.shape[0], n_shared)], 1), torch.cat([ids, shared], 1)


def bench_router(report: Report, sh: Shapes, quick: bool) -> None:
    """The whole softmax router (engines/torch_router.py) over the routed experts' logits, with the
    shared experts' columns, against torch's chain of ops."""
    from dsv3_export.kernels.topk import router_topk, router_topk_ref

    for m in (*sh.decode_m, sh.prefill_m):
        case = f"softmax router M={m} E={sh.n_experts}+2 k={sh.topk}"
        logits = torch.randn(m, sh.n_experts, device=sh.device, dtype=torch.bfloat16)
        route = dict(n_extra=2, first_extra=sh.n_experts, out_dtype=torch.bfloat16)
        got, want = router_topk(logits, sh.topk, **route), router_topk_ref(logits, sh.topk, **route)
        wrong = float((got[1] != want[1]).float().mean())
        bytes_ = m * sh.n_experts * 2 + m * (sh.topk + 2) * (2 + 8)
        rows = [add(report, Row("router", case, "triton router_topk, one launch",
                                bench(lambda: router_topk(logits, sh.topk, **route), sh, quick),
                                error=wrong, tol=0.0, ok=wrong == 0), bytes_=bytes_),
                add(report, Row("router", case, "torch softmax + topk + gather + cat",
                                bench(lambda: _torch_router(logits, sh.topk, sh.n_experts), sh, quick)), bytes_=bytes_)]
        finish_group(rows)
        show(case, rows)
