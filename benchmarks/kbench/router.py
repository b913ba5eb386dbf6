"""Sections `topk`, `gate` and `router_align`: the MoE router's kernels (kernels/topk.py, router_gate.py) against torch's
chain of ops. topk: top-k over the routed + shared experts' scores, the softmax router (router_topk) and
the gate GEMM + router in one launch (router_topk_gate); gate: the decode batches from CUDA graphs, the
split-over-programs form (router_topk_gate_split) against cuBLAS's F.linear + router_topk and the
one-program form; router_align: the router and moe_align in one launch (kernels/router_align.py)
against the two launches, from CUDA graphs. Ids are checked exactly, except where the reference's
logits nearly tie.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kbench.common import Report, Row, Shapes, _graph_of, add, bench, finish_group, guarded, show


def _torch_router(logits: torch.Tensor, k: int, n_routed: int, n_shared: int = 2):
    """The reference Gate's ops (softmax router, scale 1) and fuse_shared_experts' columns, as torch runs them."""
    p = logits.softmax(dim=-1, dtype=torch.float32)
    ids = torch.topk(p, k, dim=-1)[1]
    weights = p.gather(1, ids).to(logits.dtype)
    shared = torch.arange(n_routed, n_routed + n_shared, device=logits.device).expand(logits.shape[0], n_shared)
    return torch.cat([weights, weights.new_ones(logits.shape[0], n_shared)], 1), torch.cat([ids, shared], 1)


def bench_topk(report: Report, sh: Shapes, quick: bool) -> None:
    """The router's top-k over softmax scores of the routed + shared experts (fuse_shared_experts),
    and the whole softmax router (engines/torch_router.py) against torch's chain of ops."""
    from dsv3_export.kernels.topk import router_topk, router_topk_ref, topk

    n = sh.n_experts + 2
    for m in (*sh.decode_m, sh.prefill_m):
        case = f"router topk M={m} E={n} k={sh.topk}"
        scores = torch.randn(m, n, device=sh.device).softmax(-1)  # [M, E]
        got, want = topk(scores, sh.topk), torch.topk(scores, sh.topk)
        wrong = float((got[1] != want[1]).float().mean()) + float((got[0] != want[0]).float().mean())
        bytes_ = m * n * 4 + m * sh.topk * (4 + 8)
        rows = [add(report, Row("topk", case, "triton topk (sorted)", bench(lambda: topk(scores, sh.topk), sh, quick),
                                error=wrong, tol=0.0, ok=wrong == 0), bytes_=bytes_),
                add(report, Row("topk", case, "torch topk (sorted)",
                                bench(lambda: torch.topk(scores, sh.topk), sh, quick)), bytes_=bytes_),
                add(report, Row("topk", case, "torch topk (sorted=False)",
                                bench(lambda: torch.topk(scores, sh.topk, sorted=False), sh, quick)), bytes_=bytes_)]
        finish_group(rows)
        show(case, rows)
        case = f"softmax router M={m} E={sh.n_experts}+2 k={sh.topk}"
        logits = torch.randn(m, sh.n_experts, device=sh.device, dtype=torch.bfloat16)
        route = dict(n_extra=2, first_extra=sh.n_experts, out_dtype=torch.bfloat16)
        got, want = router_topk(logits, sh.topk, **route), router_topk_ref(logits, sh.topk, **route)
        wrong = float((got[1] != want[1]).float().mean())
        bytes_ = m * sh.n_experts * 2 + m * (sh.topk + 2) * (2 + 8)
        rows = [add(report, Row("topk", case, "triton router_topk, one launch",
                                bench(lambda: router_topk(logits, sh.topk, **route), sh, quick),
                                error=wrong, tol=0.0, ok=wrong == 0), bytes_=bytes_),
                add(report, Row("topk", case, "torch softmax + topk + gather + cat",
                                bench(lambda: _torch_router(logits, sh.topk, sh.n_experts), sh, quick)), bytes_=bytes_)]
        finish_group(rows)
        show(case, rows)
    for m in sorted({sh.decode_m[0], sh.decode_m[-1], sh.prefill_m}):  # 16b: M = 1, 64, 4096
        _bench_router_gate(report, sh, quick, m)


def _untied_mismatch(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, want: torch.Tensor, k: int) -> float:
    """Fraction of rows whose top-k ids differ from the reference's where its top-(k+1) logits hold
    no two within one rounding of x's dtype (kernels/router_gate.py router_topk_gate: its logits are
    cuBLAS's up to the summation order, then one rounding; tests/kernels/test_topk.py's tie rule)."""
    logits = torch.nn.functional.linear(x, w).float()  # [M, E]
    top = logits.topk(k + 1, dim=1).values  # [M, k + 1]
    step = torch.finfo(x.dtype).eps * top.abs() + 1e-6 * top.abs().amax(1, keepdim=True)
    near_tie = ((top[:, :-1] - top[:, 1:]) <= step[:, :-1] + step[:, 1:]).any(1)
    return float(((ids[:, :k] != want[:, :k]).any(1) & ~near_tie).float().mean())


def _bench_router_gate(report: Report, sh: Shapes, quick: bool, m: int) -> None:
    """The gate GEMM + router in one launch (engines/torch_router.py DSV3_TORCH_ROUTER_GATE) against
    torch's linear + the router's ops, and against torch's linear + the router kernel."""
    from dsv3_export.kernels.router_gate import router_topk_gate, router_topk_gate_ref
    from dsv3_export.kernels.topk import router_topk

    case = f"gate + router M={m} D={sh.dim} E={sh.n_experts}+2 k={sh.topk}"
    x = torch.randn(m, sh.dim, device=sh.device, dtype=torch.bfloat16)
    w = (torch.randn(sh.n_experts, sh.dim, device=sh.device) / sh.dim**0.5).to(torch.bfloat16)
    route = dict(n_extra=2, first_extra=sh.n_experts, out_dtype=torch.bfloat16)
    got, want = router_topk_gate(x, w, sh.topk, **route), router_topk_gate_ref(x, w, sh.topk, **route)
    wrong = _untied_mismatch(x, w, got[1], want[1], sh.topk)
    bytes_ = (m + sh.n_experts) * sh.dim * 2 + m * (sh.topk + 2) * (2 + 8)
    flops = 2 * m * sh.dim * sh.n_experts
    rows = [add(report, Row("topk", case, "triton router_topk_gate, one launch",
                            bench(lambda: router_topk_gate(x, w, sh.topk, **route), sh, quick),
                            error=wrong, tol=0.0, ok=wrong == 0), bytes_=bytes_, flops=flops),
            add(report, Row("topk", case, "torch linear + softmax + topk + gather + cat",
                            bench(lambda: _torch_router(torch.nn.functional.linear(x, w), sh.topk, sh.n_experts), sh,
                                  quick)), bytes_=bytes_, flops=flops),
            add(report, Row("topk", case, "torch linear + triton router_topk",
                            bench(lambda: router_topk(torch.nn.functional.linear(x, w), sh.topk, **route), sh, quick)),
                bytes_=bytes_, flops=flops)]
    finish_group(rows)
    show(case, rows)


GATE_GRAPH_M = (1, 8, 64)  # decode batches of the gate section on the GPU


def bench_gate(report: Report, sh: Shapes, quick: bool) -> None:
    """The MoE gate GEMM + router at decode batches as the decode step runs them, from CUDA graphs:
    router_topk_gate_split (engines/torch_router.py DSV3_TORCH_ROUTER_GATE=split: the experts split over
    programs, the last of a row block to arrive routes), the default (cuBLAS's F.linear + router_topk)
    and the one-program router_topk_gate (=1). Ids checked on each graph's own output after its timing
    (the split form's arrival counters must survive the replays, and be zero after them). The split
    autotuner's key has no batch: M=8 and 64 reuse M=1's choice (as eager decode calls do), so at the
    largest M each split config is also timed pinned (printed; the fastest tabled)."""
    from dsv3_export.kernels import _common
    from dsv3_export.kernels import router_gate as kg
    from dsv3_export.kernels import topk as kt

    route = dict(n_extra=2, first_extra=sh.n_experts, out_dtype=torch.bfloat16)
    ms_list = GATE_GRAPH_M if sh.device == "cuda" else sh.decode_m
    one_program_cfg = None  # router_topk_gate: autotuned at the first M, that choice pinned after (its key has M)
    for m in ms_list:
        case = f"gate + router M={m} D={sh.dim} E={sh.n_experts}+2 k={sh.topk}"
        x = torch.randn(m, sh.dim, device=sh.device, dtype=torch.bfloat16)
        w = (torch.randn(sh.n_experts, sh.dim, device=sh.device) / sh.dim**0.5).to(torch.bfloat16)
        want = kg.router_topk_gate_ref(x, w, sh.topk, **route)[1]
        bytes_ = (m + sh.n_experts) * sh.dim * 2 + m * (sh.topk + 2) * (2 + 8)
        flops = 2 * m * sh.dim * sh.n_experts

        def timed(impl: str, fn, note: str = ""):
            fn()  # autotune outside the graph
            if sh.device == "cuda":
                outs: list = []
                ms = bench(_graph_of(fn, outs).replay, sh, quick)
                torch.cuda.synchronize()
                got = outs[0]
            else:
                ms, got = bench(fn, sh, quick), fn()
            wrong = _untied_mismatch(x, w, got[1], want, sh.topk)
            clean = all(bool((b == 0).all()) for b in _common._arrival_buffers.values())
            return add(report, Row("gate", case, impl + (" (CUDA graph)" if sh.device == "cuda" else ""), ms,
                                   error=wrong, tol=0.0, ok=wrong == 0 and clean,
                                   note=note + ("" if clean else " arrival counters NOT reset")),
                       bytes_=bytes_, flops=flops)

        split = lambda cfg=None: kg.router_topk_gate_split(x, w, sh.topk, config=cfg, **route)  # noqa: E731
        rows = [guarded(report, f"gate {case} split", lambda: timed("triton router_topk_gate_split", split)),
                guarded(report, f"gate {case} one program", lambda: timed(
                    "triton router_topk_gate", lambda: kg.router_topk_gate(x, w, sh.topk, config=one_program_cfg,
                                                                         **route))),
                guarded(report, f"gate {case} linear", lambda: timed(
                    "torch linear + triton router_topk", lambda: kt.router_topk(F.linear(x, w), sh.topk, **route)))]
        if sh.device == "cuda":
            chosen = getattr(kg._router_gate_split_tuned, "best_config", None)
            if rows[0] is not None:
                rows[0].note = f"autotuned at M={ms_list[0]}: {chosen}"
            one_program_cfg = one_program_cfg or getattr(kg._router_gate_tuned, "best_config", None)
        if m == ms_list[-1]:  # each split config pinned at the largest M
            pinned = [guarded(report, f"gate {case} split {cfg}", lambda cfg=cfg: timed(
                "triton router_topk_gate_split pinned", lambda: split(cfg), note=str(cfg)))
                for cfg in kg.GATE_SPLIT_CONFIGS]
            pinned = [r for r in pinned if r is not None]
            print("    split configs pinned: " + "; ".join(f"{r.note}: {r.ms:.4f} ms" for r in pinned), flush=True)
            good = [r for r in pinned if r.ok]
            best = min(good, key=lambda r: r.ms) if good else None
            for r in good:  # the fastest correct one tabled; a wrong one stays as a failed row
                if r is not best:
                    report.rows.remove(r)
            if best is not None:
                best.impl = "triton router_topk_gate_split best pinned config" + best.impl.split("pinned")[1]
                rows.append(best)
        rows = [r for r in rows if r]
        finish_group(rows)
        show(case, rows)


ALIGN_GRAPH_M = (1, 8, 64)  # decode batches of the router_align section on the GPU
ALIGN_BLOCK_M = 16  # engines/torch_triton.py BLOCK_M["decode"]


def _align_errors(got: tuple, want: tuple, dtype: torch.dtype) -> int:
    """Elements of router_align's five outputs off the reference: ids and the alignment exactly,
    weights within two roundings of dtype (the kernel's exp against torch's; tests/kernels/test_topk.py)."""
    ulp = torch.finfo(dtype).eps
    bad = int(((got[0].float() - want[0].float()).abs() > 2 * ulp * want[0].float().abs() + 1e-30).sum())
    return bad + sum(int((g != w).sum()) if g.shape == w.shape else w.numel() for g, w in zip(got[1:], want[1:]))


def bench_router_align(report: Report, sh: Shapes, quick: bool) -> None:
    """The 16b decode router (64 routed + 2 shared experts, k=6) and moe_align (E=66, block_m 16) as the
    decode program runs them, from CUDA graphs: router_topk then moe_align (two launches, the default)
    against router_align (one program: engines/torch_router.py DSV3_TORCH_ROUTER_ALIGN=1). Checked on
    each graph's own outputs after its timing: ids and alignment exactly the reference's, weights within
    two bf16 roundings, and router_align bit for bit the two launches' outputs (each autotuned; a
    difference is noted, not failed: the two autotuners may pick tiles that sum the softmax in other
    orders), and, failing otherwise, each router_align config bit for bit the two launches with
    router_topk's config of the same routing tile (kernels/router_align.py ROUTER_TWINS)."""
    from dsv3_export.kernels import moe_align as A
    from dsv3_export.kernels import router_align as RA
    from dsv3_export.kernels import topk as kt

    e, k = sh.n_experts + 2, sh.topk
    route = dict(scale=1.0, n_extra=2, first_extra=sh.n_experts, out_dtype=torch.bfloat16)
    for m in ALIGN_GRAPH_M if sh.device == "cuda" else sh.decode_m:
        case = f"router + moe_align M={m} E={sh.n_experts}+2 k={k} block_m={ALIGN_BLOCK_M}"
        logits = torch.randn(m, sh.n_experts, device=sh.device, dtype=torch.bfloat16)  # [M, E routed]
        want = RA.router_align_ref(logits, k, e, ALIGN_BLOCK_M, **route)
        bytes_ = m * sh.n_experts * 2 + m * (k + 2) * (2 + 8)  # logits in; weights, ids out (the floor ignores align)

        def separate():
            weights, ids = kt.router_topk(logits, k, **route)
            return (weights, ids, *A.moe_align(ids, e, ALIGN_BLOCK_M))

        def fused():
            return RA.router_align(logits, k, e, ALIGN_BLOCK_M, **route)

        outs: dict[str, tuple] = {}

        def timed(impl: str, fn, note: str):
            fn()  # autotune outside the graph
            if sh.device == "cuda":
                captured: list = []
                ms = bench(_graph_of(fn, captured).replay, sh, quick)
                torch.cuda.synchronize()
                got = captured[0]
            else:
                ms, got = bench(fn, sh, quick), fn()
            outs[impl] = got
            wrong = _align_errors(got, want, torch.bfloat16)
            same = "separate" not in outs or all(torch.equal(a, b) for a, b in zip(got, outs["separate"]))
            return add(report, Row("router_align", case, note + (" (CUDA graph)" if sh.device == "cuda" else ""), ms,
                                   error=float(wrong), tol=0.0, ok=wrong == 0,
                                   note="" if same else "NOT bit-identical to the autotuned router_topk + moe_align"),
                       bytes_=bytes_)

        rows = [guarded(report, f"router_align {case} separate",
                        lambda: timed("separate", separate, "triton router_topk + moe_align, two launches")),
                guarded(report, f"router_align {case} fused",
                        lambda: timed("fused", fused, "triton router_align, one launch"))]
        if all(rows) and rows[1].ms:
            # each config against router_topk's config of the same routing tile (RA.ROUTER_TWINS): bit for bit
            pinned = [all(torch.equal(a, b) for a, b in zip(
                RA.router_align(logits, k, e, ALIGN_BLOCK_M, config=cfg, **route),
                (*kt.router_topk(logits, k, config=twin, **route),
                 *A.moe_align(kt.router_topk(logits, k, config=twin, **route)[1], e, ALIGN_BLOCK_M))))
                for cfg, twin in zip(RA.ROUTER_ALIGN_CONFIGS, RA.ROUTER_TWINS)]
            rows[1].ok = rows[1].ok and all(pinned)
            rows[1].note = (rows[1].note + f" {rows[0].ms / rows[1].ms:.2f}x the two launches; config "
                            f"{getattr(RA._router_align_tuned, 'best_config', None)} (router_topk: "
                            f"{getattr(kt._router_tuned, 'best_config', None)}); pinned twins bit-identical: "
                            f"{pinned}").strip()
        rows = [r for r in rows if r]
        show(case, rows)
