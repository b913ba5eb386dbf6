"""router_topk (the softmax MoE router in one kernel) vs the reference Gate's math, every config.

Ids exactly: the kernel ranks the fp32 softmax by comparing and copying. They are compared with
router_topk_ref (topk_ref: torch's stable descending sort, the kernel's lower-index-first order
among ties) and, where the row has no ties, with torch.topk itself.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import topk as K  # noqa: E402


# 2048 values exact in bf16, fp16 and fp32, all distinct: +-2^e (1 + m/128), e in 0..7, m in 0..127
_DISTINCT = torch.cat([s * 2.0 ** (i // 128) * (1 + (i % 128) / 128) for s in (1, -1) for i in [torch.arange(1024)]])


@pytest.mark.parametrize("config", K.ROUTER_CONFIGS, ids=str)
@pytest.mark.parametrize("rows, n, k, n_extra", [(1, 64, 6, 2), (37, 64, 6, 2), (5, 8, 3, 2), (3, 100, 8, 0)])
@pytest.mark.parametrize("dtype", K.DTYPES)
def test_router_topk_matches_the_gate(seed, config, rows, n, k, n_extra, dtype):
    """Ids exactly the reference Gate's (softmax in fp32, top-k); weights within one output rounding
    (the interpreter truncates to bf16, the kernel's exp may differ from torch's by an ulp); the
    extra columns exactly (ids n.., weight 1)."""
    torch.manual_seed(seed)
    logits = (torch.stack([_DISTINCT[torch.randperm(_DISTINCT.numel())[:n]] for _ in range(rows)]) / 64).to(dtype)
    weights, ids = K.router_topk(logits, k, scale=2.5, n_extra=n_extra, first_extra=n, out_dtype=dtype, config=config)
    want_w, want_ids = K.router_topk_ref(logits, k, scale=2.5, n_extra=n_extra, first_extra=n, out_dtype=dtype)
    assert weights.shape == ids.shape == (rows, k + n_extra) and weights.dtype == dtype and ids.dtype == torch.int64
    assert torch.equal(ids, want_ids)
    ulp = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert ((weights.float() - want_w.float()).abs() <= ulp * want_w.float().abs() * 2 + 1e-30).all()
    assert (weights[:, k:] == 1).all()
    assert torch.equal(ids[:, :k], torch.topk(logits.float(), k).indices)  # softmax keeps the logits' order


@pytest.mark.parametrize("config", K.ROUTER_CONFIGS, ids=str)
def test_router_topk_ties_take_the_lower_index(config):
    """Equal logits give equal scores: the lower index first, as topk_ref orders them."""
    logits = torch.randn(4, 20)
    logits[0] = 0.25  # all equal
    logits[1, ::2] = 7.0  # ten-way tie for the top
    logits[2, 3], logits[2, 4] = 9.0, 9.0
    weights, ids = K.router_topk(logits, 6, config=config)
    want_w, want_ids = K.router_topk_ref(logits, 6)
    assert torch.equal(ids, want_ids)
    assert ids[0].tolist() == [0, 1, 2, 3, 4, 5] and ids[1].tolist() == [0, 2, 4, 6, 8, 10]
    assert ids[2, :2].tolist() == [3, 4]
    torch.testing.assert_close(weights, want_w, rtol=2e-6, atol=0)  # the kernel's exp against torch's


def test_router_topk_strided_rows_and_empty():
    logits = torch.randn(4, 130)[:, :64]  # row stride 130
    _, ids = K.router_topk(logits, 6)
    assert torch.equal(ids, torch.topk(logits, 6).indices)
    weights, ids = K.router_topk(torch.randn(0, 64), 6, n_extra=2)
    assert weights.shape == (0, 8) and ids.shape == (0, 8)


@pytest.mark.parametrize("logits, k, n_extra, match", [
    (torch.randn(3, 2000), 4, 0, "do not fit"),
    (torch.randn(3, 10), 11, 0, "k=11"),
    (torch.randn(3, 64), 33, 0, "k=33"),
    (torch.randn(3, 64), 0, 0, "k=0"),
    (torch.randn(3, 64).T, 2, 0, "unit stride"),
    (torch.randn(64), 2, 0, "2 dims"),
    (torch.randint(0, 9, (3, 64)), 2, 0, "dtype"),
    (torch.randn(3, 64), 2, -1, "n_extra=-1"),
])
def test_router_topk_bad_inputs_name_the_problem(logits, k, n_extra, match):
    with pytest.raises((ValueError, TypeError), match=match):
        K.router_topk(logits, k, n_extra=n_extra)


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int64])
def test_router_topk_integer_out_dtype_is_refused(out_dtype):
    """An integer out_dtype was accepted and the weights (probabilities < 1) came back as zeros."""
    with pytest.raises(TypeError, match="router_topk: out_dtype"):
        K.router_topk(torch.randn(3, 64), 6, out_dtype=out_dtype)
