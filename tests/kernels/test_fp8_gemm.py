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
# default at split 1 runs kernels/fp8_gemm_decode.py, tile this file's kernel; split 3 is the tile kernel in both
@pytest.mark.parametrize("split_k, variant", [(None, "default"), (1, "default"), (3, "default"), (None, "tile"),
                                              (1, "tile")])
def test_fp8_gemm_matches_reference(seed, m, split_k, variant):
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(m, 200, 300)
    out = G.fp8_gemm(a, a_s, b, b_s, torch.float32, split_k=split_k, variant=variant)
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


def test_a_requested_split_is_rounded_so_that_no_split_is_empty():
    assert G.rounded_split(9, 86) == (9, 10)  # w2's 86 K blocks: 8 splits of 10 and one of 6
    assert G.rounded_split(8, 10) == (5, 2)  # 8 splits of 10 blocks would leave 3 empty: 5 of 2
    assert G.rounded_split(1, 16) == (1, 16)
    assert G.takes_decode_kernel(True, 1) and not G.takes_decode_kernel(True, 2)
    assert not G.takes_decode_kernel(False, 1)  # W8A16: the tile kernel reads bf16 activations


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


# -- fp8_linear(act_quant=True): a separate act_quant launch, then the GEMM on its q and s


def test_fp8_linear_is_act_quant_then_the_gemm(seed, monkeypatch):
    """One act_quant launch per call at decode and prefill sizes, the GEMM fed its q and s (the same
    output bit for bit); an empty batch gives an empty [0, N] output."""
    torch.manual_seed(seed)
    w, w_s = R.weight_quant(torch.randn(130, 300) / 300**0.5)
    x = torch.randn(2, 3, 300, dtype=torch.bfloat16)
    calls = []
    real = G.act_quant_kernel
    monkeypatch.setattr(G, "act_quant_kernel", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for shape_class in ("decode", "prefill"):
        y = G.fp8_linear(x, w, w_s, shape_class=shape_class)
        q, s = K.act_quant(x.reshape(-1, 300))
        want = G.fp8_gemm(q, s, w, w_s, torch.bfloat16, shape_class=shape_class).view(2, 3, 130)
        assert torch.equal(y, want)
    assert calls == [1, 1]
    assert G.fp8_linear(torch.zeros(0, 300, dtype=torch.bfloat16), w, w_s).shape == (0, 130)


@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_linear_of_empty_k_gives_zeros(act_quant):
    """K = 0: x.reshape(-1, 0) raised torch's 'cannot reshape' error before fp8_gemm (which gives zeros) ran."""
    w, w_s = torch.zeros((4, 0), dtype=torch.float8_e4m3fn), torch.zeros((1, 0))
    y = G.fp8_linear(torch.randn(2, 3, 0, dtype=torch.bfloat16), w, w_s, act_quant=act_quant)
    assert y.shape == (2, 3, 4) and torch.equal(y, torch.zeros_like(y))
