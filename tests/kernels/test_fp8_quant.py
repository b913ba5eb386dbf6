"""act_quant / weight_dequant kernels vs the pure-torch oracle (dsv3_export.reference.fp8)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import fp8_quant as K  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, max_ulp_rel  # noqa: E402


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


@pytest.mark.parametrize("m,k", [(1, 300), (3, 128), (37, 300), (5, 70)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_act_quant_bit_exact(seed, m, k, dtype):
    torch.manual_seed(seed)
    x = (torch.randn(m, k) * torch.logspace(-3, 2, k)).to(dtype)  # many binades, so many rounding cases
    q, s = K.act_quant(x)
    q_ref, s_ref = K.act_quant_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (m, (k + 127) // 128)
    assert torch.equal(s, s_ref), "scales must be bit-identical (IEEE division like the oracle)"
    # Bit-exact values: the kernel rounds to e4m3 in fp32 before the cast (see fp8_quant docstring),
    # which sidesteps the interpreter's fp32->fp8 conversion defect.
    assert torch.equal(_bits(q), _bits(q_ref)), f"{int((_bits(q) != _bits(q_ref)).sum())} fp8 values differ"


@pytest.mark.parametrize("m,k", [(1, 300), (37, 300), (6, 1000)])
def test_act_quant_outer_scales(seed, m, k):
    """outer_scales: the same scales, outer-dim-major with each K block's row 16-byte aligned (what TMA and blockwise
    torch._scaled_mm read), and the same q. fp8_gemm_gluon_ws.scales_for_tma takes them as they are and copies
    row-major ones into that layout."""
    torch.manual_seed(seed)
    x = torch.randn(m, k) * 3
    q, s = K.act_quant(x)
    q_outer, s_outer = K.act_quant(x, outer_scales=True)
    assert s_outer.shape == s.shape and s_outer.stride() == (1, -(-m // 4) * 4), s_outer.stride()
    assert torch.equal(s_outer, s) and torch.equal(_bits(q_outer), _bits(q))
    assert s_outer.data_ptr() % 16 == 0

    from dsv3_export.kernels.fp8_gemm_gluon_ws import scales_for_tma

    assert scales_for_tma(s_outer) is s_outer
    copied = scales_for_tma(s)
    assert copied.stride() == s_outer.stride() and torch.equal(copied, s)


def test_act_quant_rounding_ties_and_subnormals():
    # Values on e4m3 rounding ties, subnormals, the 448 edge: x / s lands exactly on them when amax = 448.
    ties = torch.tensor([448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 2.0**-7 * 1.0625, 15.5, 240.0, 232.0,
                         -0.0, 0.0, -3.5, 2.0**-9, 5 * 2.0**-10, 416.0, 447.0])
    x = torch.cat([ties, -ties.flip(0)]).view(1, -1)  # amax 448 -> scale exactly 1
    q, s = K.act_quant(x)
    q_ref, s_ref = K.act_quant_ref(x)
    assert torch.equal(s, s_ref) and s.item() == 1.0
    assert torch.equal(_bits(q), _bits(q_ref))


def _act_quant_cuda_oracle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.fp8.act_quant as ATen computes it on CUDA: `amax / 448.0` (a CPU-scalar divisor)
    is amax * fp32(1/448) there (div_true_kernel_cuda), x / scale stays an IEEE division."""
    k = x.shape[-1]
    nb = (k + 127) // 128
    blocks = torch.nn.functional.pad(x.float(), (0, nb * 128 - k)).unflatten(-1, (nb, 128))  # [M, nb, 128]
    scale = blocks.abs().amax(-1).clamp_min(R.AMAX_FLOOR) * torch.tensor(1 / R.FP8_E4M3_MAX, dtype=torch.float32)
    q = (blocks / scale.unsqueeze(-1)).clamp(-R.FP8_E4M3_MAX, R.FP8_E4M3_MAX).flatten(-2)[..., :k]
    return q.to(R.FP8_DTYPE), scale


@pytest.mark.parametrize("m,k", [(1, 2048), (37, 300)])
def test_act_quant_cuda_scale_form_bit_exact(seed, m, k):
    """The kernel's GPU default (SCALE_RECIPROCAL) reproduces the oracle as torch runs it on CUDA.

    The first H200 run compared the kernel's IEEE-division scales with the CUDA oracle's
    reciprocal-multiply ones: about half the scales differ by one ulp, so no call was bit-exact.
    """
    torch.manual_seed(seed)
    x = (torch.randn(m, k) * torch.logspace(-3, 2, k)).to(torch.bfloat16)
    q, s = K.act_quant(x, scale_reciprocal=True)
    q_ref, s_ref = _act_quant_cuda_oracle(x)
    assert torch.equal(s, s_ref), f"{int((s != s_ref).sum())} of {s.numel()} scales differ"
    assert torch.equal(_bits(q), _bits(q_ref)), f"{int((_bits(q) != _bits(q_ref)).sum())} fp8 values differ"
    # The two forms really differ (else this test would not tell them apart).
    amax = torch.rand(4096) * 10 + 1e-3
    assert (amax / R.FP8_E4M3_MAX != amax * torch.tensor(1 / R.FP8_E4M3_MAX)).float().mean() > 0.2


def test_act_quant_all_zero_block_is_finite():
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    x[:, 128:256] = 0
    x[2] = 0
    q, s = K.act_quant(x)
    assert_finite("act_quant scale", s)
    assert_finite("act_quant q", q)
    assert (s[:, 1] > 0).all() and torch.equal(s[:, 1], torch.full((4,), R.AMAX_FLOOR / R.FP8_E4M3_MAX))
    assert (q[:, 128:256].float() == 0).all()
    assert_finite("dequant", R.act_dequant(q, s))


def test_act_quant_block_max_hits_448(seed):
    torch.manual_seed(seed)
    q, _ = K.act_quant(torch.randn(6, 256) * 1000)
    assert torch.equal(q.float().abs().view(6, 2, 128).amax(-1), torch.full((6, 2), 448.0))


@pytest.mark.parametrize("config", K.ACT_QUANT_CONFIGS, ids=str)
def test_act_quant_every_config(seed, config):
    torch.manual_seed(seed)
    x = torch.randn(37, 200, dtype=torch.bfloat16)
    q, s = K.act_quant(x, config=config)
    q_ref, s_ref = K.act_quant_ref(x)
    assert torch.equal(s, s_ref) and torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("n,k", [(200, 300), (128, 128), (1, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_dequant_matches_reference(seed, n, k, dtype):
    torch.manual_seed(seed)
    w, s = R.weight_quant(torch.randn(n, k) * 3)
    y = K.weight_dequant(w, s, dtype)
    ref = K.weight_dequant_ref(w, s, dtype)
    assert y.dtype == dtype and y.shape == (n, k)
    assert_finite("weight_dequant", y)
    if dtype == torch.bfloat16:  # interpreter truncates fp32 -> bf16: within one ulp
        assert max_ulp_rel(y, ref) <= TOL["dequant_bf16_ulp"]
    else:
        assert torch.equal(y, ref)


@pytest.mark.parametrize("config", K.DEQUANT_CONFIGS, ids=str)
def test_weight_dequant_every_config(seed, config):
    torch.manual_seed(seed)
    w, s = R.weight_quant(torch.randn(200, 300))
    assert torch.equal(K.weight_dequant(w, s, torch.float32, config=config),
                       K.weight_dequant_ref(w, s, torch.float32))


def test_bad_inputs_name_the_problem():
    x = torch.randn(3, 300)
    with pytest.raises(TypeError, match="act_quant: x: dtype torch.int32"):
        K.act_quant(x.int())
    with pytest.raises(ValueError, match="expected 2 dims"):
        K.act_quant(x.view(1, 3, 300))
    with pytest.raises(ValueError, match="unit stride along K"):
        K.act_quant(torch.randn(300, 3).T)
    with pytest.raises(ValueError, match="block_size=64"):
        K.act_quant(x, 64)
    w, s = R.weight_quant(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"needs scale shape \(2, 3\)"):
        K.weight_dequant(w, s[:, :2])
    with pytest.raises(TypeError, match="weight_dequant: w: dtype torch.float32"):
        K.weight_dequant(w.float(), s)
    with pytest.raises(TypeError, match="weight_dequant: dtype"):
        K.weight_dequant(w, s, torch.int8)


def test_eager_large_m_tunes_apart(monkeypatch):
    """Eager act_quant from ACT_QUANT_LARGE_M rows takes its own autotuner among every config; fewer rows the
    packages' (whose key is K alone: in one process the first call per K would otherwise fix the tile for all M).
    The launch is recorded, not run: autotuners exist on a GPU only."""
    fp8_quant = K
    small, large = object(), {True: object(), False: object()}
    monkeypatch.setattr(fp8_quant, "_act_quant_ieee_tuned", small)
    monkeypatch.setattr(fp8_quant, "_act_quant_large_m_tuned", large)
    launched = []
    monkeypatch.setattr(fp8_quant, "launch", lambda *spec: launched.append(spec))
    for m in (fp8_quant.ACT_QUANT_LARGE_M - 1, fp8_quant.ACT_QUANT_LARGE_M):
        fp8_quant.act_quant(torch.zeros(m, 256))
    (_, tuned_small, configs_small, *_), (_, tuned_large, configs_large, *_) = launched
    assert tuned_small is small and configs_small == fp8_quant.ACT_QUANT_TUNED_CONFIGS
    assert tuned_large is large[False] and configs_large == fp8_quant.ACT_QUANT_CONFIGS
