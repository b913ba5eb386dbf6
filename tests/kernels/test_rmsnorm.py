"""rmsnorm (plain and fused with the residual add) vs the unfused torch math."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import rmsnorm as N  # noqa: E402
from dsv3_export.reference.layers import RMSNorm  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, max_ulp_rel  # noqa: E402


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
