"""topk (router top-k over short rows) vs torch.topk: exact values and indices, every config.

Exact, not a tolerance: the kernel only compares and copies. Indices are compared with topk_ref
(torch's stable descending sort: the kernel's lower-index-first order among ties) and, where the
row has no ties, with torch.topk itself.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import topk as K  # noqa: E402


# 2048 values exact in bf16, fp16 and fp32, all distinct: +-2^e (1 + m/128), e in 0..7, m in 0..127
_DISTINCT = torch.cat([s * 2.0 ** (i // 128) * (1 + (i % 128) / 128) for s in (1, -1) for i in [torch.arange(1024)]])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("config", K.TOPK_CONFIGS, ids=str)
@pytest.mark.parametrize("rows, n, k", [(1, 64, 6), (37, 64, 8), (5, 66, 8), (3, 200, 5), (2, 7, 7), (9, 1000, 32)])
@pytest.mark.parametrize("dtype", K.DTYPES)
def test_topk_matches_torch(seed, config, rows, n, k, dtype):
    """Rows of distinct random values (no ties): the same values and indices as torch.topk."""
    torch.manual_seed(seed)
    x = torch.stack([_DISTINCT[torch.randperm(_DISTINCT.numel())[:n]] for _ in range(rows)]).to(dtype)
    values, indices = K.topk(x, k, config=config)
    want_v, want_i = torch.topk(x, k, dim=-1)
    assert values.dtype == dtype and indices.dtype == torch.int64 and values.shape == (rows, k)
    assert torch.equal(indices, want_i)
    assert torch.equal(_bits(values), _bits(want_v))


@pytest.mark.parametrize("config", K.TOPK_CONFIGS, ids=str)
def test_ties_nan_and_infinities(config):
    """Ties: the lower index first; NaN ranks above +inf (torch's CUDA order); -inf rows still give k."""
    x = torch.randn(6, 20)
    x[0] = 0.25  # all equal
    x[1, 3], x[1, 4], x[1, 5] = float("inf"), float("nan"), float("inf")
    x[2] = float("-inf")
    x[3, ::2] = 7.0  # ten-way tie for the top
    x[4, 19] = float("nan")
    values, indices = K.topk(x, 6, config=config)
    want_v, want_i = K.topk_ref(x, 6)
    assert torch.equal(indices, want_i)
    assert torch.equal(values.isnan(), want_v.isnan()) and torch.equal(values.nan_to_num(), want_v.nan_to_num())
    assert indices[0].tolist() == [0, 1, 2, 3, 4, 5] and indices[2].tolist() == [0, 1, 2, 3, 4, 5]
    assert indices[1, :3].tolist() == [4, 3, 5] and indices[4, 0].item() == 19
    assert indices[3].tolist() == [0, 2, 4, 6, 8, 10]
    # as a set, the same as torch.topk's selection
    for r in range(6):
        torch_v = torch.topk(x[r], 6).values
        assert torch.equal(torch_v.nan_to_num().sort().values, values[r].nan_to_num().sort().values)


def test_strided_rows_and_empty():
    x = torch.randn(4, 130)[:, :64]  # row stride 130
    values, indices = K.topk(x, 6)
    assert torch.equal(indices, torch.topk(x, 6).indices)
    values, indices = K.topk(torch.randn(0, 64), 6)
    assert values.shape == (0, 6) and indices.shape == (0, 6)


@pytest.mark.parametrize("x, k, match", [
    (torch.randn(3, 2000), 4, "do not fit"),
    (torch.randn(3, 10), 11, "k=11"),
    (torch.randn(3, 64), 33, "k=33"),
    (torch.randn(3, 64), 0, "k=0"),
    (torch.randn(3, 64).T, 2, "unit stride"),
    (torch.randn(64), 2, "2 dims"),
    (torch.randint(0, 9, (3, 64)), 2, "dtype"),
])
def test_bad_inputs_name_the_problem(x, k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        K.topk(x, k)


# --- router_topk: softmax + top-k + weights + the shared experts' columns -----------------------------
@pytest.mark.parametrize("config", K.TOPK_CONFIGS, ids=str)
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


def test_arrival_counters_fresh_while_tracing_and_kept_when_grown():
    """Traced (torch.export / AOTInductor: a functional op) the counters are the op's own zeros, not the
    eager cache; growing the cache keeps the old buffer alive (a captured graph may point at it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsv3_export.kernels import _common

    dev = torch.device("cpu")
    before = dict(_common._arrival_buffers)
    with FakeTensorMode():
        cnt = _common.arrival_counters(7, dev)
    assert type(cnt).__name__ == "FakeTensor" and cnt.shape == (7,) and cnt.dtype == torch.int32
    assert _common._arrival_buffers == before
    small = _common.arrival_counters(3, dev)
    n = _common._arrival_buffers[dev].numel() + 5  # past the cache as it is (other tests share it)
    grown = _common.arrival_counters(n, dev)
    assert grown.shape == (n,) and (grown == 0).all()
    assert any(b.data_ptr() == small.data_ptr() for b in _common._retired_buffers)
