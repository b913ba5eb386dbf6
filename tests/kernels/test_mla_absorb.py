"""kernels/mla_absorb.py head_gemm against head_gemm_ref in the Triton CPU interpreter.

Tolerances: fp32 is the same products summed in another order (the interpreter's fp32 dot is
fp32): max |out - ref| <= 1e-5 * max |ref|. bf16/fp16: the operands are exact in fp32 (UPCAST), so
the error is the output's rounding: the interpreter truncates fp32 -> bf16 where torch rounds (one
bf16 ulp, 2^-8 relative on average), fp16 rounds; bound mean rel err < 1e-2 (TOL mla_bf16_mean_rel)
and max elementwise |out - ref| <= 2 ulp of |ref|.
Outputs are NaN-poisoned (tests/kernels/conftest.py poisons torch.empty; the out= cases fill NaN
themselves), so an unwritten element fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels._helpers import TOL, assert_finite, mean_rel

pytest.importorskip("triton")

from dsv3_export.kernels import mla_absorb as ka  # noqa: E402


def _weights(g: torch.Generator, h: int, dn: int, dv: int, c: int, dtype: torch.dtype):
    """wkv_b [h * (dn + dv), c] as the engine views it: (W_UK [h, dn, c], W_UV^T [h, c, dv])."""
    w = (torch.randn(h * (dn + dv), c, generator=g) * c**-0.5).to(dtype).view(h, dn + dv, c)  # [h, dn + dv, c]
    return w[:, :dn], w[:, dn:].transpose(1, 2)


def _strided_x(g: torch.Generator, m: int, h: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """x [m, h, k] as a slice of a wider projection (q_nope of q = [m, h, k + 9]): no unit strides but K's."""
    return torch.randn(m, h, k + 9, generator=g).to(dtype)[:, :, 5:5 + k]


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape and out.dtype == dtype, (what, out.shape, out.dtype)
    assert_finite(what, out)
    if dtype == torch.float32:
        err = (out - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item(), f"{what}: max abs err {err:.2e}"
        return
    assert mean_rel(out, ref) < TOL["mla_bf16_mean_rel"], f"{what}: mean rel err {mean_rel(out, ref):.2e}"
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    bound = 2 * ulp * ref.float().abs() + 1e-6
    worst = ((out.float() - ref.float()).abs() - bound).max().item()
    assert worst <= 0, f"{what}: an element off by more than 2 ulp (excess {worst:.2e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m, h, dn, dv, c", [(1, 3, 40, 72, 130), (3, 1, 72, 40, 130), (17, 3, 130, 40, 72)])
def test_both_projections_match_ref(seed, dtype, m, h, dn, dv, c):
    """W_UK (N contiguous) on a strided q_nope slice, then W_UV^T (K contiguous) on the latent."""
    g = torch.Generator().manual_seed(seed)
    w_uk, w_uv = _weights(g, h, dn, dv, c, dtype)
    q_nope = _strided_x(g, m, h, dn, dtype)
    q_latent = ka.head_gemm(q_nope, w_uk)  # [m, h, c]
    assert q_latent.is_contiguous()
    _check(q_latent, ka.head_gemm_ref(q_nope, w_uk), dtype, "W_UK")
    lat = torch.randn(m, h, c, generator=g).to(dtype)
    o = ka.head_gemm(lat, w_uv)  # [m, h, dv]
    _check(o, ka.head_gemm_ref(lat, w_uv), dtype, "W_UV")


def test_transposed_x_and_out_argument(seed):
    """x with its heads innermost ([h, m, k] permuted) and a NaN-filled, non-contiguous `out`."""
    g = torch.Generator().manual_seed(seed)
    m, h, k, n = 5, 3, 70, 33
    x = torch.randn(h, k, m, generator=g).permute(2, 0, 1)  # [m, h, k], stride_k = m
    w = torch.randn(n, h, k, generator=g).permute(1, 2, 0)  # [h, k, n], n outermost
    out = torch.full((h, m, n), float("nan")).transpose(0, 1)  # [m, h, n], not contiguous
    got = ka.head_gemm(x, w, out=out)
    assert got is out
    _check(out, ka.head_gemm_ref(x, w), torch.float32, "permuted")


@pytest.mark.parametrize("config", ka.HEAD_GEMM_CONFIGS, ids=lambda c: "-".join(map(str, c.kwargs.values())))
def test_every_config(seed, config):
    g = torch.Generator().manual_seed(seed)
    w_uk, w_uv = _weights(g, 2, 40, 24, 72, torch.bfloat16)
    x = _strided_x(g, 3, 2, 40, torch.bfloat16)
    _check(ka.head_gemm(x, w_uk, config=config), ka.head_gemm_ref(x, w_uk), torch.bfloat16, "W_UK")
    lat = torch.randn(3, 2, 72, generator=g).bfloat16()
    _check(ka.head_gemm(lat, w_uv, config=config), ka.head_gemm_ref(lat, w_uv), torch.bfloat16, "W_UV")


def test_empty_and_buckets():
    assert ka.head_gemm(torch.randn(0, 2, 8), torch.randn(2, 8, 4)).shape == (0, 2, 4)
    assert [ka.m_bucket(m) for m in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, ka.PREFILL_M_BUCKET]


@pytest.mark.parametrize("x, w, out, error, match", [
    ("list", None, None, TypeError, "head_gemm: x: expected a torch.Tensor"),
    (torch.randn(2, 8), torch.randn(2, 8, 4), None, ValueError, "head_gemm: x: expected 3 dims"),
    (torch.randn(1, 2, 8).to(torch.int32), torch.randn(2, 8, 4), None, TypeError, "head_gemm: x: dtype"),
    (torch.randn(1, 2, 8), torch.randn(2, 8, 4).bfloat16(), None, TypeError, "head_gemm: w: dtype"),
    (torch.randn(1, 2, 8), torch.randn(3, 8, 4), None, ValueError, "head_gemm: w is .*H and K must match"),
    (torch.randn(1, 2, 8), torch.randn(2, 7, 4), None, ValueError, "head_gemm: w is .*H and K must match"),
    (torch.randn(1, 2, 8), torch.randn(2, 8, 4), torch.empty(1, 2, 5), ValueError, r"head_gemm: out must be"),
    (torch.randn(1, 2, 8), torch.randn(2, 8, 4), torch.empty(1, 2, 4).half(), TypeError, "head_gemm: out: dtype"),
])
def test_bad_inputs_name_the_tensor(x, w, out, error, match):
    with pytest.raises(error, match=match):
        ka.head_gemm(x, w, out=out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m, h, k, n", [(1, 3, 130, 40), (2, 2, 72, 13), (5, 1, 512, 9)])
def test_head_gemv_matches_ref(seed, dtype, m, h, k, n):
    """head_gemv (the W_UV form: w [h, k, n] with k contiguous) on a strided x; fp32 products summed in
    another order than head_gemm's dot, so the same bounds as head_gemm."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(h, n, k, generator=g).to(dtype).transpose(1, 2)  # [h, k, n], k contiguous
    x = _strided_x(g, m, h, k, dtype)
    _check(ka.head_gemv(x, w), ka.head_gemm_ref(x, w), dtype, "head_gemv")
    with pytest.raises(ValueError, match="head_gemv: w .* needs K contiguous"):
        ka.head_gemv(x, w.contiguous())  # N contiguous (W_UK's layout)
    out = torch.full((h, m, n), float("nan"), dtype=dtype).transpose(0, 1)  # [m, h, n], not contiguous
    assert ka.head_gemv(x, w, out=out) is out
    _check(out, ka.head_gemm_ref(x, w), dtype, "head_gemv out=")
    assert ka.head_gemv(x[:0], w).shape == (0, h, n)
