"""grouped_gemm_scan (no moe_align: each program finds its expert's rows in topk_ids) against the
aligned grouped_gemm (bit for bit: the same K loop and epilogue, the same row groups within a
chunk) and against the per-expert torch loops / the reference MoE module (stated tolerances).

Outputs are NaN-poisoned (conftest): a row the scan forgets stays NaN.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import moe as M  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from dsv3_export.reference.args import ModelArgs  # noqa: E402
from dsv3_export.reference.moe import MoE  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402
from tests.kernels.test_moe import _recorded_grids  # noqa: E402

D, I = 200, 96  # D off the 128 grid (a ragged scale block), I < 128


def _quantize(w):
    qs, ss = zip(*(R.weight_quant(w[e].float()) for e in range(w.shape[0])))
    return torch.stack(qs), torch.stack(ss)


def _ids(case: str, e: int, seed: int) -> torch.Tensor:
    """Routings that exercise the scan: [T, k] ids (int64 as the router gives them)."""
    g = torch.Generator().manual_seed(seed)
    if case == "decode":  # T=1, k=8 distinct of E: most experts have no row
        return torch.randperm(e, generator=g)[:8][None]
    if case == "busy_expert":  # expert 1 in every one of 37 rows: > BLOCK_M rows (3 row groups), others random
        ids = torch.stack([torch.randperm(e - 2, generator=g)[:3] + 2 for _ in range(37)])  # [37, 3]
        return torch.cat([ids, torch.ones(37, 1, dtype=torch.int64)], 1)  # [37, 4]
    if case == "duplicates":  # experts repeated within a row and across rows; experts 4.. unused
        ids = torch.randint(0, 4, (13, 5), generator=g)
        ids[0] = 3  # one token sending all its slots to one expert
        return ids
    raise ValueError(case)


def _assert_same(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert torch.equal(got, want), f"{name}: {int((got != want).sum())} of {want.numel()} differ"


def _operands(precision: str, t: int, e: int, seed: int):
    """(up a, up kwargs, down weights + kwargs builder) for one precision of grouped_gemm."""
    torch.manual_seed(seed)
    x = torch.randn(t, D)
    w13, w2 = torch.randn(e, 2 * I, D) / D**0.5, torch.randn(e, D, I) / I**0.5
    if precision in ("fp16", "bf16"):
        dt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision])
        return x.to(dt), w13.to(dt), {}, w2.to(dt), {}, {}
    (w13q, w13s), (w2q, w2s) = _quantize(w13), _quantize(w2)
    if precision == "w8a8":
        xq, xs = R.act_quant(x)
        return xq, w13q, dict(a_scale=xs, w_scale=w13s), w2q, dict(w_scale=w2s), {"act_quant": True}
    x16 = x.to(torch.bfloat16)
    extra = dict(quant_a=True) if precision == "quant_a" else {}
    return x16, w13q, dict(w_scale=w13s, **extra), w2q, dict(w_scale=w2s, **extra), {}


@pytest.mark.parametrize("precision,case,e,chunk", [
    ("w8a8", "decode", 20, M.SCAN_CHUNK), ("w8a8", "busy_expert", 9, 32), ("w8a8", "duplicates", 7, 16),
    ("quant_a", "busy_expert", 9, M.SCAN_CHUNK), ("weight_only", "decode", 20, 16),
    ("fp16", "busy_expert", 9, M.SCAN_CHUNK), ("fp16", "duplicates", 7, 16), ("bf16", "duplicates", 7, M.SCAN_CHUNK),
])
def test_scan_equals_aligned_bit_for_bit_and_the_loop(seed, case, e, chunk, precision):
    """Up (SwiGLU) and down (routing weight) GEMMs: scan == aligned (torch.equal: the same row groups,
    e's rows in assignment order BLOCK_M at a time, and the same K loop), both near the per-expert
    fp32 loop. chunk=16/32 < T*k: several chunks, an expert's rows spread over them and over its row
    groups. (Row groups matter for bits: the interpreter's fp32 matmul sums a tile row in an order
    that depends on its position in the tile; an earlier per-chunk grouping differed in ~100 of 30k
    outputs.)"""
    ids = _ids(case, e, seed)
    t, k = ids.shape
    a, w13, up_kw, w2, down_kw, how = _operands(precision, t, e, seed)
    rw = torch.rand(t, k)
    h_dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    s_ids, e_ids, npp = M.moe_align(ids, e, M.SCAN_BLOCK_M)
    h = M.grouped_gemm(a, w13, s_ids, e_ids, npp, k, fuse_swiglu=True, out_dtype=h_dtype, **up_kw)
    h_scan = M.grouped_gemm_scan(a, w13, ids, k, fuse_swiglu=True, out_dtype=h_dtype, chunk=chunk, **up_kw)
    assert_finite("grouped_gemm_scan up", h_scan)
    _assert_same(h_scan, h, "up")
    down_a = h
    if how.get("act_quant"):
        down_a, hs = R.act_quant(h)
        down_kw = dict(down_kw, a_scale=hs)
    y = M.grouped_gemm(down_a, w2, s_ids, e_ids, npp, 1, topk_weights=rw, out_dtype=torch.float32, **down_kw)
    y_scan = M.grouped_gemm_scan(down_a, w2, ids, 1, topk_weights=rw, out_dtype=torch.float32, chunk=chunk,
                                 **down_kw)
    assert_finite("grouped_gemm_scan down", y_scan)
    _assert_same(y_scan, y, "down")
    if precision == "quant_a":  # == act_quant + the W8A8 GEMM: tests/kernels/test_moe.py
        return
    # the per-expert fp32 loop on the same operands: h's store rounding (fp16 / bf16 truncation), then
    # fp32 outputs from the same h
    h_ref = M.grouped_gemm_ref(a, w13, ids, k, fuse_swiglu=True, **up_kw)
    h_tol = 2 * TOL["grouped_gemm_fp16"] if h_dtype == torch.float16 else TOL["grouped_gemm_bf16"]
    assert mean_rel(h_scan, h_ref) < h_tol
    y_ref = M.grouped_gemm_ref(down_a, w2, ids.reshape(-1, 1), 1, topk_weights=rw, **down_kw)
    assert mean_rel(y_scan, y_ref) < TOL["grouped_gemm_fp16"]


@pytest.mark.parametrize("case,e", [("decode", 20), ("busy_expert", 9)])
def test_scan_launches_the_aligned_grid_and_no_alignment(seed, monkeypatch, case, e):
    """Grid (min(n_blocks, T*k), ceil(N_out / BLOCK_N)), as the aligned GEMM's (8 row blocks at T=1,
    k=8, not one per expert); nothing but the GEMM is launched."""
    ids = _ids(case, e, seed)
    t, k = ids.shape
    a, w13, up_kw, *_ = _operands("w8a8", t, e, seed)
    s_ids, e_ids, npp = M.moe_align(ids, e, M.SCAN_BLOCK_M)
    grids = _recorded_grids(monkeypatch, M, "launch")
    M.grouped_gemm(a, w13, s_ids, e_ids, npp, k, fuse_swiglu=True, **up_kw)
    M.grouped_gemm_scan(a, w13, ids, k, fuse_swiglu=True, **up_kw)
    bn = M.GROUPED_GEMM_SCAN_CONFIGS[0].kwargs["BLOCK_N"]
    want = (min(e_ids.numel(), t * k), -(-I // bn))
    assert grids == [("_grouped_gemm_kernel", want), ("_grouped_gemm_scan_kernel", want)], grids
    if case == "decode":
        assert want[0] == 8


def test_scan_moe_matches_reference_moe_module(seed):
    """The routed experts of the reference MoE (tiny preset, fp32 per-expert loop) from two scan
    GEMMs in fp16, as fused_moe's aligned form does it (same tolerance)."""
    torch.manual_seed(seed)
    args = ModelArgs.preset("tiny")
    moe = MoE(args)
    for p in moe.parameters():
        p.normal_(0, args.dim**-0.5)
    x = torch.randn(13, args.dim)
    weights, ids = moe.gate(x)
    w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in moe.experts]).half()  # [E, 2I, D]
    w2 = torch.stack([e.w2.weight for e in moe.experts]).half()  # [E, D, I]
    t, k = ids.shape
    h = M.grouped_gemm_scan(x.half(), w13, ids, k, fuse_swiglu=True)  # [T*k, I]
    y = M.grouped_gemm_scan(h, w2, ids, 1, topk_weights=weights.half().contiguous())  # [T*k, D]
    got = y.view(t, k, -1).sum(1, dtype=torch.float32)  # [T, D]
    assert_finite("scan moe", got)
    assert mean_rel(got, moe.forward_loop(x)) < TOL["fused_moe_vs_model"]
    assert torch.equal(got.half(), M.fused_moe(x.half(), w13, w2, weights.half(), ids, block_m=16))


def test_scan_bad_inputs_name_the_problem():
    ids = _ids("duplicates", 7, 0)
    a, w13, up_kw, *_ = _operands("w8a8", ids.shape[0], 7, 0)
    with pytest.raises(ValueError, match=r"topk_ids has 65 entries, need T\*topk=52"):
        M.grouped_gemm_scan(a, w13, ids, 4, **up_kw)
    with pytest.raises(TypeError, match="grouped_gemm_scan: topk_ids: dtype torch.float32"):
        M.grouped_gemm_scan(a, w13, ids.float(), 5, **up_kw)
    with pytest.raises(ValueError, match="chunk=24 must be powers of 2"):
        M.grouped_gemm_scan(a, w13, ids, 5, chunk=24, **up_kw)
    with pytest.raises(ValueError, match="grouped_gemm_scan: fp8 a needs a_scale"):
        M.grouped_gemm_scan(a, w13, ids, 5, w_scale=up_kw["w_scale"])
    with pytest.raises(ValueError, match="grouped_gemm_scan: a is \\[T, K=128\\]"):
        M.grouped_gemm_scan(a[:, :128], w13, ids, 5, **up_kw)
