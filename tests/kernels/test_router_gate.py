"""kernels/router_gate.py: the gate GEMM split over K into fp32 partials, and the router kernel summing them.

Partials: against torch's fp32 product of the same K slices (the interpreter's dot sums in its own
order: 1e-5 relative). The router from partials: exactly router_topk_ref of gate_logits_ref (the
partials summed in split order, rounded to bf16 with ties to even), ids and weights, since both
sides then start from the same logits. The whole form against router_topk_ref(F.linear(x, w)):
ids equal on the rows whose k-th and (k+1)-th logits are more than two bf16 steps apart (elsewhere
the summation order may decide), weights within one output rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv3_export.kernels import router_gate as G  # noqa: E402
from dsv3_export.kernels.fp8_quant import act_quant  # noqa: E402
from dsv3_export.kernels import topk as K  # noqa: E402
from dsv3_export.kernels.topk import _round_bf16  # noqa: E402


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """gate_partials' outputs NaN-filled before the kernel runs (partials, and act_quant's q and s): an entry the
    kernel fails to write stays NaN."""
    real_partials, real_quant = G.partials_buffer, G.act_quant_outputs

    def partials(*args):
        return real_partials(*args).fill_(float("nan"))

    def quant(*args):
        q, s = real_quant(*args)
        return q.view(torch.uint8).fill_(0x7F).view(q.dtype), s.fill_(float("nan"))  # 0x7F: e4m3 NaN

    monkeypatch.setattr(G, "partials_buffer", partials)
    monkeypatch.setattr(G, "act_quant_outputs", quant)


@pytest.mark.parametrize("config", G.GATE_CONFIGS, ids=str)
@pytest.mark.parametrize("t, e, k", [(1, 64, 2048), (3, 64, 300), (19, 40, 200), (2, 8, 128)])
@pytest.mark.parametrize("dtype", G.DTYPES)
def test_gate_partials_are_the_split_products(seed, poisoned_outputs, config, t, e, k, dtype):
    torch.manual_seed(seed)
    x, w = torch.randn(t, k).to(dtype), (torch.randn(e, k) / k**0.5).to(dtype)
    got = G.gate_partials(x, w, config=config)
    splits = G.num_splits(k)
    assert got.shape == (splits, t, e) and got.dtype == torch.float32
    want = torch.stack([x[:, s * G.SPLIT_K:(s + 1) * G.SPLIT_K].double() @ w[:, s * G.SPLIT_K:(s + 1) * G.SPLIT_K].double().T
                        for s in range(splits)])
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [c for c in G.GATE_CONFIGS if c.num_warps == 4], ids=str)
@pytest.mark.parametrize("row_quant_max_rows", [0, G.ROW_QUANT_MAX_ROWS, 16])
@pytest.mark.parametrize("t, k", [(1, 2048), (4, 300), (5, 128), (17, 200), (33, 200)])
def test_gate_quant_x_is_act_quant(seed, poisoned_outputs, config, row_quant_max_rows, t, k):
    """quant_x: q and s bit for bit act_quant(x)'s (an all-zero block too), the whole tile at once or a real row
    at a time (row_quant_max_rows: 0 every block a tile; 4: blocks of 1 and 4 real rows one by one, of 5 and full
    ones as a tile; 16 every block one by one), the partials unchanged. 100 experts: two expert blocks at
    BLOCK_E 64, of which only the first quantizes."""
    torch.manual_seed(seed)
    x, w = torch.randn(t, k).bfloat16(), torch.randn(100, k).bfloat16()
    x[0, :128] = 0
    partials, (q, s) = G.gate_partials(x, w, quant_x=True, row_quant_max_rows=row_quant_max_rows, config=config)
    want_q, want_s = act_quant(x)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    assert torch.equal(partials, G.gate_partials(x, w, config=config))


@triton.jit
def _round_probe(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _round_bf16(tl.load(x_ptr + offs, mask=offs < N)), mask=offs < N)


def test_round_bf16_matches_torch(seed):
    """The router's integer rounding against torch's cast: random bit patterns, ties, subnormals, the
    largest finite values, inf and NaN."""
    torch.manual_seed(seed)
    bits = torch.randint(-2**31, 2**31 - 1, (4096,), dtype=torch.int64).to(torch.int32)
    ties = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.3895e38, -3.3895e38, 3.4e38, 0.0, -0.0,
                         float("inf"), -float("inf"), 1e-40, -1e-40, float("nan")])
    x = torch.cat([bits.view(torch.float32), ties])
    y = torch.full_like(x, 7.0)
    _round_probe[(triton.cdiv(x.numel(), 512),)](x, y, x.numel(), BLOCK=512)
    want = x.to(torch.bfloat16).float()
    finite = ~x.isnan()
    assert torch.equal(y[finite].view(torch.int32), want[finite].view(torch.int32))
    assert y[~finite].isnan().all()


@pytest.mark.parametrize("config", K.ROUTER_CONFIGS, ids=str)
@pytest.mark.parametrize("splits, rows, n, k, n_extra", [(16, 1, 64, 6, 2), (3, 37, 64, 6, 2), (5, 5, 40, 3, 0)])
@pytest.mark.parametrize("round_bf16", [True, False])
def test_router_from_partials_equals_router_of_their_sum(seed, config, splits, rows, n, k, n_extra, round_bf16):
    torch.manual_seed(seed)
    partials = torch.randn(splits, rows, n) * 2
    partials[:, 0, 5] = float("nan") if rows > 30 else partials[:, 0, 5]  # NaN ranks first, as torch's topk on CUDA
    dtype = torch.bfloat16 if round_bf16 else torch.float32
    weights, ids = torch.full((rows, k + n_extra), -1.0), torch.full((rows, k + n_extra), -7, dtype=torch.int64)
    K.launch(*K.router_spec(partials, k, 2.5, n_extra, n, weights, ids, round_bf16=round_bf16), config)
    logits = G.gate_logits_ref(partials, dtype)
    want_w, want_ids = K.router_topk_ref(logits, k, scale=2.5, n_extra=n_extra, first_extra=n)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=2e-6, atol=0, equal_nan=True)  # the kernel's exp vs torch's


@pytest.mark.parametrize("t", [1, 2, 33])
def test_gate_router_topk_matches_the_linear_gate(seed, t):
    torch.manual_seed(seed)
    e, k, dim = 64, 6, 700
    x, w = torch.randn(t, dim).bfloat16(), (torch.randn(e, dim) / dim**0.5).bfloat16()
    weights, ids = G.gate_router_topk(x, w, k, scale=2.5, n_extra=2, first_extra=e, out_dtype=torch.bfloat16)
    logits = F.linear(x.float(), w.float())  # fp32 sums: the two forms differ from this in rounding only
    want_w, want_ids = K.router_topk_ref(logits.bfloat16(), k, scale=2.5, n_extra=2, first_extra=e,
                                         out_dtype=torch.bfloat16)
    ranked = logits.sort(dim=1, descending=True).values
    clear = (ranked[:, k - 1] - ranked[:, k]) > 4 * 2.0**-8 * ranked[:, k - 1].abs()  # rows the order cannot flip
    assert t < 33 or clear.sum() > t // 2
    assert torch.equal(ids[clear], want_ids[clear])
    assert torch.equal(ids[:, k:], want_ids[:, k:])
    torch.testing.assert_close(weights[clear].float(), want_w[clear].float(), rtol=2 * 2.0**-7, atol=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="gate_partials: w"):
        G.gate_partials(torch.randn(2, 64), torch.randn(8, 64).bfloat16())
    with pytest.raises(ValueError, match="K=32"):
        G.gate_partials(torch.randn(2, 64), torch.randn(8, 32))
    with pytest.raises(ValueError, match="k=9"):
        G.gate_router_topk(torch.randn(2, 64), torch.randn(8, 64), 9)


def test_negative_n_extra_is_refused():
    """n_extra < 0 allocated k + n_extra output columns while the router stored all k: it wrote past the outputs
    (heap corruption under the interpreter) and returned k - 1 columns."""
    with pytest.raises(ValueError, match="gate_router_topk: n_extra=-1"):
        G.gate_router_topk(torch.randn(2, 64), torch.randn(8, 64), 2, n_extra=-1)


def test_integer_out_dtype_is_refused():
    """An integer out_dtype gave all-zero routing weights."""
    with pytest.raises(TypeError, match="gate_router_topk: out_dtype"):
        G.gate_router_topk(torch.randn(2, 64), torch.randn(8, 64), 2, out_dtype=torch.int32)


def test_empty_k_routes_zero_logits():
    """K = 0 made no partials ([0, T, E]) and the router kernel, which always loads a first split, read past
    them (a segfault under the interpreter); the logits of an empty product are zeros."""
    from dsv3_export.kernels import topk

    x, w = torch.randn(2, 0), torch.randn(8, 0)
    weights, ids = G.gate_router_topk(x, w, 2)
    ref_w, ref_ids = topk.router_topk_ref(torch.zeros(2, 8), 2)
    assert torch.equal(weights, ref_w) and torch.equal(ids, ref_ids)
