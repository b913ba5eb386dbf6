"""GEMV section, kernels/fp8_gemv.py at the 16b decode shapes, from CUDA graphs:
  gemv   fp8_gemv (act_quant in registers, one launch) against act_quant + fp8_gemm (+ its split-K
         sum), as the decode program runs a Linear now, at M = 1, 2, 4 on the step's fp8 weights; and
         the fp8 MoE of T = 1, 2, 4 tokens as two moe_gemv launches + the sum over k against
         moe_align + act_quant + up + act_quant(h) + down + the sum. Each config of GEMV_CONFIGS is
         timed pinned (the packages do not autotune the GEMV: they are tuned at batch 64, where it
         launches nothing). A graph holds GRAPH_REPEATS calls back to back, as a decode step's graph
         holds its kernels, so the replay's launch cost is spread over them.
"""

from __future__ import annotations

import torch

from kbench.common import Report, Row, Shapes, _graph_of, add, bench, guarded, mean_rel, show
from kbench.moe import _decode_experts, _decode_tokens

GRAPH_REPEATS = 20
GEMV_M = (1, 2, 4)
# Cold-L2 cases: enough weight copies to pass this many bytes per graph replay, so each call reads its
# weight from HBM as a decode step does (the H200's L2 is 50 MB; a repeated 7.5 MB weight stays in it).
COLD_BYTES = 128 << 20


def _candidates():
    """GEMV_CONFIGS, then a few more tiles and chunk widths (pinned, timed the same way)."""
    import triton

    from dsv3_export.kernels import fp8_gemv as V

    extra = [({"BLOCK_N": 32, "CHUNK": 256}, 4), ({"BLOCK_N": 4, "CHUNK": 1024}, 4), ({"BLOCK_N": 32, "CHUNK": 128}, 2)]
    return list(V.GEMV_CONFIGS) + [triton.Config(kw, num_warps=w, num_stages=1) for kw, w in extra]


def _graph_ms(fn, sh: Shapes, quick: bool) -> float:
    """ms per call of fn, from a CUDA graph of GRAPH_REPEATS calls (one eager call on the CPU)."""
    return _cold_graph_ms(fn, [()], sh, quick)


def _cold_graph_ms(call, weights: list, sh: Shapes, quick: bool) -> float:
    """ms per call of call(w, w_s), from a CUDA graph of GRAPH_REPEATS calls that cycle through the
    weight copies (none is read twice within COLD_BYTES of traffic)."""
    if sh.device != "cuda":
        return bench(lambda: call(*weights[0]), sh, quick)
    graph = _graph_of(lambda: [call(*weights[i % len(weights)]) for i in range(GRAPH_REPEATS)])
    return bench(graph.replay, sh, quick) / GRAPH_REPEATS


def _cold_candidates():
    """_candidates and one-step chunks (CHUNK = K = 2048: the whole row slice in one load) for the cold sweep."""
    import triton

    extra = [({"BLOCK_N": 8, "CHUNK": 2048}, 8), ({"BLOCK_N": 4, "CHUNK": 2048}, 4), ({"BLOCK_N": 8, "CHUNK": 1024}, 8),
             ({"BLOCK_N": 4, "CHUNK": 1024}, 2)]
    return _candidates() + [triton.Config(kw, num_warps=w, num_stages=1) for kw, w in extra]


def bench_decode_cold(report: Report, sh: Shapes, quick: bool) -> None:
    """Section decode_cold: the batch-1 decode step's small weight reads from HBM, as the step reads them.
    The attention Linears' GEMV in every candidate config (the packages pin GEMV_CONFIGS[0], chosen
    L2-warm in session 13), and the MoE gate: cuBLAS linear + router_topk against kernels/router_gate.py's
    K-split partials + the router summing them (DSV3_TORCH_GATE_SPLIT), with and without act_quant(x)."""
    bench_gemv_cold(report, sh, quick, configs=_cold_candidates() if sh.device == "cuda" else None)
    from dsv3_export.kernels import router_gate as RG
    from dsv3_export.kernels import topk as TK

    torch.manual_seed(0)
    e, d, k = sh.n_experts, sh.dim, sh.topk
    gate = torch.randn(e, d, device=sh.device, dtype=torch.bfloat16) / d**0.5
    n_copies = max(2, -(-COLD_BYTES // (e * d * 2))) if sh.device == "cuda" else 2
    copies = [(gate.clone(),) for _ in range(n_copies)]
    x = torch.randn(1, d, device=sh.device, dtype=torch.bfloat16)
    route = dict(scale=1.0, n_extra=2, first_extra=e, out_dtype=torch.bfloat16)
    case = f"MoE gate + router M=1 E={e} D={d}, {n_copies} gate copies (cold L2)"

    def cublas(w):
        return TK.router_topk(torch.nn.functional.linear(x, w), k, **route)

    def split(w, quant_x=False, cfg=None, rows=RG.ROW_QUANT_MAX_ROWS):
        return RG.gate_router_topk(x, w, k, quant_x=quant_x, row_quant_max_rows=rows, config=cfg, **route)[:2]

    want_ids = cublas(gate)[1]
    wrong = float((split(gate)[1] != want_ids).float().mean())
    rows = [guarded(report, f"decode_cold {case} cublas", lambda: add(report, Row(
        "decode_cold", case, "baseline: cuBLAS linear + router_topk, cold L2", _cold_graph_ms(cublas, copies, sh, quick)),
        bytes_=e * d * 2))]
    # each gate config pinned (the packages run GATE_CONFIGS[0]), without act_quant(x), and with it quantized as
    # whole tiles (0) or row by row (ROW_QUANT_MAX_ROWS, the packages' default since session 20)
    forms = ((False, 0), (True, 0), (True, RG.ROW_QUANT_MAX_ROWS))
    for cfg in RG.GATE_CONFIGS if sh.device == "cuda" else RG.GATE_CONFIGS[:1]:
        for quant_x, max_rows in forms:
            how = f" + act_quant(x) rows<={max_rows}" if quant_x else ""
            rows.append(guarded(report, f"decode_cold {case} split{how} {cfg}",
                                lambda quant_x=quant_x, max_rows=max_rows, cfg=cfg, how=how: add(report, Row(
                                    "decode_cold", case, f"gate_partials{how} + router [{cfg}], cold L2",
                                    _cold_graph_ms(lambda w: split(w, quant_x, cfg, max_rows), copies, sh, quick),
                                    error=wrong, tol=0.0, ok=wrong == 0,
                                    note="ids vs cuBLAS's (can differ on near ties)"), bytes_=e * d * 2)))
    _ratio_vs_first(rows)
    show(case, [r for r in rows if r])


def bench_gemv_cold(report: Report, sh: Shapes, quick: bool, names=("wq+wkv_a", "wo"), configs=None) -> None:
    """The attention Linears at M=1 with the weight read from HBM (COLD_BYTES of copies): the chain
    against fp8_gemv's first two configs (or `configs`), as inside the decode step."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels import fp8_gemv as V
    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.reference import fp8 as R

    torch.manual_seed(0)
    for name, n, k in [s for s in _linear_shapes(sh) if s[0] in names]:
        w, w_s = R.weight_quant(torch.randn(n, k, device=sh.device) / k**0.5)
        n_copies = max(2, -(-COLD_BYTES // (n * k))) if sh.device == "cuda" else 2
        copies = [(w.clone(), w_s.clone()) for _ in range(n_copies)]
        x = torch.randn(1, k, device=sh.device, dtype=torch.bfloat16)
        case = f"{name} M=1 N={n} K={k}, {len(copies)} weight copies (cold L2)"
        rows = [guarded(report, f"gemv {case} chain", lambda: add(report, Row(
            "gemv", case, "baseline: act_quant + fp8_gemm (+ split-K sum), cold L2", _cold_graph_ms(
                lambda wq, ws: G.fp8_gemm(*Q.act_quant(x), wq, ws, torch.bfloat16, shape_class="decode"),
                copies, sh, quick)), bytes_=n * k))]
        for cfg in configs or V.GEMV_CONFIGS[:2]:
            rows.append(guarded(report, f"gemv {case} {cfg}", lambda cfg=cfg: add(report, Row(
                "gemv", case, f"fp8_gemv [{cfg}], cold L2", _cold_graph_ms(
                    lambda wq, ws: V.fp8_gemv(x, wq, ws, torch.bfloat16, config=cfg), copies, sh, quick)),
                bytes_=n * k)))
        _ratio_vs_first(rows)
        show(case, [r for r in rows if r])


def _linear_shapes(sh: Shapes) -> list[tuple[str, int, int]]:
    """(name, N, K) of the decode step's fp8 Linears (fuse_shared_input_linears: wq + wkv_a as one)."""
    q_out = sh.n_heads * (128 + sh.rope)  # 128: the 16b preset's qk_nope_head_dim and v_head_dim
    return [("wq+wkv_a", q_out + sh.kv_lora + sh.rope, sh.dim), ("wo", sh.dim, sh.n_heads * 128),
            ("dense w1+w3", 2 * sh.inter, sh.dim), ("dense w2", sh.dim, sh.inter)]


def bench_gemv(report: Report, sh: Shapes, quick: bool) -> None:
    bench_gemv_cold(report, sh, quick)
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels import fp8_gemv as V
    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.kernels.moe import moe_align, grouped_gemm
    from dsv3_export.reference import fp8 as R

    torch.manual_seed(0)
    for name, n, k in _linear_shapes(sh):
        w, w_s = R.weight_quant(torch.randn(n, k, device=sh.device) / k**0.5)
        for m in GEMV_M if sh.device == "cuda" else sh.decode_m[:1]:
            x = torch.randn(m, k, device=sh.device, dtype=torch.bfloat16)
            case = f"{name} M={m} N={n} K={k}"

            def chain():
                return G.fp8_gemm(*Q.act_quant(x), w, w_s, torch.bfloat16, shape_class="decode")

            want = chain().float()
            rows = [guarded(report, f"gemv {case} chain", lambda: add(report, Row(
                "gemv", case, "baseline: act_quant + fp8_gemm (+ split-K sum)", _graph_ms(chain, sh, quick),
                note="the decode program's Linear now"), bytes_=n * k))]
            for cfg in _candidates() if sh.device == "cuda" else V.GEMV_CONFIGS[:1]:  # the CPU smoke test: one
                def one(cfg=cfg):
                    fn = lambda: V.fp8_gemv(x, w, w_s, torch.bfloat16, config=cfg)  # noqa: E731
                    err = mean_rel(fn().float(), want)
                    return add(report, Row("gemv", case, f"fp8_gemv [{cfg}]", _graph_ms(fn, sh, quick), error=err,
                                           tol=4e-3, ok=err < 4e-3, note="error vs the chain"), bytes_=n * k)

                rows.append(guarded(report, f"gemv {case} {cfg}", one))
            _ratio_vs_first(rows)
            show(case, [r for r in rows if r])

    d, i = sh.dim, sh.moe_inter
    e, k, w13, w13s, w2, w2s = _decode_experts(sh)
    for t in GEMV_M if sh.device == "cuda" else sh.decode_m[:1]:
        x, ids, tw, active = _decode_tokens(sh, t, e, k)
        case = f"MoE T={t} E={e} k={k} D={d} I={i}"
        nbytes = active * 3 * i * d

        def aligned():
            sorted_ids, expert_ids, npp = moe_align(ids, e, 16)
            xq, xs = Q.act_quant(x)
            h = grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True)
            hq, hs = Q.act_quant(h)
            y = grouped_gemm(hq, w2, sorted_ids, expert_ids, npp, 1, a_scale=hs, w_scale=w2s, topk_weights=tw)
            return y.view(t, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)

        want = aligned().float()
        rows = [guarded(report, f"gemv {case} aligned", lambda: add(report, Row(
            "gemv", case, "baseline: moe_align + act_quant + up + act_quant + down + sum",
            _graph_ms(aligned, sh, quick), note=f"the decode program now; {active} experts active"), bytes_=nbytes))]
        configs = _candidates() if sh.device == "cuda" else V.GEMV_CONFIGS[:1]
        for cfg in [c for c in configs if i % c.kwargs["BLOCK_N"] == 0]:  # an up tile in one scale block
            def gemv(cfg=cfg):
                h = V.moe_gemv(x, w13, w13s, ids, fuse_swiglu=True, config=cfg)  # [T*k, I]
                y = V.moe_gemv(h, w2, w2s, ids.reshape(-1, 1), topk_weights=tw.reshape(-1, 1), config=cfg)
                return y.view(t, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)

            def one(cfg=cfg, gemv=gemv):
                err = mean_rel(gemv().float(), want)
                return add(report, Row("gemv", case, f"moe_gemv up + down + sum [{cfg}]", _graph_ms(gemv, sh, quick),
                                       error=err, tol=1e-2, ok=err < 1e-2, note="error vs the aligned chain"),
                           bytes_=nbytes)

            rows.append(guarded(report, f"gemv {case} {cfg}", one))
        _ratio_vs_first(rows)
        show(case, [r for r in rows if r])


def _ratio_vs_first(rows: list[Row | None]) -> None:
    """speedup_vs_best_alt of every GEMV row = the baseline chain's time / its time (the first row)."""
    if not rows or rows[0] is None or not rows[0].ms:
        return
    for r in rows[1:]:
        if r is not None and r.ms:
            r.speedup_vs_best_alt = rows[0].ms / r.ms
