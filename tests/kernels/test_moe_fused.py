"""kernels/moe_fused.py: the one-token fp8 MoE in one launch, against the per-expert fp32 reference and against
kernels/moe.py's three launches (direct-mode grouped GEMMs with act_quant of h between them)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import fp8_quant as Q  # noqa: E402
from dsv3_export.kernels import moe as M  # noqa: E402
from dsv3_export.kernels import moe_fused as F  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402

# D and I not multiples of 128: the last K block of the up GEMM and the last inter block are partial, and the
# [gate; up] rows of w13 straddle a 128-row scale block (I = 150)
E, D, I = 9, 200, 150


def _experts(g: torch.Generator, e: int = E, d: int = D, i: int = I):
    def quantized(n: int, k: int):
        w = torch.randn(e, n, k, generator=g) * k**-0.5
        qs, ss = zip(*(R.weight_quant(w[j]) for j in range(e)))
        return torch.stack(qs), torch.stack(ss)

    return (*quantized(2 * i, d), *quantized(d, i))


def _token(g: torch.Generator, k: int, dtype=torch.bfloat16, e: int = E, d: int = D):
    x = (torch.randn(1, d, generator=g) * 2).to(dtype)
    ids = torch.randperm(e, generator=g)[:k][None]  # distinct experts, as top-k plus the shared slots are
    weights = torch.rand(1, k, generator=g) + 0.1
    return x, ids, weights


@pytest.mark.parametrize("k, dtype", [(4, torch.bfloat16), (1, torch.bfloat16), (3, torch.float16), (8, torch.float16)])
def test_matches_the_reference_and_the_three_launches(seed, k, dtype):
    g = torch.Generator().manual_seed(seed)
    w13, w13s, w2, w2s = _experts(g)
    x, ids, weights = _token(g, k, dtype)
    xq, xs = Q.act_quant(x)
    out = F.moe_one_token(xq, xs, w13, w13s, w2, w2s, weights, ids, h_dtype=dtype)
    assert out.shape == (1, D) and out.dtype == torch.float32
    assert_finite("moe_one_token", out)
    ref = M.fused_moe_ref(x, w13, w2, weights, ids, w13_scale=w13s, w2_scale=w2s)  # fp32 math, x.dtype out
    assert mean_rel(out.to(dtype), ref) < TOL["moe_one_token"]
    if dtype == torch.float16:  # the three launches (the interpreter truncates their bf16 rows: fp16 only)
        three = M.fused_moe(x, w13, w2, weights, ids, w13_scale=w13s, w2_scale=w2s, direct=True)
        assert mean_rel(out, three) < TOL["moe_one_token"]


def test_h_is_quantized_as_act_quant_quantizes_it(seed):
    """With one slot of weight 1 and w2 the identity's fp8 image, out's first I columns are dequant(act_quant(h)) up
    to the scales' fp32 products (448 * fp32(1/448) is not exactly 1): h and its 1x128 quantization are the
    three-launch path's. fp16 h: the interpreter's bf16 cast (the grouped GEMM's store) truncates."""
    g = torch.Generator().manual_seed(seed)
    d, i = 300, 150  # D >= I, so that w2 [D, I] can hold the identity
    w13, w13s, _, _ = _experts(g, e=2, d=d, i=i)
    eye = torch.zeros(2, d, i)
    eye[:, :i, :i] = torch.eye(i)
    w2, w2s = zip(*(R.weight_quant(eye[j]) for j in range(2)))
    w2, w2s = torch.stack(w2), torch.stack(w2s)
    x = torch.randn(1, d, generator=g).half()
    xq, xs = Q.act_quant(x)
    ids, weights = torch.tensor([[1]]), torch.ones(1, 1)
    out = F.moe_one_token(xq, xs, w13, w13s, w2, w2s, weights, ids, h_dtype=torch.float16)
    h = M.grouped_gemm(xq, w13, *M.moe_align(ids, 2, 16), 1, a_scale=xs, w_scale=w13s, fuse_swiglu=True,
                       direct_ids=ids, out_dtype=torch.float16)  # [1, I]
    hq, hs = Q.act_quant(h)
    torch.testing.assert_close(out[:, :i], R.act_dequant(hq, hs), rtol=1e-6, atol=0)
    assert torch.equal(out[:, i:], torch.zeros(1, d - i))


@pytest.mark.parametrize("config", F.FUSED_CONFIGS[1:], ids=lambda c: f"BD{c.kwargs['BLOCK_D']}")
def test_every_config_gives_the_same_result(seed, config):
    """BLOCK_D only tiles the output columns: each column's products are the same (the interpreter's adds run in
    program order, so the sums are the same bits too)."""
    g = torch.Generator().manual_seed(seed)
    w13, w13s, w2, w2s = _experts(g)
    x, ids, weights = _token(g, 3)
    xq, xs = Q.act_quant(x)
    want = F.moe_one_token(xq, xs, w13, w13s, w2, w2s, weights, ids)
    got = F.moe_one_token(xq, xs, w13, w13s, w2, w2s, weights, ids, config=config)
    assert torch.equal(got, want)


def test_bad_inputs_name_the_tensor():
    g = torch.Generator().manual_seed(0)
    w13, w13s, w2, w2s = _experts(g)
    x, ids, weights = _token(g, 2)
    xq, xs = Q.act_quant(x)
    with pytest.raises(ValueError, match="one token"):
        F.moe_one_token(torch.cat([xq, xq]), xs, w13, w13s, w2, w2s, weights, ids)
    with pytest.raises(ValueError, match="w2_scale"):
        F.moe_one_token(xq, xs, w13, w13s, w2, w2s[:, :1], weights, ids)
    with pytest.raises(ValueError, match="w13"):
        F.moe_one_token(xq, xs, w13[:, :, :-1], w13s, w2, w2s, weights, ids)
    with pytest.raises((TypeError, ValueError), match="xq"):
        F.moe_one_token(x, xs, w13, w13s, w2, w2s, weights, ids)
