"""kernels/rms_norm.py (residual add + RMSNorm of whole rows) and the decode GEMV's norm prologue (fp8_gemv NORM).

Against the eager program's arithmetic: h = r + d bit for bit; x within one rounding of r's dtype of the reference
RMSNorm (the fp32 mean square is summed in another order). The GEMV with the norm in its prologue against the GEMV of
the norm kernel's x: the same bits (one helper computes the mean square in both, the same expression x).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import fp8_gemv as V  # noqa: E402
from dsv3_export.kernels import rms_norm as N  # noqa: E402
from dsv3_export.kernels._common import launch  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402

# One step of the dtype at the value, relative: at least the spacing of any value (for v in [2^e, 2^(e+1)) the bf16
# step is 2^(e-7) <= |v| * 2^-7), so a value one rounding the other way passes and two steps do not.
STEP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _rows(seed: int, m: int, k: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None):
    gen = torch.Generator().manual_seed(seed)
    r = (torch.randn(m, k, generator=gen) * 4).to(dtype)
    d = torch.randn(m, k, generator=gen).to(dtype)
    w = (1 + 0.3 * torch.randn(k, generator=gen)).to(weight_dtype or dtype)
    return r, d, w


@pytest.mark.parametrize("config", N.NORM_CONFIGS, ids=lambda c: f"w{c.num_warps}")
@pytest.mark.parametrize("m, k", [(1, 2048), (3, 300), (2, 200)])
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)], ids=str)
def test_add_rms_norm_is_the_eager_norm(seed, config, m, k, dtype, weight_dtype):
    r, d, w = _rows(seed, m, k, dtype, weight_dtype)
    x, h = torch.full_like(r, float("nan")), torch.full_like(r, float("nan"))  # every element must be written
    launch(*N.add_rms_norm_spec(r, d, w, 1e-6, x, h), config)
    want_x, want_h = N.add_rms_norm_ref(r, d, w, 1e-6)
    assert torch.equal(h, want_h)
    assert not x.isnan().any()
    err = (x.float() - want_x.float()).abs()
    assert (err <= want_x.float().abs() * STEP[dtype] + 1e-30).all(), err.max()
    assert (err > 0).float().mean() < 0.01  # a rounding apart only where the sum order tips it


def test_add_rms_norm_of_a_zero_row_is_zero():
    r = torch.zeros(2, 256, dtype=torch.bfloat16)
    x, h = N.add_rms_norm(r, r.clone(), torch.ones(256, dtype=torch.bfloat16), 1e-6)
    assert torch.equal(x, r) and torch.equal(h, r)


@pytest.mark.parametrize("config", V.GEMV_CONFIGS,
                         ids=lambda c: f"n{c.kwargs['BLOCK_N']}c{c.kwargs['CHUNK']}w{c.num_warps}")
@pytest.mark.parametrize("m, k", [(1, 2048), (2, 300)])
def test_gemv_norm_prologue_is_the_gemv_of_the_normed_rows(seed, config, m, k):
    """y and h of the GEMV with the norm in its prologue: the GEMV of the norm kernel's x bit for bit, h = r + d; and
    close to act_quant + GEMM of the eager norm's x. N = 200: a ragged column tile and scale block."""
    r, d, nw = _rows(seed, m, k, torch.bfloat16)
    w, w_s = R.weight_quant(torch.randn(200, k, generator=torch.Generator().manual_seed(seed + 1)) / k**0.5)
    y, h = V.fp8_gemv_normed(r, d, nw, 1e-6, w, w_s, config=config)
    x_kernel, _ = N.add_rms_norm(r, d, nw, 1e-6)
    assert torch.equal(h, r + d)
    assert_finite("fp8_gemv_normed", y)
    assert torch.equal(y, V.fp8_gemv(x_kernel, w, w_s, config=config))
    x_eager, _ = N.add_rms_norm_ref(r, d, nw, 1e-6)
    assert mean_rel(y, V.fp8_gemv(x_eager, w, w_s, config=config)) < TOL["fp8_gemm_bf16_out"]


def test_bad_inputs_name_the_problem():
    r = torch.randn(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must be"):
        N.add_rms_norm(r, r[:1], torch.ones(256, dtype=torch.bfloat16), 1e-6)
    with pytest.raises((TypeError, ValueError), match="delta"):
        N.add_rms_norm(r, r.float(), torch.ones(256, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="unit stride"):
        N.add_rms_norm(r, r.t().contiguous().t(), torch.ones(256, dtype=torch.bfloat16), 1e-6)


def test_gemv_normed_without_columns_still_writes_h():
    r, d, nw = _rows(0, 2, 256, torch.bfloat16)
    w, w_s = R.weight_quant(torch.randn(128, 256))
    y, h = V.fp8_gemv_normed(r, d, nw, 1e-6, w[:0], w_s[:0])
    assert y.shape == (2, 0) and torch.equal(h, r + d)
