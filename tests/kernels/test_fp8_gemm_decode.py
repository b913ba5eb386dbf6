"""fp8_gemm_decode (both tile orientations) vs dequantize-then-matmul on the SAME quantized inputs, and fp8_gemm's
hand-over of decode calls to it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

import triton  # noqa: E402

from dsv3_export.kernels import fp8_gemm as G  # noqa: E402
from dsv3_export.kernels import fp8_gemm_decode as D  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402


def _operands(m: int, n: int, k: int):
    a, a_s = R.act_quant(torch.randn(m, k) * 2)
    b, b_s = R.weight_quant(torch.randn(n, k) / k**0.5)
    return a, a_s, b, b_s


# M across both tiles (1-16 swapped, 17-64 direct); N and K off the tile and scale grids (ragged, masked loads),
# and on them (EVEN_N / EVEN_K: the weight's loads unmasked).
@pytest.mark.parametrize("m", [1, 5, 16, 17, 40, 64])
@pytest.mark.parametrize("n, k", [(200, 300), (130, 640), (128, 256), (70, 100)])  # (70, 100): one K block
def test_matches_reference(seed, m, n, k):
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(m, n, k)
    out = D.fp8_gemm_decode(a, a_s, b, b_s, torch.float32)  # its output NaN-poisoned (conftest)
    assert_finite("fp8_gemm_decode", out)
    assert mean_rel(out, G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_fp32_out"]


@pytest.mark.parametrize("tile", [D.SWAP_TILE, D.DIRECT_TILE], ids=["swap", "direct"])
def test_each_tile_at_any_m(seed, tile):
    """Either orientation is right at any M (the engines gate them by M; a tile is not limited to its batches)."""
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(23, 72, 260)
    out = D.fp8_gemm_decode(a, a_s, b, b_s, torch.bfloat16, tile=tile)
    assert out.dtype == torch.bfloat16
    assert mean_rel(out.float(), G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_bf16_out"]


def test_a_benchmark_tile_and_config_run_as_given(seed):
    """A tile and Config other than the pinned ones (the probe's sweeps) launch with their own sizes."""
    torch.manual_seed(seed)
    a, a_s, b, b_s = _operands(9, 100, 130)
    cfg = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)
    out = D.fp8_gemm_decode(a, a_s, b, b_s, torch.float32, tile={"SWAP_AB": False, "BLOCK_M": 16}, config=cfg)
    assert mean_rel(out, G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)) < TOL["fp8_gemm_fp32_out"]


def test_zero_blocks_stay_finite():
    _, _, b, b_s = _operands(3, 64, 256)
    a_z, a_s_z = R.act_quant(torch.zeros(3, 256))
    out = D.fp8_gemm_decode(a_z, a_s_z, b, b_s, torch.float32)
    assert torch.equal(out, torch.zeros_like(out))


def test_swap_gate_splits_the_batches():
    assert [D.swap_gate(m) for m in range(1, D.SWAP_MAX_M + 1)] == [1] * D.SWAP_MAX_M
    assert [D.swap_gate(m) for m in (0, D.SWAP_MAX_M + 1, 2 * D.SWAP_MAX_M, D.MAX_M)] == [0, 0, 0, 0]
    assert D.tile_for(D.SWAP_MAX_M) is D.SWAP_TILE and D.tile_for(D.SWAP_MAX_M + 1) is D.DIRECT_TILE


def test_fp8_gemm_hands_w8a8_decode_calls_over(monkeypatch):
    """fp8_gemm runs fp8_gemm_decode for W8A8 decode calls whose K it does not split and that pin no config; the
    rest (split K, weight-only, a pinned config, variant 'tile', M > 64) keep the tile kernel."""
    calls = []
    real = G.decode_checked
    monkeypatch.setattr(G, "decode_checked", lambda *args, **kw: calls.append(args[0].shape[0]) or real(*args, **kw))
    a, a_s, b, b_s = _operands(70, 96, 256)
    x = torch.randn(4, 256).bfloat16()
    G.fp8_gemm(a[:4], a_s[:4], b, b_s, split_k=1)
    assert calls == [4]
    G.fp8_gemm(a[:4], a_s[:4], b, b_s, split_k=2)
    G.fp8_gemm(a[:4], a_s[:4], b, b_s, split_k=1, variant="tile")
    G.fp8_gemm(a[:4], a_s[:4], b, b_s, split_k=1, config=G.DECODE_CONFIGS[0])
    G.fp8_gemm(x, None, b, b_s, split_k=1)
    G.fp8_gemm(a, a_s, b, b_s, split_k=1, shape_class="decode")  # M = 70 > DECODE_MAX_M
    assert calls == [4]


def test_its_batches_are_the_tile_kernels_decode_batches():
    assert D.MAX_M == G.DECODE_MAX_M


def test_bad_inputs_name_the_problem():
    a, a_s, b, b_s = _operands(4, 64, 256)
    with pytest.raises(ValueError, match="M=65 > 64"):
        D.fp8_gemm_decode(*_operands(65, 64, 256))
    with pytest.raises(ValueError, match="a_s must be"):
        D.fp8_gemm_decode(a, a_s[:, :1], b, b_s)
    with pytest.raises(ValueError, match="b_s must be"):
        D.fp8_gemm_decode(a, a_s, b, b_s[:, :1])
    with pytest.raises(ValueError, match="K must match"):
        D.fp8_gemm_decode(a, a_s, b[:, :128], b_s[:, :1])
    with pytest.raises(TypeError, match="fp8_gemm_decode: a"):
        D.fp8_gemm_decode(a.float(), a_s, b, b_s)
    with pytest.raises(ValueError, match="BLOCK_N=96 must divide 128"):
        D.fp8_gemm_decode(a, a_s, b, b_s, config=triton.Config({"BLOCK_N": 96}))
