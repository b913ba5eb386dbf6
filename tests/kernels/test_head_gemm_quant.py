"""kernels/mla_absorb.py head_gemm_quant (W_UV with wo's act_quant in its epilogue) in the CPU interpreter.

The engine needs the fused launch to give the SAME bits as head_gemm followed by act_quant, so the checks
are bit-for-bit (fp8 codes as uint8 and fp32 scales, torch.equal), never tolerances:
- against act_quant(head_gemm(x, w)) on random data, head_gemm run with the fused config's tile (BLOCK_M,
  BLOCK_K, BLOCK_N = 128): the interpreter's dot is numpy's matmul, whose summation order may change with
  the tile shape (measured: fp32 scales one ulp apart against head_gemm's 32-column default tile), where
  the GPU's tensor-core chain does not (benchmarks/kbench/mla_proj.py `absorb_q` checks that there);
- against head_gemm_quant_ref (torch: einsum, rounding to x's dtype, act_quant_ref) on data whose sums
  are exact in every order and representable in x's dtype (small integers times a power of 2): then
  neither the summation order nor the interpreter's truncating fp32 -> bf16 conversion (TOOLCHAIN.md)
  can move a bit, and what is left to compare is the epilogue's arithmetic. On gaussian data the oracle
  rounds where the interpreter truncates: there the dequantized outputs agree to a bf16 ulp (bound
  below), a check that the layout is right, not of the bits.
Outputs are NaN-poisoned (tests/kernels/conftest.py): an unwritten code or scale fails torch.equal.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels._helpers import assert_finite, mean_rel

pytest.importorskip("triton")

import triton  # noqa: E402

from dsv3_export.kernels import mla_absorb as ka  # noqa: E402
from dsv3_export.kernels.fp8_quant import act_quant  # noqa: E402

N = 128  # v_head_dim: one act_quant block per head
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DEQUANT_BF16_MEAN_REL = 2e-2  # gaussian data vs the oracle: bf16 truncation vs rounding + e4m3 steps


def _w_uv(g: torch.Generator, h: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """W_UV^T as the engine views wkv_b: [h, dn + 128, c][:, dn:].transpose(1, 2) -> [h, k, 128], K contiguous."""
    return (torch.randn(h, 7 + N, k, generator=g) * k**-0.5).to(dtype)[:, 7:].transpose(1, 2)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _same_tile(config: triton.Config) -> triton.Config:
    """head_gemm's config with the fused kernel's tile: BLOCK_N = 128, the same BLOCK_M and BLOCK_K."""
    return triton.Config({**config.kwargs, "BLOCK_N": N}, num_warps=config.num_warps, num_stages=config.num_stages)


def _separate(x: torch.Tensor, w: torch.Tensor, config: triton.Config, scale_reciprocal: bool = False):
    """The two launches the fused one replaces: head_gemm, flatten, act_quant."""
    m, h, _ = x.shape
    o = ka.head_gemm(x, w, config=_same_tile(config))  # [m, h, 128]
    return act_quant(o.reshape(m, h * N), scale_reciprocal=scale_reciprocal)  # [m, h * 128] -> q, s [m, h]


def _assert_same_bits(got, want, what: str) -> None:
    (q, s), (q_want, s_want) = got, want
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, (what, q.dtype, s.dtype)
    assert q.shape == q_want.shape and s.shape == s_want.shape, (what, q.shape, s.shape)
    assert_finite(f"{what} scales", s)
    bad_q = (_bits(q) != _bits(q_want)).sum().item()
    bad_s = (s != s_want).sum().item()
    assert bad_q == 0 and bad_s == 0, f"{what}: {bad_q} of {q.numel()} codes and {bad_s} of {s.numel()} scales differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("m, k", [(1, 512), (5, 200), (37, 512)])
def test_same_bits_as_head_gemm_then_act_quant(seed, dtype, m, k):
    g = torch.Generator().manual_seed(seed)
    h = int(torch.randint(3, 17, (1,), generator=g))
    x = torch.randn(m, h, k + 3, generator=g).to(dtype)[:, :, 3:]  # [m, h, k], a strided slice
    w = _w_uv(g, h, k, dtype)
    q, s = ka.head_gemm_quant(x, w)
    _assert_same_bits((q, s), _separate(x, w, ka.HEAD_GEMM_QUANT_CONFIGS[0]), f"m={m} h={h} k={k} {dtype}")
    # the oracle rounds its bf16 output where the interpreter truncates: values, not bits
    q_ref, s_ref = ka.head_gemm_quant_ref(x, w)
    deq = q.float().view(m, h, N) * s.view(m, h, 1)  # [m, h, 128] dequantized
    deq_ref = q_ref.float().view(m, h, N) * s_ref.view(m, h, 1)
    assert mean_rel(deq, deq_ref) < DEQUANT_BF16_MEAN_REL, mean_rel(deq, deq_ref)


def _exact(g: torch.Generator, shape: tuple, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Small integers times 2^-4: every product and partial sum is exact in fp32."""
    return (torch.randint(lo, hi + 1, shape, generator=g).float() * 2.0**-4).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("m, k", [(1, 512), (5, 200), (37, 512)])
def test_same_bits_as_the_oracle_on_exact_sums(seed, dtype, m, k):
    g = torch.Generator().manual_seed(seed)
    h = int(torch.randint(3, 17, (1,), generator=g))
    x = _exact(g, (m, h, k), -2, 2, dtype)
    w = _exact(g, (h, N, k), -1, 1, dtype).transpose(1, 2)  # [h, k, 128], K contiguous
    exact = torch.einsum("mhk,hkn->mhn", x.double(), w.double())  # [m, h, 128]
    # the precondition that makes the bits order- and rounding-independent (sums are multiples of 2^-8)
    assert torch.equal(exact.to(dtype).double(), exact), "test data: a sum not representable in x's dtype"
    _assert_same_bits(ka.head_gemm_quant(x, w), ka.head_gemm_quant_ref(x, w), f"m={m} h={h} k={k} {dtype}")


@pytest.mark.parametrize("config", ka.HEAD_GEMM_QUANT_CONFIGS,
                         ids=lambda c: "-".join(map(str, c.kwargs.values())) + f"-w{c.num_warps}-s{c.num_stages}")
def test_every_config(seed, config):
    g = torch.Generator().manual_seed(seed)
    m, h, k = 37, 3, 200  # 37: not a multiple of any BLOCK_M; 200: of no BLOCK_K
    x = torch.randn(m, h, k, generator=g).bfloat16()
    w = _w_uv(g, h, k, torch.bfloat16)
    _assert_same_bits(ka.head_gemm_quant(x, w, config=config), _separate(x, w, config), str(config))


@pytest.mark.parametrize("reciprocal", [True, False])
def test_scale_rounding_follows_act_quant(seed, reciprocal):
    """scale_reciprocal picks act_quant's CUDA (amax * fp32(1/448)) or CPU (IEEE amax / 448) scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 5, 130, generator=g).bfloat16()
    w = _w_uv(g, 5, 130, torch.bfloat16)
    got = ka.head_gemm_quant(x, w, scale_reciprocal=reciprocal)
    _assert_same_bits(got, _separate(x, w, ka.HEAD_GEMM_QUANT_CONFIGS[0], reciprocal), f"reciprocal={reciprocal}")


def test_empty_and_zero_rows():
    q, s = ka.head_gemm_quant(torch.randn(0, 2, 8), torch.randn(2, 8, N))
    assert q.shape == (0, 2 * N) and s.shape == (0, 2)
    q, s = ka.head_gemm_quant(torch.zeros(3, 2, 8), torch.randn(2, 8, N))  # amax floors, codes 0
    assert (q.float() == 0).all() and torch.equal(s, ka.head_gemm_quant_ref(torch.zeros(3, 2, 8),
                                                                           torch.randn(2, 8, N))[1])


@pytest.mark.parametrize("x, w, error, match", [
    ("list", None, TypeError, "head_gemm_quant: x: expected a torch.Tensor"),
    (torch.randn(2, 8), torch.randn(2, 8, N), ValueError, "head_gemm_quant: x: expected 3 dims"),
    (torch.randn(1, 2, 8).to(torch.int32), torch.randn(2, 8, N), TypeError, "head_gemm_quant: x: dtype"),
    (torch.randn(1, 2, 8), torch.randn(2, 8, N).bfloat16(), TypeError, "head_gemm_quant: w: dtype"),
    (torch.randn(1, 2, 8), torch.randn(3, 8, N), ValueError, "head_gemm_quant: w is .*H and K must match"),
    (torch.randn(1, 2, 8), torch.randn(2, 8, 64), ValueError, r"head_gemm_quant: w is \[H, K, N=64\]; N must be 128"),
])
def test_bad_inputs_name_the_tensor(x, w, error, match):
    with pytest.raises(error, match=match):
        ka.head_gemm_quant(x, w)


def test_benchmark_section_smoke(tmp_path, monkeypatch):
    """benchmarks/kernels.py --only absorb_q on the CPU: the section runs and its bit checks pass."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_absorb_q", script)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--cpu-smoke", "--only", "absorb_q"]) == 0
    rows = [r for r in json.loads((tmp_path / "kernels.json").read_text())["rows"] if r["section"] == "absorb_q"]
    checked = [r for r in rows if r["ok"] is not None]
    assert len(checked) == 2 * 2 and all(r["ok"] and r["error"] == 0 for r in checked), rows  # M 1, 5: tuned, pinned
