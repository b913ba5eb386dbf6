"""fp8_gemv / moe_gemv (act_quant in registers, CUDA-core FMAs) vs act_quant + dequantize-then-matmul."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import fp8_gemm as G  # noqa: E402
from dsv3_export.kernels import fp8_gemv as V  # noqa: E402
from dsv3_export.kernels import moe as M  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402

E, D, I = 6, 200, 96  # K = 200: a ragged last 1x128 block; N = 200 and 2I = 192: ragged scale-block rows


def _weight(n: int, k: int):
    return R.weight_quant(torch.randn(n, k) / k**0.5)


def _experts(n: int, k: int):
    qs, ss = zip(*(R.weight_quant(torch.randn(n, k) / k**0.5) for _ in range(E)))
    return torch.stack(qs), torch.stack(ss)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("config", V.GEMV_CONFIGS, ids=lambda c: f"n{c.kwargs['BLOCK_N']}c{c.kwargs['CHUNK']}w{c.num_warps}")
def test_fp8_gemv_matches_act_quant_then_gemm(seed, m, config):
    torch.manual_seed(seed)
    x = torch.randn(m, 300) * 2  # K = 300: two full 1x128 blocks and a ragged one
    w, w_s = _weight(200, 300)
    out = V.fp8_gemv(x, w, w_s, torch.float32, config=config)
    ref = G.fp8_gemm_ref(*R.act_quant(x), w, w_s, torch.float32)
    assert out.shape == (m, 200) and out.dtype == torch.float32
    assert_finite("fp8_gemv", out)
    assert mean_rel(out, ref) < TOL["fp8_gemv_fp32_out"]


def test_fp8_gemv_bf16_activation_and_output(seed):
    torch.manual_seed(seed)
    x = (torch.randn(2, 256) * 3).to(torch.bfloat16)
    w, w_s = _weight(72, 256)
    out = V.fp8_gemv(x, w, w_s)
    ref = G.fp8_linear_ref(x, w, w_s)
    assert out.dtype == torch.bfloat16
    assert_finite("fp8_gemv", out)
    assert mean_rel(out, ref) < TOL["fp8_gemm_bf16_out"]


def test_all_zero_activation_gives_zeros():
    x = torch.zeros(1, 256)
    w, w_s = _weight(32, 256)
    out = V.fp8_gemv(x, w, w_s, torch.float32)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("t,k,ids_dtype", [(1, 4, torch.int64), (2, 3, torch.int32)])
def test_moe_gemv_up_with_swiglu(seed, t, k, ids_dtype):
    torch.manual_seed(seed)
    x = torch.randn(t, D, dtype=torch.float16)
    w13, s13 = _experts(2 * I, D)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(t)]).to(ids_dtype)
    out = V.moe_gemv(x, w13, s13, ids, fuse_swiglu=True, out_dtype=torch.float32)
    xq, xs = R.act_quant(x)
    ref = M.grouped_gemm_ref(xq, w13, ids, k, a_scale=xs, w_scale=s13, fuse_swiglu=True)
    assert out.shape == (t * k, I)
    assert_finite("moe_gemv", out)
    assert mean_rel(out, ref) < TOL["fp8_gemv_fp32_out"]


def test_moe_gemv_down_with_routing_weights(seed):
    torch.manual_seed(seed)
    t, k = 2, 3
    h = torch.randn(t * k, I, dtype=torch.float16)  # one row per assignment: topk 1 for the down GEMM
    w2, s2 = _experts(D, I)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(t)])
    weights = torch.rand(t, k)
    out = V.moe_gemv(h, w2, s2, ids.reshape(-1, 1), topk_weights=weights.reshape(-1, 1), out_dtype=torch.float32)
    hq, hs = R.act_quant(h)
    ref = M.grouped_gemm_ref(hq, w2, ids.reshape(-1, 1), 1, a_scale=hs, w_scale=s2, topk_weights=weights)
    assert out.shape == (t * k, D)
    assert_finite("moe_gemv", out)
    assert mean_rel(out, ref) < TOL["fp8_gemv_fp32_out"]


def test_moe_gemv_matches_the_grouped_gemm_path(seed):
    """The whole W8A8 MoE of one token: up + SwiGLU, h in fp16, down x weights, sum over k."""
    torch.manual_seed(seed)
    k = 4
    x = torch.randn(1, D, dtype=torch.float16)
    w13, s13 = _experts(2 * I, D)
    w2, s2 = _experts(D, I)
    ids = torch.randperm(E)[:k][None]
    weights = torch.rand(1, k)
    h = V.moe_gemv(x, w13, s13, ids, fuse_swiglu=True)  # [k, I] fp16
    y = V.moe_gemv(h, w2, s2, ids.reshape(-1, 1), topk_weights=weights.reshape(-1, 1))  # [k, D]
    out = y.float().sum(0, keepdim=True).half()
    ref = M.fused_moe_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2)
    assert_finite("moe_gemv", out)
    assert mean_rel(out, ref) < TOL["fused_moe_fp8_fp16"]


def test_gemv_gate_splits_the_row_counts():
    assert [V.gemv_gate(m) for m in range(1, V.GEMV_MAX_ROWS + 1)] == [1] * V.GEMV_MAX_ROWS
    assert [V.gemv_gate(m) for m in (0, V.GEMV_MAX_ROWS + 1, 2 * V.GEMV_MAX_ROWS, 64)] == [0, 0, 0, 0]


def test_gemv_into_split_k_partials_writes_split_0_and_zeros(seed):
    """ZERO_SPLITS: the result in split 0 of a NaN-filled [S, M, N] workspace, exact zeros in the others,
    so the sum over splits that follows (the tile GEMM's) is the result."""
    from dsv3_export.kernels._common import launch

    torch.manual_seed(seed)
    x = torch.randn(2, 300)
    w, w_s = _weight(72, 300)
    ws = torch.full((4, 2, 72), float("nan"))
    launch(*V.gemv_spec(x, w, w_s, ws, scale_reciprocal=False), None)
    assert torch.equal(ws[1:], torch.zeros_like(ws[1:]))
    assert torch.equal(ws.sum(0), V.fp8_gemv(x, w, w_s, torch.float32, scale_reciprocal=False))


def test_zero_rows_launch_nothing():
    """No rows: the grid's first dimension is 0, nothing runs, and out keeps what it held."""
    x = torch.randn(0, 256)
    w, w_s = _weight(32, 256)
    out = torch.full((1, 32), 7.0)
    from dsv3_export.kernels._common import launch

    launch(*V.gemv_spec(x, w, w_s, out, scale_reciprocal=False), None)
    assert (out == 7.0).all()


def test_bad_inputs_name_the_problem():
    x = torch.randn(1, 256)
    w, w_s = _weight(32, 256)
    with pytest.raises(ValueError, match="K must match"):
        V.fp8_gemv(torch.randn(1, 128), w, w_s)
    with pytest.raises(ValueError, match="w_s must be"):
        V.fp8_gemv(x, w, w_s[:, :1])
    w13, s13 = _experts(2 * 36, 256)
    with pytest.raises(ValueError, match="multiple of BLOCK_N"):
        V.moe_gemv(x, w13, s13, torch.zeros(1, 2, dtype=torch.int64), fuse_swiglu=True)
