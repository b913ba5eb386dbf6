"""kernels/mla_merge_uv.py (the split merge + W_UV head_gemv in one launch) in the Triton CPU interpreter.

Bits: on the same split partials its output equals mla_decode_reduce + head_gemv (torch.equal): the same
split count, merge arithmetic, latent rounding and product. Math: within tolerance of mla_decode_ref
followed by the W_UV product in fp32: fp32 within 1e-5 x max |ref| (summation order only; measured <= 1e-6
over 3 seeds); bf16 mean relative error < TOL mla_bf16_mean_rel (the interpreter truncates the latent and the
output to bf16 where torch rounds: one bf16 step each; measured 3.0e-3 - 7.4e-3, the B=1 case over 40 seeds).
The split rule at SPLIT_TARGET = 2 x 20 SMs (the runtime_sms fixture of test_mla_attention.py): B=1 -> 32
splits, B=2 -> 20, B=5 -> 8, capped per row at one per 64 keys. The partials a row does not use keep
torch.empty's NaN poison (tests/kernels/conftest.py), so a kernel reading another split count than the
split kernel wrote fails; outputs are poisoned too.
Triton is imported inside the tests (tests/kernels/conftest.py sets TRITON_INTERPRET first).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels._helpers import TOL, assert_finite, mean_rel

SCALE = 0.173
RUNTIME_SMS = 20


@pytest.fixture
def runtime_sms(monkeypatch):
    pytest.importorskip("triton")
    from dsv3_export.kernels import mla_splits

    monkeypatch.setattr(mla_splits, "num_sms", lambda device: RUNTIME_SMS)  # where the split rules read it


def _case(g: torch.Generator, lens: list[int], h: int, c: int, r: int, dv: int, dtype: torch.dtype):
    """q_latent [B, h, c], q_pe [B, h, r], a cache one row and 3 positions larger than needed, the new
    token, cache lengths, and W_UV^T [h, c, dv] as the engine views wkv_b (c contiguous)."""
    bsz = len(lens)
    cache = torch.randn(bsz + 1, max(lens) + 3, c + r, generator=g).to(dtype)
    q, qp = torch.randn(bsz, h, c, generator=g).to(dtype), torch.randn(bsz, h, r, generator=g).to(dtype)
    new = torch.randn(bsz, c + r, generator=g).to(dtype)
    w_uv = (torch.randn(h, dv, c, generator=g) * c**-0.5).to(dtype).transpose(1, 2)  # [h, c, dv]
    return (q, qp, cache[:bsz, :, :c], cache[:bsz, :, c:], torch.tensor(lens, dtype=torch.int32),
            dict(kv_new=new[:, :c], pe_new=new[:, c:]), w_uv)


# (cache lengths per row, heads, c, r, dv, splits): H, C and dv not powers of 2 or block multiples (dv=37: the
# last 8-column block ragged); an empty cache row (the new token only); None: the runtime rule, else host splits
CASES = [
    ([2100], 3, 72, 24, 37, None),  # B=1: 32 splits
    ([1300, 130], 16, 64, 16, 24, None),  # B=2: 20 and 3 (the key cap)
    ([0, 1400], 5, 72, 24, 37, None),  # B=2: 1 (empty cache) and 20
    ([0, 37, 130, 600, 1000], 3, 72, 24, 37, None),  # B=5 (beyond the engine's 2): 8 splits, capped rows
    ([300, 41], 3, 72, 24, 37, 7),  # host-chosen splits (SPLIT_TARGET 0)
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("lens, h, c, r, dv, splits", CASES, ids=lambda v: str(v) if isinstance(v, list) else None)
def test_equals_reduce_then_head_gemv(seed, runtime_sms, dtype, lens, h, c, r, dv, splits):
    from dsv3_export.kernels import mla_absorb as ka
    from dsv3_export.kernels import mla_decode as kd
    from dsv3_export.kernels.mla_attention import mla_decode_ref
    from dsv3_export.kernels.mla_merge_uv import mla_merge_uv

    g = torch.Generator().manual_seed(seed)
    q, qp, kv, pe, seqlens, new, w_uv = _case(g, lens, h, c, r, dv, dtype)
    rule = dict(runtime_splits=True) if splits is None else dict(num_splits=splits)
    parts = kd.mla_decode_partials(q, qp, kv, pe, seqlens, SCALE, **new, **rule)
    want_splits = ([kd.runtime_num_splits(len(lens), h, n, kv.device) for n in lens] if splits is None
                   else [splits] * len(lens))
    assert (~parts.lse.isnan()).sum(-1).tolist() == [[s] * h for s in want_splits]  # the rest stays NaN
    got = mla_merge_uv(parts, w_uv)
    assert got.shape == (len(lens), h, dv) and got.dtype == dtype
    assert_finite("mla_merge_uv", got)
    unfused = ka.head_gemv(kd.mla_decode_reduce(parts, dtype), w_uv)
    assert torch.equal(got, unfused), (got - unfused).abs().max()
    ref = torch.einsum("bhc,hcn->bhn", mla_decode_ref(q, qp, kv, pe, seqlens, SCALE, **new).float(), w_uv.float())
    if dtype == torch.float32:
        err = (got - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item(), f"max abs err {err:.2e}"
    else:
        assert mean_rel(got, ref) < TOL["mla_bf16_mean_rel"], mean_rel(got, ref)


def test_out_argument_and_bad_inputs(seed, runtime_sms):
    """A NaN-filled, non-contiguous `out`; a weight with N contiguous (W_UK's layout) or the wrong heads."""
    from dsv3_export.kernels import mla_absorb as ka
    from dsv3_export.kernels import mla_decode as kd
    from dsv3_export.kernels.mla_merge_uv import mla_merge_uv

    g = torch.Generator().manual_seed(seed)
    q, qp, kv, pe, seqlens, new, w_uv = _case(g, [90, 5], 3, 40, 8, 13, torch.bfloat16)
    parts = kd.mla_decode_partials(q, qp, kv, pe, seqlens, SCALE, **new, runtime_splits=True)
    out = torch.full((3, 2, 13), float("nan"), dtype=torch.bfloat16).transpose(0, 1)  # [B, h, dv]
    assert mla_merge_uv(parts, w_uv, out=out) is out
    assert torch.equal(out, ka.head_gemv(kd.mla_decode_reduce(parts, torch.bfloat16), w_uv))
    with pytest.raises(ValueError, match="mla_merge_uv: w .* with C contiguous"):
        mla_merge_uv(parts, w_uv.contiguous())
    with pytest.raises(ValueError, match=r"mla_merge_uv: w \(2, 40, 13\)"):
        mla_merge_uv(parts, w_uv[:2])
    with pytest.raises(TypeError, match="mla_merge_uv: out: dtype"):
        mla_merge_uv(parts, w_uv, out=torch.empty(2, 3, 13))


def test_unclamped_int64_lengths_merge_as_the_clamped(seed, runtime_sms):
    """The engine's default path at batch <= 2 passes the step's start_pos as it is (int64): the split and merge
    kernels clamp it to the cache's rows; the same bits as the clamped int32 lengths. 2000 past a cache of 103
    rows would take 20 splits unclamped, 2 clamped; -5 takes one split either way."""
    from dsv3_export.kernels import mla_decode as kd
    from dsv3_export.kernels.mla_merge_uv import mla_merge_uv

    g = torch.Generator().manual_seed(seed)
    q, qp, kv, pe, _, new, w_uv = _case(g, [100, 100], 3, 72, 24, 37, torch.float32)
    start_pos = torch.tensor([2000, -5], dtype=torch.int64)
    seen = start_pos.clamp(0, kv.shape[1]).to(torch.int32)
    got = mla_merge_uv(kd.mla_decode_partials(q, qp, kv, pe, start_pos, SCALE, **new, runtime_splits=True), w_uv)
    want = mla_merge_uv(kd.mla_decode_partials(q, qp, kv, pe, seen, SCALE, **new, runtime_splits=True), w_uv)
    assert_finite("mla_merge_uv int64 start_pos", got)
    assert torch.equal(got, want)
