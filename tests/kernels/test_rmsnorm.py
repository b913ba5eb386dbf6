"""rmsnorm (plain and fused with the residual add) vs the unfused torch math."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import fp8_quant as Q  # noqa: E402
from dsv3_export.kernels import rmsnorm as N  # noqa: E402
from dsv3_export.reference import fp8 as fp8_ref  # noqa: E402
from dsv3_export.reference.layers import RMSNorm  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, max_ulp_rel, mean_rel  # noqa: E402


def _close(out, ref, dtype):
    assert_finite("rmsnorm", out)
    if dtype == torch.float32:
        assert (out - ref).abs().max().item() < TOL["rmsnorm_fp32_abs"]
    elif dtype == torch.float16:
        assert max_ulp_rel(out, ref) <= TOL["rmsnorm_fp16_ulp"]
    else:  # interpreter truncates fp32 -> bf16
        assert max_ulp_rel(out, ref) <= TOL["rmsnorm_bf16_ulp"]


@pytest.mark.parametrize("shape", [(1, 200), (3, 5, 200), (37, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(seed, shape, dtype, with_residual):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(shape[-1], dtype=dtype)
    if not with_residual:
        _close(N.rmsnorm(x, w, 1e-6), N.rmsnorm_ref(x, w, 1e-6), dtype)
        return
    r = torch.randn(shape, dtype=dtype)
    y, h = N.rmsnorm(x, w, 1e-6, residual=r)
    y_ref, h_ref = N.rmsnorm_ref(x, w, 1e-6, residual=r)
    assert y.shape == h.shape == x.shape
    _close(h, h_ref, dtype)
    _close(y, y_ref, dtype)


def test_rmsnorm_matches_reference_module(seed):
    torch.manual_seed(seed)
    norm = RMSNorm(200, eps=1e-6)
    norm.weight.normal_()
    x = torch.randn(4, 200)
    assert (N.rmsnorm(x, norm.weight, norm.eps) - norm(x)).abs().max() < TOL["rmsnorm_fp32_abs"]


def test_rmsnorm_zero_rows_are_finite():
    out = N.rmsnorm(torch.zeros(3, 200), torch.ones(200), 1e-6)
    assert_finite("rmsnorm", out)
    assert (out == 0).all()


def test_rmsnorm_strided_rows(seed):
    torch.manual_seed(seed)
    x = torch.randn(6, 400)[:, :200]  # row stride 400
    w = torch.randn(200)
    _close(N.rmsnorm(x, w, 1e-5), N.rmsnorm_ref(x, w, 1e-5), torch.float32)


@pytest.mark.parametrize("config", N.RMSNORM_CONFIGS, ids=str)
def test_rmsnorm_every_config(seed, config):
    torch.manual_seed(seed)
    x, r, w = torch.randn(7, 200), torch.randn(7, 200), torch.randn(200)
    y, h = N.rmsnorm(x, w, 1e-6, residual=r, config=config)
    y_ref, h_ref = N.rmsnorm_ref(x, w, 1e-6, residual=r)
    _close(y, y_ref, torch.float32)
    _close(h, h_ref, torch.float32)


def test_bad_inputs_name_the_problem():
    x = torch.randn(3, 200)
    with pytest.raises(ValueError, match="weight has 100 entries"):
        N.rmsnorm(x, torch.ones(100), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        N.rmsnorm(x, torch.ones(200), 1e-6, residual=torch.randn(3, 100))
    with pytest.raises(TypeError, match="rmsnorm: residual: dtype torch.float16"):
        N.rmsnorm(x, torch.ones(200), 1e-6, residual=x.half())


# --- rmsnorm_quant: the norm and the 1x128 fp8 quantization of its output in one kernel -------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("config", N.RMSNORM_CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(1, 2048), (3, 5, 200), (9, 64), (4, 130), (2, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_quant_is_rmsnorm_then_act_quant_bit_for_bit(seed, config, shape, dtype, with_residual):
    """y and h are rmsnorm's; q and s are act_quant(y)'s bits (D = 64 and 130: one partial 128-block
    padded in registers; D = 300: 3 blocks in a 512-wide row, no 4th scale stored); both scale forms."""
    torch.manual_seed(seed)
    x = (torch.randn(shape) * 4).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    x.view(-1, shape[-1])[0] = 0  # an all-zero row: amax floor, finite scale, zero q (without residual)
    r = torch.randn(shape).to(dtype) if with_residual else None
    for reciprocal in (False, True):
        y, h, q, s = N.rmsnorm_quant(x, w, 1e-6, residual=r, scale_reciprocal=reciprocal, config=config)
        plain = N.rmsnorm(x, w, 1e-6, residual=r, config=config)
        y_want, h_want = plain if with_residual else (plain, None)
        assert torch.equal(y, y_want) and (h is None) == (r is None) and (h is None or torch.equal(h, h_want))
        q_want, s_want = Q.act_quant(y.reshape(-1, shape[-1]), scale_reciprocal=reciprocal)
        assert q.shape == shape and s.shape == (*shape[:-1], -(-shape[-1] // 128))
        assert_finite("rmsnorm_quant scale", s)
        assert torch.equal(s.reshape(s_want.shape), s_want), f"{int((s.reshape(s_want.shape) != s_want).sum())} scales"
        assert torch.equal(_bits(q.reshape(q_want.shape)), _bits(q_want))


def test_rmsnorm_quant_matches_the_oracle(seed):
    """Against the unfused torch math and reference act_quant: dequantized q within fp8's rounding."""
    torch.manual_seed(seed)
    x, r, w = torch.randn(5, 300), torch.randn(5, 300), torch.randn(300)
    y, h, q, s = N.rmsnorm_quant(x, w, 1e-6, residual=r)
    y_ref, h_ref, q_ref, s_ref = N.rmsnorm_quant_ref(x, w, 1e-6, residual=r)
    _close(y, y_ref, torch.float32)
    _close(h, h_ref, torch.float32)
    deq = lambda q_, s_: fp8_ref.act_dequant(q_, s_)  # noqa: E731
    assert mean_rel(deq(q, s), deq(q_ref, s_ref)) < TOL["fp8_gemm_fp32_out"]
    assert mean_rel(deq(q, s), y) < 0.05  # e4m3: 3 mantissa bits


def test_rmsnorm_quant_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="rmsnorm_quant: weight has 100 entries"):
        N.rmsnorm_quant(torch.randn(3, 200), torch.ones(100), 1e-6)
