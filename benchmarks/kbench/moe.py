"""MoE sections, kernels/moe.py at the 16b MoE's shapes:
  moe       fused_moe (bf16, fp8, fp8 weight-only) against torch._grouped_mm (routing sort, two
            grouped GEMMs, SwiGLU, weighted index_add); the up projection's grouped_gemm + fused
            SwiGLU (bf16 and W8A8) and moe_align alone, the down projection's grouped_gemm (bf16 and W8A8)
            alone; at decode sizes also from CUDA graphs
  moe_cfg   each grouped-GEMM config (GROUPED_GEMM_CONFIGS + MOE_CFG_CANDIDATES) on the fp8 MoE's two
            GEMMs at decode sizes, from CUDA graphs: which tile the decode program should tune to
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kbench.common import (BF16_PEAK, FP8_PEAK, Report, Row, Shapes, _graph_of, add, bench, finish_group, guarded,
                            mean_rel, show)


def _moe_grouped_mm(x, w13_t, w2_t, tw, ids, n_experts):
    """Best torch alternative: sort by expert, two torch._grouped_mm, SwiGLU, weighted index_add."""
    return _presorted_grouped_mm(x, w13_t, w2_t, tw, ids, n_experts)()


def _presorted_grouped_mm(x, w13_t, w2_t, tw, ids, n_experts):
    """The torch MoE split in two: the routing sort now (bincount syncs the host, which a CUDA graph
    cannot hold), and the returned run() = two torch._grouped_mm, SwiGLU, weighted index_add."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=n_experts), 0).to(torch.int32)
    rows, weights = order // k, tw.reshape(-1)[order, None]

    def run():
        h = torch._grouped_mm(x[rows], w13_t, offs=offs)  # [T*k, 2I]
        inter = h.shape[1] // 2
        y = torch._grouped_mm(F.silu(h[:, :inter]) * h[:, inter:], w2_t, offs=offs) * weights  # [T*k, D]
        return torch.zeros_like(x).index_add_(0, rows, y)

    return run


def _presorted_up_swiglu(x, w13_t, ids, n_experts):
    """torch's MoE up projection split in two: the routing sort now, the returned run() = one
    torch._grouped_mm over the expert-sorted rows + SwiGLU (w13_t [E, D, 2I])."""
    flat = ids.reshape(-1)
    offs = torch.cumsum(torch.bincount(flat, minlength=n_experts), 0).to(torch.int32)
    xs = x[torch.argsort(flat, stable=True) // ids.shape[1]]  # [T*k, D], sorted by expert
    inter = w13_t.shape[2] // 2

    def run():
        h = torch._grouped_mm(xs, w13_t, offs=offs)  # [T*k, 2I]
        return F.silu(h[:, :inter]) * h[:, inter:]

    return run


def _quantized_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights [E, N, K] -> fp8 [E, N, K] and their 128x128 block scales, as a checkpoint stores them."""
    from dsv3_export.reference import fp8 as R

    pairs = [R.weight_quant(w[j].float()) for j in range(w.shape[0])]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def bench_moe(report: Report, sh: Shapes, quick: bool) -> None:
    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.kernels import moe as M
    from dsv3_export.kernels.moe_align import takes_parallel_form

    torch.manual_seed(0)
    d, i, e = sh.dim, sh.moe_inter, sh.n_experts
    w13 = (torch.randn(e, 2 * i, d, device=sh.device) / d**0.5).bfloat16()
    w2 = (torch.randn(e, d, i, device=sh.device) / i**0.5).bfloat16()
    w13q, w13s = _quantized_experts(w13)
    w2q, w2s = _quantized_experts(w2)
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, K, N] views for _grouped_mm
    expert_elems = 3 * i * d
    for t in (*sh.decode_m, sh.prefill_m):
        case = f"T={t} E={e} top{sh.topk} D={d} I={i}"
        x = torch.randn(t, d, device=sh.device, dtype=torch.bfloat16)
        tw, ids = torch.randn(t, e, device=sh.device).softmax(-1).topk(sh.topk, dim=-1)
        tw = tw.to(torch.bfloat16)
        active = int(torch.unique(ids).numel())
        flops = 2 * t * sh.topk * 3 * i * d
        act_bytes = 2 * (2 * t * d + 2 * t * sh.topk * (i + d))
        note = f"{active} experts active"
        ref = M.fused_moe_ref(x, w13, w2, tw, ids)
        err = mean_rel(M.fused_moe(x, w13, w2, tw, ids).float(), ref.float())
        rows = [add(report, Row("moe", case, "triton fused_moe bf16",
                                bench(lambda: M.fused_moe(x, w13, w2, tw, ids), sh, quick),
                                error=err, tol=2e-2, ok=err < 2e-2, note=note),
                    bytes_=active * expert_elems * 2 + act_bytes, flops=flops, peak=BF16_PEAK)]
        fp8_kw = dict(w13_scale=w13s, w2_scale=w2s)
        ref8 = M.fused_moe_ref(x, w13q, w2q, tw, ids, **fp8_kw)
        err8 = mean_rel(M.fused_moe(x, w13q, w2q, tw, ids, **fp8_kw).float(), ref8.float())
        rows.append(add(report, Row("moe", case, "triton fused_moe fp8",
                                    bench(lambda: M.fused_moe(x, w13q, w2q, tw, ids, **fp8_kw), sh, quick),
                                    error=err8, tol=2e-2, ok=err8 < 2e-2, note=note + "; ref: same fp8 weights"),
                        bytes_=active * expert_elems + act_bytes, flops=flops, peak=FP8_PEAK))

        wo_kw = dict(w13_scale=w13s, w2_scale=w2s, act_quant=False)
        ref_wo = M.fused_moe_ref(x, w13q, w2q, tw, ids, **wo_kw)
        err_wo = mean_rel(M.fused_moe(x, w13q, w2q, tw, ids, **wo_kw).float(), ref_wo.float())
        rows.append(add(report, Row("moe", case, "triton fused_moe fp8 weight-only (W8A16)",
                                    bench(lambda: M.fused_moe(x, w13q, w2q, tw, ids, **wo_kw), sh, quick),
                                    error=err_wo, tol=2e-2, ok=err_wo < 2e-2, note=note),
                        bytes_=active * expert_elems + act_bytes, flops=flops, peak=BF16_PEAK))

        def baseline():
            e_ = mean_rel(_moe_grouped_mm(x, w13_t, w2_t, tw, ids, e).float(), ref.float())
            return add(report, Row("moe", case, "torch._grouped_mm moe bf16",
                                   bench(lambda: _moe_grouped_mm(x, w13_t, w2_t, tw, ids, e), sh, quick),
                                   error=e_, tol=2e-2, ok=e_ < 2e-2),
                       bytes_=active * expert_elems * 2 + act_bytes, flops=flops, peak=BF16_PEAK)

        rows.append(guarded(report, f"moe {case} _grouped_mm", baseline))
        if sh.device == "cuda" and t <= 64:  # decode sizes: eager timings there are mostly Python launch cost
            bf16_bytes = active * expert_elems * 2 + act_bytes
            for impl, fn, nbytes, peak in (
                    ("triton fused_moe bf16 (CUDA graph)", lambda: M.fused_moe(x, w13, w2, tw, ids), bf16_bytes,
                     BF16_PEAK),
                    ("triton fused_moe fp8 (CUDA graph)",
                     lambda: M.fused_moe(x, w13q, w2q, tw, ids, **fp8_kw),
                     active * expert_elems + act_bytes, FP8_PEAK),
                    ("torch._grouped_mm moe bf16 (CUDA graph, rows pre-sorted)", _presorted_grouped_mm(x, w13_t, w2_t, tw, ids, e),
                     bf16_bytes, BF16_PEAK)):
                rows.append(guarded(report, f"moe {case} {impl}", lambda impl=impl, fn=fn, nbytes=nbytes, peak=peak: add(
                    report, Row("moe", case, impl, bench(_graph_of(fn).replay, sh, quick), note=note),
                    bytes_=nbytes, flops=flops, peak=peak)))
        rows = [r for r in rows if r is not None]
        finish_group(rows)
        show(case, rows)

        # The up projection alone: grouped GEMM + fused SwiGLU vs _grouped_mm + eager SwiGLU.
        up_case = f"up+swiglu {case}"
        bm = M.choose_block_m(t, sh.topk, e)
        s_ids, e_ids, npp = M.moe_align(ids, e, bm)
        up_flops = 2 * t * sh.topk * 2 * i * d
        up_bytes = active * 2 * i * d * 2 + 2 * t * (d + sh.topk * i)
        g_err = mean_rel(M.grouped_gemm(x, w13, s_ids, e_ids, npp, sh.topk, fuse_swiglu=True).float(),
                         M.grouped_gemm_ref(x, w13, ids, sh.topk, fuse_swiglu=True))
        parallel = takes_parallel_form(bm)  # moe_align's default form at this block_m
        # identical to the ATen form's, as in tests/kernels/test_moe.py, here at the real sizes
        aligned = all(torch.equal(a, b) for a, b in zip((s_ids, e_ids, npp), M.moe_align_ref(ids, e, bm)))
        up_rows = [add(report, Row("grouped_gemm", up_case, "triton moe_align (block_m=%d, %s)" % (
                                   bm, "parallel" if parallel else "single program"),
                                   bench(lambda: M.moe_align(ids, e, bm), sh, quick), ok=aligned))]
        if parallel:  # the form it replaced there (session 33)
            up_rows.append(add(report, Row("grouped_gemm", up_case, "triton moe_align (block_m=%d, single program)"
                                           % bm, bench(lambda: M.moe_align(ids, e, bm, parallel=False), sh, quick))))
        if t >= 1024:  # the fp8 path's two activation quantizations at prefill sizes
            h_bf16 = torch.randn(t * sh.topk, i, device=x.device, dtype=x.dtype)
            for what, act in (("x [T, D]", x), ("h [T*k, I]", h_bf16)):
                up_rows.append(add(report, Row("grouped_gemm", up_case, f"triton act_quant of {what}",
                                               bench(lambda act=act: Q.act_quant(act), sh, quick)),
                                   bytes_=act.numel() * 3 + act.numel() // 128 * 4))
        up_rows.append(add(report, Row("grouped_gemm", up_case, "triton grouped_gemm bf16",
                                       bench(lambda: M.grouped_gemm(x, w13, s_ids, e_ids, npp, sh.topk,
                                                                    fuse_swiglu=True), sh, quick),
                                       error=g_err, tol=2e-2, ok=g_err < 2e-2),
                           bytes_=up_bytes, flops=up_flops, peak=BF16_PEAK))

        def gm_up():
            run = _presorted_up_swiglu(x, w13_t, ids, e)
            return add(report, Row("grouped_gemm", up_case, "torch._grouped_mm + swiglu", bench(run, sh, quick),
                                   note="rows pre-sorted outside the timing"),
                       bytes_=up_bytes, flops=up_flops, peak=BF16_PEAK)

        up_rows.append(guarded(report, f"grouped_gemm {case} _grouped_mm", gm_up))
        up_rows.append(guarded(report, f"grouped_gemm {case} fp8", lambda: _fp8_grouped_row(
            report, up_case, x, w13q, w13s, s_ids, e_ids, npp, ids, sh, quick, fuse_swiglu=True,
            nbytes=active * 2 * i * d + t * (d + 2 * sh.topk * i), flops=up_flops)))
        if sh.device == "cuda" and t <= 64:  # decode sizes: eager rows are mostly Python launch cost
            # moe_align as the packages trace it (DSV3_TORCH_MOE_ALIGN): ATen ops vs the kernel (default)
            align_case = f"moe_align block_m={bm} {case}"
            same = all(torch.equal(x_, y_) for x_, y_ in zip(M.moe_align(ids, e, bm), M.moe_align_ref(ids, e, bm)))
            align_rows = [guarded(report, f"moe_align {case} {impl}", lambda impl=impl, fn=fn: add(
                report, Row("moe_align", align_case, impl, bench(_graph_of(fn).replay, sh, quick), ok=same,
                            note="outputs identical" if same else "OUTPUTS DIFFER")))
                for impl, fn in (("torch moe_align_ref, the traced ATen form (CUDA graph)",
                                  lambda: M.moe_align_ref(ids, e, bm)),
                                 ("triton moe_align kernel (CUDA graph)", lambda: M.moe_align(ids, e, bm)))]
            align_rows = [r for r in align_rows if r is not None]
            finish_group(align_rows)
            show(align_case, align_rows)
            for impl, fn in (("triton grouped_gemm bf16 (CUDA graph)",
                              lambda: M.grouped_gemm(x, w13, s_ids, e_ids, npp, sh.topk, fuse_swiglu=True)),
                             ("torch._grouped_mm + swiglu (CUDA graph, rows pre-sorted)",
                              _presorted_up_swiglu(x, w13_t, ids, e))):
                up_rows.append(guarded(report, f"grouped_gemm {case} {impl}", lambda impl=impl, fn=fn: add(
                    report, Row("grouped_gemm", up_case, impl, bench(_graph_of(fn).replay, sh, quick)),
                    bytes_=up_bytes, flops=up_flops, peak=BF16_PEAK)))
        up_rows = [r for r in up_rows if r is not None]
        finish_group(up_rows)
        show(up_case, up_rows)

        # The down projection alone (routing weight in the epilogue), bf16 against W8A8: which of the two GEMMs
        # holds the fp8 MoE back where it is slower than the bf16 one (T=4096, session 32: 1.87 against 1.69 ms).
        down_case = f"down {case}"
        h = M.grouped_gemm(x, w13, s_ids, e_ids, npp, sh.topk, fuse_swiglu=True)  # [T*k, I], the down GEMM's input
        down_flops, down_bytes = 2 * t * sh.topk * i * d, active * i * d * 2 + 2 * t * sh.topk * (i + d)
        d_err = mean_rel(M.grouped_gemm(h, w2, s_ids, e_ids, npp, 1, topk_weights=tw).float(),
                         M.grouped_gemm_ref(h, w2, ids, 1, topk_weights=tw))
        down_rows = [add(report, Row("grouped_gemm", down_case, "triton grouped_gemm bf16",
                                     bench(lambda: M.grouped_gemm(h, w2, s_ids, e_ids, npp, 1, topk_weights=tw),
                                           sh, quick), error=d_err, tol=2e-2, ok=d_err < 2e-2),
                         bytes_=down_bytes, flops=down_flops, peak=BF16_PEAK)]
        down_rows.append(guarded(report, f"grouped_gemm {down_case} fp8", lambda: _fp8_grouped_row(
            report, down_case, h, w2q, w2s, s_ids, e_ids, npp, ids, sh, quick, topk_weights=tw,
            nbytes=active * i * d + t * sh.topk * (i + 2 * d), flops=down_flops)))
        down_rows = [r for r in down_rows if r is not None]
        finish_group(down_rows)
        show(down_case, down_rows)


def _fp8_grouped_row(report: Report, case: str, a, w, w_s, s_ids, e_ids, npp, ids, sh: Shapes, quick: bool, *,
                     nbytes: float, flops: float, fuse_swiglu: bool = False, topk_weights=None) -> Row:
    """The W8A8 grouped GEMM of a (quantized 1x128 outside the timing) against its reference on the same fp8
    operands: fused_moe's fp8 path, one GEMM at a time. a's rows are tokens (topk = top-k) for the up GEMM and
    assignments (topk = 1) for the down one."""
    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.kernels import moe as M

    topk = sh.topk if fuse_swiglu else 1
    aq, a_s = Q.act_quant(a)
    kw = dict(a_scale=a_s, w_scale=w_s, topk_weights=topk_weights, fuse_swiglu=fuse_swiglu)
    err = mean_rel(M.grouped_gemm(aq, w, s_ids, e_ids, npp, topk, **kw).float(),
                   M.grouped_gemm_ref(aq, w, ids, topk, **kw))
    return add(report, Row("grouped_gemm", case, "triton grouped_gemm fp8 (W8A8)",
                           bench(lambda: M.grouped_gemm(aq, w, s_ids, e_ids, npp, topk, **kw), sh, quick),
                           error=err, tol=2e-2, ok=err < 2e-2, note="act_quant outside the timing"),
               bytes_=nbytes, flops=flops, peak=FP8_PEAK)


# Candidate grouped-GEMM configs for decode, timed beside GROUPED_GEMM_CONFIGS by the moe_cfg
# section: deeper pipelines and narrower N tiles keep more weight bytes in flight per SM when each
# expert has one row (batch-1 decode: the 16b MoE's GEMMs run at ~60% of copy bandwidth, session 7).
MOE_CFG_CANDIDATES = (  # (BLOCK_N, num_warps, num_stages)
    (16, 4, 6), (32, 4, 6), (32, 4, 8), (64, 4, 6), (64, 8, 5), (128, 4, 5),
    (16, 2, 6), (16, 4, 8), (32, 2, 5), (32, 2, 8),  # fewer warps: the direct mode's one-row tiles (session 22)
)


def _decode_experts(sh: Shapes):
    """The 16b fp8 MoE's experts as fuse_shared_experts leaves them (E = routed + 2 shared, k = top-k + 2),
    random, quantized 128x128 -> (E, k, w13, w13 scales, w2, w2 scales)."""
    d, i = sh.dim, sh.moe_inter
    e, k = sh.n_experts + 2, sh.topk + 2  # fuse_shared_experts: 2 shared experts every token takes
    w13, w13s = _quantized_experts(torch.randn(e, 2 * i, d, device=sh.device) / d**0.5)
    w2, w2s = _quantized_experts(torch.randn(e, d, i, device=sh.device) / i**0.5)
    return e, k, w13, w13s, w2, w2s


def _decode_tokens(sh: Shapes, t: int, e: int, k: int):
    """T random bf16 tokens, each routed to top-k of the routed experts and to every shared one
    -> (x [T, D], ids [T, k], routing weights [T, k], experts active)."""
    x = torch.randn(t, sh.dim, device=sh.device, dtype=torch.bfloat16)
    routed = torch.randn(t, sh.n_experts, device=sh.device).topk(sh.topk, dim=-1)[1]
    shared = torch.arange(sh.n_experts, e, device=sh.device).expand(t, -1)
    ids = torch.cat([routed, shared], 1)  # [T, k]
    return x, ids, torch.rand(t, k, device=sh.device), int(torch.unique(ids).numel())


def bench_moe_configs(report: Report, sh: Shapes, quick: bool) -> None:
    """Each grouped-GEMM config on the 16b fp8 MoE's two GEMMs at decode sizes, in CUDA graphs: which
    tile the decode program should tune to (AOTInductor autotunes once, at its example batch)."""
    import triton

    from dsv3_export.kernels import fp8_quant as Q
    from dsv3_export.kernels import moe as M

    torch.manual_seed(0)
    d, i = sh.dim, sh.moe_inter
    e, k, w13, w13s, w2, w2s = _decode_experts(sh)
    configs = list(M.GROUPED_GEMM_CONFIGS) + [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
                                              for bn, w, st in MOE_CFG_CANDIDATES]
    if sh.device != "cuda":  # the CPU smoke checks the section's path; every config's numerics: tests/kernels
        configs = configs[:1] + configs[-1:]
    for t in sh.decode_m:
        x, ids, tw, active = _decode_tokens(sh, t, e, k)
        sorted_ids, expert_ids, npp = M.moe_align(ids, e, M.choose_block_m(t, k, e))
        direct = ids.contiguous() if t == 1 else None  # one token: the direct mode, as the decode program runs it
        xq, xs = Q.act_quant(x)
        h = M.grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True,
                           direct_ids=direct)
        hq, hs = Q.act_quant(h)
        gemms = {  # name -> (call with a config, weight bytes the active experts move)
            "up+SwiGLU": (lambda cfg: M.grouped_gemm(xq, w13, sorted_ids, expert_ids, npp, k, a_scale=xs,
                                                     w_scale=w13s, fuse_swiglu=True, direct_ids=direct, config=cfg),
                          active * 2 * i * d),
            "down": (lambda cfg: M.grouped_gemm(hq, w2, sorted_ids, expert_ids, npp, 1, a_scale=hs, w_scale=w2s,
                                                topk_weights=tw, direct_ids=direct, config=cfg), active * d * i),
        }
        for name, (call, nbytes) in gemms.items():
            case = f"{name} T={t} E={e} k={k} D={d} I={i}"
            want = call(configs[0]).float()
            rows = []
            for cfg in configs:
                label = f"triton BN={cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"

                def one(cfg=cfg, label=label):
                    err = mean_rel(call(cfg).float(), want)
                    ms = bench(_graph_of(lambda: call(cfg)).replay if sh.device == "cuda" else (lambda: call(cfg)),
                               sh, quick)
                    tuned = " (GROUPED_GEMM_CONFIGS)" if cfg in M.GROUPED_GEMM_CONFIGS else ""
                    return add(report, Row("moe_cfg", case, label, ms, error=err, tol=1e-3, ok=err < 1e-3,
                                           note=f"{active} experts active{tuned}"), bytes_=nbytes)

                rows.append(guarded(report, f"moe_cfg {case} {label}", one))
            show(case, [r for r in rows if r])

