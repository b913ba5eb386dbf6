"""kernels/mla_tail.py in the Triton CPU interpreter: the merge + W_UV + act_quant kernel against
mla_tail_ref, against its own unquantized mode, and against the separate kernels it replaces.

Shapes are not block multiples: B=3, H=3, C=96 (BLOCK_K 64/128 leave a ragged last chunk), 5 or
MAX_SPLITS splits, rows with different cache lengths (one that uses one split of the runtime rule,
one with no key at all: an all-zero output block must quantize to zeros with the floor scale, no NaN).
Unwritten partials (beyond a row's runtime split count) are NaN: the kernel must not read them.
Outputs are NaN-poisoned (tests/kernels/conftest.py poisons torch.empty).

Tolerances:
- quant=True against act_quant_ref of the kernel's own quant=False output: bit-exact (the same y,
  then act_quant's arithmetic), every config, fp32 and bf16.
- quant=False against the ref: fp32 and fp16 differ by summation order only (max |diff| <= 1e-5 and
  2 fp16 ulp of |ref| + 1e-3 of the output's max); bf16 also by the interpreter truncating fp32 -> bf16
  where torch rounds (lat and y: one bf16 ulp each): mean rel err < 1e-2, max |diff| <= 4 bf16 ulp of
  the output's max.
- quant=True against the ref and against the current path (reduce kernel, head_gemm, act_quant):
  a different summation order moves y by an fp32 ulp (fp32) or now and then a bf16/fp16 ulp, which
  can flip an fp8 rounding (and the block scale, by one ulp of y's dtype). Bound: s within 2^-7
  relative (bf16 ulp; fp32: 1e-6), each dequantized value within one e4m3 step of the reference's
  (2^(floor(log2|q|) - 3) x s, or the subnormal step 2^-9 x s) plus the scale's own difference, and at
  most 2% of the codes different (fp32: 0.1%).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels._helpers import TOL, assert_finite, mean_rel

pytest.importorskip("triton")

from dsv3_export.kernels import mla_absorb as ka  # noqa: E402
from dsv3_export.kernels import mla_decode as kd  # noqa: E402
from dsv3_export.kernels import mla_tail as kt  # noqa: E402
from dsv3_export.kernels.mla_splits import MAX_SPLITS  # noqa: E402
from dsv3_export.reference import fp8 as fp8_ref  # noqa: E402

B, H, C, R, DN = 3, 3, 96, 16, 40
SCALE = 0.3


def _w_uv(g: torch.Generator, dv: int, dtype: torch.dtype) -> torch.Tensor:
    """W_UV [H, DV, C] as the engine views wkv_b: wkv_b.view(h, dn + dv, c)[:, dn:] (strided)."""
    return (torch.randn(H * (DN + dv), C, generator=g) * C**-0.5).to(dtype).view(H, DN + dv, C)[:, DN:]


def _partials(g: torch.Generator, splits: int, seqlens: list[int], runtime: bool):
    """o_part / lse as the split kernel leaves them: empty splits at lse -inf; beyond a row's runtime
    split count, NaN (never written). Row 2's splits are all empty (no key)."""
    o = torch.randn(B, H, splits, C, generator=g)
    lse = torch.randn(B, H, splits, generator=g) * 4
    lse[1, :, 2:4] = float("-inf")
    lse[2] = float("-inf")
    o[2] = 0.0
    seq = torch.tensor(seqlens, dtype=torch.int32)
    used = kt.used_splits(seq, H, splits, runtime)
    for row, n in enumerate(used.tolist()):
        o[row, :, n:] = float("nan")
        lse[row, :, n:] = float("nan")
    return o, lse, seq, used


def _codes_close(q, s, q_ref, s_ref, s_rel: float, max_flips: float, what: str) -> None:
    """One e4m3 step per value (plus the scale's difference), few codes different (module docstring)."""
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and q.shape == q_ref.shape, what
    assert_finite(what + " s", s)
    assert bool(torch.isfinite(q.float()).all()), what + ": NaN codes"
    assert ((s - s_ref).abs() <= s_rel * s_ref).all(), f"{what}: scales {s} vs {s_ref}"
    qf, qr = q.float().view(*s.shape, -1), q_ref.float().view(*s.shape, -1)  # [B, H, 128]
    step = torch.where(qr.abs() >= 2.0**-6, torch.exp2(torch.floor(torch.log2(qr.abs().clamp_min(2.0**-6))) - 3),
                       2.0**-9)
    diff = (qf * s[..., None] - qr * s_ref[..., None]).abs()
    bound = 1.01 * step * s_ref[..., None] + (s - s_ref).abs()[..., None] * qf.abs()
    assert (diff <= bound).all(), f"{what}: a value off by more than one e4m3 step ({(diff - bound).max():.3e})"
    flips = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
    assert flips <= max_flips, f"{what}: {flips:.2%} of the codes differ"


@pytest.mark.parametrize("config", kt.MLA_TAIL_CONFIGS, ids=lambda c: "b{BLOCK_B}_k{BLOCK_K}".format(**c.kwargs))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("runtime", [False, True], ids=["fixed", "runtime"])
def test_quantized_tail_is_act_quant_of_its_output(seed, config, dtype, runtime):
    g = torch.Generator().manual_seed(seed)
    splits = MAX_SPLITS if runtime else 5
    o, lse, seq, used = _partials(g, splits, [1, 130, 0] if runtime else [7, 300, 0], runtime)
    w = _w_uv(g, 128, dtype)
    target = kt.runtime_split_target(o.device) if runtime else 0
    y = kt.mla_tail(o, lse, seq, w, split_target=target, quant=False, config=config)  # [B, H, 128]
    q, s = kt.mla_tail(o, lse, seq, w, split_target=target, quant=True, config=config)
    assert_finite("y", y)
    q_y, s_y = fp8_ref.act_quant(y.reshape(B, H * 128))
    assert torch.equal(q.view(torch.uint8), q_y.view(torch.uint8)) and torch.equal(s, s_y)
    assert (q[2].float() == 0).all() and torch.equal(s[2], torch.full((H,), 1e-12) / 448)  # the no-key row
    ref = kt.mla_tail_ref(o, lse, used, w, quant=False)
    if dtype == torch.float32:
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
        _codes_close(q, s, *kt.mla_tail_ref(o, lse, used, w), 1e-6, 1e-3, "fp32 vs ref")
    else:
        assert mean_rel(y, ref) < TOL["mla_bf16_mean_rel"]
        assert (y.float() - ref.float()).abs().max() <= 4 * 2.0**-7 * ref.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_unquantized_tail_any_dv(seed, dtype):
    """quant=False takes any DV (here 40, not a power of 2) and writes [B, H, DV]."""
    g = torch.Generator().manual_seed(seed)
    o, lse, seq, used = _partials(g, 5, [7, 300, 0], False)
    w = _w_uv(g, 40, dtype)
    y = kt.mla_tail(o, lse, seq, w, quant=False)
    ref = kt.mla_tail_ref(o, lse, used, w, quant=False)
    assert y.shape == (B, H, 40) and y.dtype == dtype
    assert_finite("y", y)
    if dtype == torch.bfloat16:
        assert mean_rel(y, ref) < TOL["mla_bf16_mean_rel"]
        assert (y.float() - ref.float()).abs().max() <= 4 * 2.0**-7 * ref.float().abs().max()
    else:
        ulp = 2.0**-10 if dtype == torch.float16 else 0.0
        bound = 2 * ulp * ref.float().abs() + 1e-5 * ref.float().abs().max() + (1e-3 * y.float().abs().max() if ulp
                                                                                 else 0)
        assert ((y.float() - ref.float()).abs() <= bound).all()


@pytest.mark.parametrize("runtime", [False, True], ids=["fixed", "runtime"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_tail_matches_the_separate_kernels(seed, runtime, dtype):
    """split + mla_tail against split + reduce + head_gemm + act_quant (the engine's current path), with
    the new token, rows of 1, 70 and 203 cached keys (not block multiples), on the same inputs."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(B + 1, 211, C, generator=g).to(dtype)
    pe = torch.randn(B + 1, 211, R, generator=g).to(dtype)
    q = (torch.randn(B, H, C, generator=g) * 0.3).to(dtype)
    qp = (torch.randn(B, H, R, generator=g) * 0.3).to(dtype)
    kv_new, pe_new = torch.randn(B, C, generator=g).to(dtype), torch.randn(B, R, generator=g).to(dtype)
    seq = torch.tensor([1, 70, 203], dtype=torch.int32)
    w = _w_uv(g, 128, dtype)
    splits = dict(runtime_splits=True) if runtime else dict(num_splits=3)
    q8, s = kt.mla_decode_tail(q, qp, kv, pe, seq, SCALE, w, kv_new=kv_new, pe_new=pe_new, **splits)
    lat = kd.mla_decode(q, qp, kv, pe, seq, SCALE, kv_new=kv_new, pe_new=pe_new, merge="separate", **splits)
    y = ka.head_gemm(lat, w.transpose(1, 2))  # [B, H, 128]
    q_ref, s_ref = fp8_ref.act_quant(y.reshape(B, H * 128))
    _codes_close(q8, s, q_ref, s_ref, 2.0**-7, 0.02, f"{dtype} vs the separate kernels")
    y_tail = kt.mla_decode_tail(q, qp, kv, pe, seq, SCALE, w, kv_new=kv_new, pe_new=pe_new, quant=False, **splits)
    assert mean_rel(y_tail, y) < 2e-3, mean_rel(y_tail, y)


def test_bad_inputs_name_the_problem():
    g = torch.Generator().manual_seed(0)
    o, lse, seq, _ = _partials(g, 5, [7, 300, 0], False)
    with pytest.raises(ValueError, match="DV == 128"):
        kt.mla_tail(o, lse, seq, _w_uv(g, 40, torch.float32))
    with pytest.raises(ValueError, match="w_uv is"):
        kt.mla_tail(o, lse, seq, _w_uv(g, 128, torch.float32)[:2])
    with pytest.raises(ValueError, match="unit stride on C"):
        kt.mla_tail(o, lse, seq, _w_uv(g, 128, torch.float32).transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="lse"):
        kt.mla_tail(o, lse[:, :, :4].contiguous(), seq, _w_uv(g, 128, torch.float32))
    with pytest.raises(TypeError, match="o_part"):
        kt.mla_tail(o.double(), lse, seq, _w_uv(g, 128, torch.float32))
    q = torch.randn(B, H, C)
    with pytest.raises(ValueError, match="mla_decode_tail: num_splits"):
        kt.mla_decode_tail(q, torch.randn(B, H, R), torch.randn(B, 9, C), torch.randn(B, 9, R), seq, SCALE,
                           _w_uv(g, 128, torch.float32), num_splits=2, runtime_splits=True)
