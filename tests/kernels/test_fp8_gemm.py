"""fp8_gemm / fp8_linear vs dequantize-then-matmul on the SAME quantized inputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import fp8_gemm as G  # noqa: E402
from dsv3_export.kernels import fp8_gemm_persistent as P  # noqa: E402
from dsv3_export.kernels import fp8_quant as K  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402


def _operands(m: int, n: int, k: int):
    a, a_s = R.act_quant(torch.randn(m, k) * 2)
    b, b_s = R.weight_quant(torch.randn(n, k) / k**0.5)
    return a, a_s, b, b_s


@pytest.mark.parametrize("m", [1, 3, 37])
@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_fp8_gemm_matches_reference(seed, m, split_k):
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(m, 200, 300)
    out = G.fp8_gemm(a, a_s, b, b_s, torch.float32, split_k=split_k)
    ref = G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)
    assert out.shape == (m, 200) and out.dtype == torch.float32
    assert_finite("fp8_gemm", out)
    assert mean_rel(out, ref) < TOL["fp8_gemm_fp32_out"]


def test_fp8_gemm_bf16_output(seed):
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(19, 257, 384)
    out = G.fp8_gemm(a, a_s, b, b_s)  # bf16 by default
    assert out.dtype == torch.bfloat16
    assert mean_rel(out, G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_bf16_out"]


@pytest.mark.parametrize("config", G.FP8_GEMM_CONFIGS, ids=str)
def test_fp8_gemm_every_config(seed, config):
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(37, 200, 300)
    out = G.fp8_gemm(a, a_s, b, b_s, torch.float32, split_k=2, config=config)
    assert mean_rel(out, G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_fp32_out"]


def test_fp8_gemm_zero_blocks_stay_finite():
    a, a_s = R.act_quant(torch.zeros(5, 300))
    b, b_s = R.weight_quant(torch.zeros(200, 300))
    out = G.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert_finite("fp8_gemm of zeros", out)
    assert (out == 0).all()


@pytest.mark.parametrize("shape_class", ["decode", "prefill"])
def test_shape_class_overrides_the_tile_set(seed, shape_class):
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(70, 200, 300)  # 70 > DECODE_MAX_M: "decode" forces small tiles + split-K
    out = G.fp8_gemm(a, a_s, b, b_s, torch.float32, shape_class=shape_class)
    assert mean_rel(out, G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_fp32_out"]


def test_empty_k_gives_zeros():
    a, a_s, b, b_s = _operands(3, 200, 300)
    out = G.fp8_gemm(a[:, :0], a_s[:, :0], b[:, :0], b_s[:, :0], torch.float32)
    assert out.shape == (3, 200) and (out == 0).all()


def test_split_k_heuristic_only_for_small_m():
    assert G._choose_split_k(4096, 2048, 16, torch.device("cpu")) == 1
    assert G._choose_split_k(1, 2048, 16, torch.device("cpu")) > 1
    assert G._choose_split_k(1, 2048, 1, torch.device("cpu")) == 1


def test_split_k_heuristic_at_the_16b_shapes():
    cpu = torch.device("cpu")  # a nominal 132 SMs
    assert G._choose_split_k(1, 10944, 16, cpu) == 1  # 171 N tiles of 64 already cover the SMs
    assert G._choose_split_k(1, 2048, 86, cpu) == 9  # 32 N tiles x 9 = 288 CTAs, 2+ per SM
    assert G._choose_split_k(1, 2048, 16, cpu) == 8  # at least 2 K blocks per split
    assert G._choose_split_k(64, 2048, 16, cpu) == 2  # partials' traffic <= half the weight: K / (16 M)


def test_split_k_partials_are_summed_and_cast_in_one_pass(seed):
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(3, 200, 1100)  # 9 K blocks: splits of 3
    out = G.fp8_gemm(a, a_s, b, b_s, torch.bfloat16, split_k=3)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 200)
    assert mean_rel(out, G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_bf16_out"]


def test_config_list_covers_both_tile_sets_once():
    keys = [str(c) for c in G.FP8_GEMM_CONFIGS]
    assert len(keys) == len(set(keys))
    assert {str(c) for c in G.DECODE_CONFIGS + G.PREFILL_CONFIGS} == set(keys)


@pytest.mark.parametrize("shape", [(300,), (2, 5, 300), (1, 1, 300)])
def test_fp8_linear_matches_reference(seed, shape):
    torch.manual_seed(seed)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    w, w_s = R.weight_quant(torch.randn(200, 300) / 300**0.5)
    y = G.fp8_linear(x, w, w_s, out_dtype=torch.float32)
    ref = G.fp8_linear_ref(x, w, w_s, out_dtype=torch.float32)  # same (exact) activation quantization
    assert y.shape == (*shape[:-1], 200)
    assert mean_rel(y, ref) < TOL["fp8_gemm_fp32_out"]
    assert G.fp8_linear(x, w, w_s).dtype == torch.bfloat16  # out_dtype defaults to x.dtype


def test_fp8_linear_close_to_dense_linear(seed):
    # End to end: fp8 activations and weights vs the dense bf16 product (quantization error only).
    torch.manual_seed(seed)
    x = torch.randn(7, 300)
    w_dense = torch.randn(200, 300) / 300**0.5
    w, w_s = R.weight_quant(w_dense)
    y = G.fp8_linear(x, w, w_s)
    assert mean_rel(y, x @ w_dense.T) < 0.1


@pytest.mark.parametrize("m", [1, 37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_weight_only_gemm(seed, m, dtype, split_k):
    torch.manual_seed(seed)
    _, _, b, b_s = _operands(m, 200, 300)
    a = torch.randn(m, 300, dtype=dtype)
    out = G.fp8_gemm(a, None, b, b_s, torch.float32, split_k=split_k)
    assert_finite("fp8_gemm weight-only", out)
    assert mean_rel(out, G.fp8_gemm_ref(a, None, b, b_s, torch.float32)) < TOL["fp8_gemm_fp32_out"]


def test_weight_only_linear_matches_the_op_semantics(seed):
    # dsv3::fp8_linear(act_quant=False) = F.linear(x, dequant(W) in x.dtype): equal up to bf16 rounding.
    torch.manual_seed(seed)
    x = torch.randn(3, 4, 300, dtype=torch.bfloat16)
    w, w_s = R.weight_quant(torch.randn(200, 300) / 300**0.5)
    y = G.fp8_linear(x, w, w_s, act_quant=False)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 4, 200)
    op_ref = torch.nn.functional.linear(x.float(), R.weight_dequant(w, w_s, torch.bfloat16).float())
    assert mean_rel(y, op_ref) < TOL["fp8_weight_only_vs_op"]


def test_bad_inputs_name_the_problem():
    a, a_s, b, b_s = _operands(3, 200, 300)
    with pytest.raises(ValueError, match="K must match"):
        G.fp8_gemm(a, a_s, b[:, :256], b_s)
    with pytest.raises(ValueError, match=r"a_s must be \[M, ceil\(K/128\)\]"):
        G.fp8_gemm(a, a_s[:, :2], b, b_s)
    with pytest.raises(ValueError, match=r"b_s must be \[ceil\(N/128\), ceil\(K/128\)\]"):
        G.fp8_gemm(a, a_s, b, b_s.T.contiguous())
    with pytest.raises(TypeError, match="fp8_gemm: a: dtype torch.float32"):
        G.fp8_gemm(a.float(), a_s, b, b_s)
    with pytest.raises(ValueError, match="split_k=9"):
        G.fp8_gemm(a, a_s, b, b_s, split_k=9)
    with pytest.raises(ValueError, match="a_s is only for fp8 a"):
        G.fp8_gemm(torch.randn(3, 300, dtype=torch.bfloat16), a_s, b, b_s)
    with pytest.raises(ValueError, match="fp8 a needs a_s"):
        G.fp8_gemm(a, None, b, b_s)
    with pytest.raises(TypeError, match="weight-only path needs bf16/fp16 x"):
        G.fp8_linear(torch.randn(3, 300), b, b_s, act_quant=False)
    with pytest.raises(ValueError, match="shape_class='huge'"):
        G.fp8_gemm(a, a_s, b, b_s, shape_class="huge")
    with pytest.raises(TypeError, match="out_dtype"):
        G.fp8_gemm(a, a_s, b, b_s, torch.int32)


# -- variant="tma_persistent" (kernels/fp8_gemm_persistent.py): the Hopper prefill candidate


@pytest.mark.parametrize("config", P.TMA_PERSISTENT_CONFIGS, ids=str)
@pytest.mark.parametrize("m, n, k", [(37, 200, 400), (130, 264, 272), (5, 136, 1040)])
def test_tma_persistent_every_config_ragged(seed, config, m, n, k):
    # Ragged M and N, K not a multiple of 128 (TMA zero-fills the tail); 3 programs so every
    # program walks several tiles of the persistent loop. torch.empty is NaN-poisoned (conftest).
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(m, n, k)
    out = P.fp8_gemm_tma_persistent(a, a_s, b, b_s, torch.float32, config, programs=3)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_finite("fp8_gemm tma_persistent", out)
    assert mean_rel(out, G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_fp32_out"]


# The prefill sweep's candidates, one per distinct kernel body (the interpreter ignores stages,
# warps and maxnreg; tests/kernels/test_compile_sm90.py compiles every one of them for sm_90).
_CANDIDATE_BODIES = {str(sorted(c.kwargs.items())): (name, c) for name, c in P.PREFILL_CANDIDATES.items()}


@pytest.mark.parametrize("name, config", list(_CANDIDATE_BODIES.values()), ids=[n for n, _ in _CANDIDATE_BODIES.values()])
@pytest.mark.parametrize("m, n, k", [(37, 200, 400), (130, 264, 272), (5, 136, 1040), (70, 136, 128)])
def test_tma_persistent_prefill_candidates_ragged(seed, name, config, m, n, k):
    # Ragged M, N and K (1 to 9 K blocks: the prefetch's first and last block), several tiles per
    # program; fp32 c so the comparison sees the kernel's own arithmetic.
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(m, n, k)
    out = G.fp8_gemm(a, a_s, b, b_s, torch.float32, variant="tma_persistent", config=config)
    assert_finite(f"fp8_gemm tma_persistent {name}", out)
    assert mean_rel(out, G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_fp32_out"]
    few = P.fp8_gemm_tma_persistent(a, a_s, b, b_s, torch.float32, config, programs=3)
    assert torch.equal(few, out), "the persistent tile loop changed the result"


def test_prefill_candidates_pin_the_scale_prefetch_and_fit_an_sm():
    # Both scale-load forms are swept; the grid's CTAs per SM must fit the H200's 64K registers
    # (maxnreg, else 255 per thread) and 228 KB of shared memory (stages x 24/32 KB + epilogue).
    assert {c.kwargs["SCALE_PREFETCH"] for c in P.PREFILL_CANDIDATES.values()} == {True, False}
    assert all(not c.kwargs["SCALE_PREFETCH"] for c in P.TMA_PERSISTENT_CONFIGS)  # autotuning unchanged
    for name, c in P.PREFILL_CANDIDATES.items():
        bm, bn, per_sm = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["CTAS_PER_SM"]
        assert bn <= 128 and c.num_warps == bm // 16, name
        assert per_sm * 32 * c.num_warps * (c.maxnreg or 255) <= 65536, name
        smem = c.num_stages * (bm + bn) * 128 + bm * bn * 2  # fp8 a and b stages + bf16 c tile
        assert per_sm * (smem + 1024) <= 228 * 1024, (name, smem)


def test_tma_persistent_variant_through_fp8_gemm(seed):
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(70, 200, 400)
    ref = G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)
    out = G.fp8_gemm(a, a_s, b, b_s, variant="tma_persistent")  # bf16, the default out_dtype
    assert out.dtype == torch.bfloat16 and out.shape == (70, 200)
    assert mean_rel(out, ref) < TOL["fp8_gemm_bf16_out"]
    default = G.fp8_gemm(a, a_s, b, b_s, torch.float32)  # the default variant is unchanged
    assert mean_rel(default, ref) < TOL["fp8_gemm_fp32_out"]


def test_tma_persistent_refuses_what_tma_cannot_load():
    a, a_s, b, b_s = _operands(3, 200, 300)  # K=300: 300-byte fp8 rows are not 16-byte aligned
    with pytest.raises(ValueError, match=r"K=300 must be a multiple of 16"):
        G.fp8_gemm(a, a_s, b, b_s, variant="tma_persistent")
    a, a_s, b, b_s = _operands(3, 204, 256)  # bf16 c rows of 408 bytes
    with pytest.raises(ValueError, match=r"c rows are 408 B"):
        G.fp8_gemm(a, a_s, b, b_s, variant="tma_persistent")
    a, a_s, b, b_s = _operands(3, 200, 256)
    with pytest.raises(ValueError, match="needs fp8 a with a_s"):
        G.fp8_gemm(torch.randn(3, 256, dtype=torch.bfloat16), None, b, b_s, variant="tma_persistent")
    with pytest.raises(ValueError, match="does not split K"):
        G.fp8_gemm(a, a_s, b, b_s, split_k=2, variant="tma_persistent")
    with pytest.raises(ValueError, match="variant='fast'"):
        G.fp8_gemm(a, a_s, b, b_s, variant="fast")


def test_tma_persistent_configs_are_hopper_sized():
    # One scale per K step needs BLOCK_N <= 128; the grid multiplies the SM count by CTAS_PER_SM.
    for cfg in P.TMA_PERSISTENT_CONFIGS:
        assert cfg.kwargs["BLOCK_N"] <= 128 and cfg.kwargs["CTAS_PER_SM"] >= 1


def test_tma_persistent_refuses_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, a_s, b, b_s = _operands(3, 200, 256)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fa, fa_s, fb, fb_s = (mode.from_tensor(t) for t in (a, a_s, b, b_s))
        with pytest.raises(NotImplementedError, match="eager-only"):
            G.fp8_gemm(fa, fa_s, fb, fb_s, variant="tma_persistent")


def test_tma_persistent_allocator_installed_once_never_overwritten():
    # Device-side descriptors need triton's global-scratch allocator: installed when none is set,
    # a caller's own allocator is kept. Run in copies of the context: the setting is a ContextVar.
    import contextvars

    import triton
    from triton.runtime import _allocation

    def after_ensure(preset):
        if preset is not None:
            triton.set_allocator(preset)
        P._ensure_allocator()
        return _allocation._allocator.get()

    assert contextvars.copy_context().run(after_ensure, None) is P._scratch
    theirs = lambda size, alignment, stream: None  # noqa: E731
    assert contextvars.copy_context().run(after_ensure, theirs) is theirs


# -- quant_a: the decode GEMM quantizes its own A tiles (one launch instead of act_quant + GEMM)


def _activation(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    # Many binades (as test_fp8_quant's bit-exact test) so every e4m3 rounding case is hit; row 1 all
    # zeros and one whole 128-block zero, which quantize with the AMAX_FLOOR scale and must stay finite.
    x = torch.randn(m, k) * torch.logspace(-3, 2, k)[torch.randperm(k)]
    if m > 1:
        x[1] = 0
    x[:, 128:256] = 0
    return x.to(dtype)


def _unfused(x, w, w_s, out_dtype, split_k, scale_reciprocal, config=None):
    q, s = K.act_quant(x, scale_reciprocal=scale_reciprocal)
    return G.fp8_gemm(q, s, w, w_s, out_dtype, split_k=split_k, config=config)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n, k, split_k", [(200, 300, 1), (200, 300, 3), (130, 1100, None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_a_equals_act_quant_then_gemm_bit_for_bit(seed, m, n, k, split_k, dtype):
    """Exact, not a tolerance: the kernel quantizes with act_quant's arithmetic (same fp8 operands,
    same scales), so every K block's dot and its scaling are the same fp32 operations in the same
    order. N, K off the 128 grid (ragged scale blocks, masked tails); split-K None lets the decode
    heuristic split K=1100 (9 K blocks) too."""
    torch.manual_seed(seed)
    x = _activation(m, k, dtype)
    w, w_s = R.weight_quant(torch.randn(n, k) / k**0.5)
    out = G.fp8_gemm(x, None, w, w_s, torch.float32, split_k=split_k, quant_a=True)  # NaN-poisoned outputs
    ref = _unfused(x, w, w_s, torch.float32, split_k, None)
    assert out.shape == (m, n)
    assert_finite("fp8_gemm quant_a", out)
    assert torch.equal(out, ref), f"{int((out != ref).sum())} of {out.numel()} outputs differ"
    # and the operands are the oracle's: equal to dequantize-then-matmul within the GEMM's own tolerance
    assert mean_rel(out, G.fp8_gemm_ref(*R.act_quant(x), w, w_s, torch.float32)) < TOL["fp8_gemm_fp32_out"]
    if m > 1:
        assert (out[1] == 0).all()  # an all-zero row: AMAX_FLOOR scale, exact zeros, no NaN


@pytest.mark.parametrize("scale_reciprocal", [True, False])
def test_quant_a_follows_both_scale_forms(seed, scale_reciprocal):
    """amax * fp32(1/448) (the CUDA form the GPU runs) and IEEE amax / 448 (the CPU form): each equal
    to act_quant in the same form; the two forms give different outputs on these inputs, so the
    flag really reaches the kernel. fp16 x and a bf16 output here."""
    torch.manual_seed(seed)
    x = _activation(5, 2048, torch.float16)
    w, w_s = R.weight_quant(torch.randn(70, 2048) / 2048**0.5)
    out = G.fp8_gemm(x, None, w, w_s, torch.bfloat16, split_k=2, quant_a=True, scale_reciprocal=scale_reciprocal)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _unfused(x, w, w_s, torch.bfloat16, 2, scale_reciprocal))
    other = _unfused(x, w, w_s, torch.float32, 2, not scale_reciprocal)
    mine = G.fp8_gemm(x, None, w, w_s, torch.float32, split_k=2, quant_a=True, scale_reciprocal=scale_reciprocal)
    assert not torch.equal(mine, other)


@pytest.mark.parametrize("config", G.DECODE_CONFIGS, ids=str)
def test_quant_a_every_decode_config(seed, config):
    torch.manual_seed(seed)
    x = _activation(17, 300, torch.bfloat16)
    w, w_s = R.weight_quant(torch.randn(200, 300) / 300**0.5)
    out = G.fp8_gemm(x, None, w, w_s, torch.float32, split_k=2, quant_a=True, config=config)
    assert torch.equal(out, _unfused(x, w, w_s, torch.float32, 2, None, config))  # same tiles: same dot order


def test_fp8_linear_fuses_the_quantization_only_when_asked(seed, monkeypatch):
    """fp8_linear(fuse_act_quant=True): one launch (no act_quant kernel), the same output bit for bit;
    the default is act_quant + GEMM at every size (the fused GEMM measured 3-4x slower on the H200)."""
    torch.manual_seed(seed)
    w, w_s = R.weight_quant(torch.randn(130, 300) / 300**0.5)
    x = torch.randn(2, 3, 300, dtype=torch.bfloat16)
    calls = []
    real = G.act_quant_kernel
    monkeypatch.setattr(G, "act_quant_kernel", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fused = G.fp8_linear(x, w, w_s, fuse_act_quant=True, shape_class="decode")
    assert calls == []
    separate = G.fp8_linear(x, w, w_s, shape_class="decode")  # M = 6: decode-sized, still separate
    assert calls == [1] and torch.equal(fused, separate) and fused.shape == (2, 3, 130)
    G.fp8_linear(x, w, w_s)
    assert calls == [1, 1]


def test_quant_a_empty_inputs_and_bad_arguments():
    w, w_s = R.weight_quant(torch.randn(200, 300))
    for fused in (False, True):
        out = G.fp8_linear(torch.zeros(0, 300, dtype=torch.bfloat16), w, w_s, fuse_act_quant=fused)
        assert out.shape == (0, 200)
    x = torch.randn(3, 300, dtype=torch.bfloat16)
    a, a_s = R.act_quant(x)
    with pytest.raises(TypeError, match="fp8_gemm: a: dtype torch.float8_e4m3fn"):
        G.fp8_gemm(a, a_s, w, w_s, quant_a=True)
    with pytest.raises(ValueError, match="a_s is only for fp8 a"):
        G.fp8_gemm(x, a_s, w, w_s, quant_a=True)
    with pytest.raises(ValueError, match="does not quantize a"):
        G.fp8_gemm(x[:, :256], None, w[:, :256], w_s[:, :2], quant_a=True, variant="tma_persistent")
    with pytest.raises(ValueError, match="fuse_act_quant=True needs act_quant=True"):
        G.fp8_linear(x, w, w_s, act_quant=False, fuse_act_quant=True)
