"""kernels/mla_query.py head_gemm_rope in the Triton CPU interpreter: its GEMM is head_gemm's bit for bit (the same
tile function and config), its q_pe torch's apply_rotary_emb at each row's position bit for bit (the split kernel's
in-kernel RoPE gives the same bits: tests/kernels/test_mla_attention.py). Outputs are NaN-poisoned
(tests/kernels/conftest.py), so an unwritten element fails the comparisons."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.parametrize("rows", [3, 19], ids=["one-row-tile", "two-row-tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gemm_is_head_gemms_and_q_pe_is_torchs_rope(seed, dtype, rows):
    from dsv3_export.kernels import mla_absorb as ka
    from dsv3_export.kernels import mla_query as kq
    from dsv3_export.reference.layers import apply_rotary_emb

    g = torch.Generator().manual_seed(seed)
    h, k, n, r, table_rows = 5, 40, 70, 12, 11  # K, N and R not multiples of the blocks
    x = torch.randn(rows, h, k + 9, generator=g).to(dtype)[:, :, 5:5 + k]  # q_nope: a strided slice
    w = (torch.randn(h, k, n, generator=g) * k**-0.5).to(dtype)
    raw = torch.randn(rows, h, 7 + r, generator=g).to(dtype)[..., 7:]  # q_pe before RoPE, strided
    angles = torch.rand(table_rows, r // 2, generator=g) * 6.3
    cos_t, sin_t = angles.cos(), angles.sin()
    pos = torch.randint(0, table_rows + 5, (rows,), generator=g)  # some past the tables: clamped to the last row
    at = pos.clamp(max=table_rows - 1)
    want_pe = apply_rotary_emb(raw[:, None], cos_t[at][:, None], sin_t[at][:, None])[:, 0]  # [rows, h, r]
    for cfg in kq.HEAD_GEMM_ROPE_CONFIGS[:2]:
        out, q_pe = kq.head_gemm_rope(x, w, raw, cos_t, sin_t, pos, config=cfg)
        assert torch.equal(out, ka.head_gemm(x, w, config=cfg)), cfg
        assert q_pe.dtype == dtype and torch.equal(q_pe, want_pe), (cfg, (q_pe.float() - want_pe.float()).abs().max())


def test_bad_inputs_are_named():
    from dsv3_export.kernels import mla_query as kq

    x, w = torch.randn(2, 3, 8), torch.randn(3, 8, 5)
    cos_t = sin_t = torch.randn(4, 3)
    pos = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"q_pe \(2, 3, 5\).*R even"):
        kq.head_gemm_rope(x, w, torch.randn(2, 3, 5), cos_t[:, :2], sin_t[:, :2], pos)
    with pytest.raises(ValueError, match=r"head_gemm_rope: q_rope sin \(4, 2\) must be \[P, R/2=3\]"):
        kq.head_gemm_rope(x, w, torch.randn(2, 3, 6), cos_t, sin_t[:, :2], pos)
    with pytest.raises(ValueError, match=r"head_gemm_rope: q_rope positions has 3 entries for batch 2"):
        kq.head_gemm_rope(x, w, torch.randn(2, 3, 6), cos_t, sin_t, torch.tensor([0, 1, 2]))
