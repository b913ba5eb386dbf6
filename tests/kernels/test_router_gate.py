"""router_topk_gate and router_topk_gate_split (kernels/router_gate.py): the gate GEMM fused in front of
the router, against F.linear + router_topk_ref, every config (tie rule below)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import router_gate as K  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


# --- router_topk_gate: the gate GEMM (x @ W^T, rounded to x's dtype) + router_topk in one launch ---------
# The kernel's logits are the reference's (F.linear in x's dtype) up to the summation order, then one
# rounding to x's dtype (the interpreter truncates where the GPU rounds to nearest): at most one
# step of x's dtype apart, plus the fp32 summation-order error. The tie rule: the ids may differ from
# the reference's only in a row whose sorted top-(k+1) reference logits hold two within that bound of
# each other; every id picked at position j has a reference logit within the bound of the
# reference's j-th largest. Data: logits ~ N(-1.5, 1) (a constant column of x against a gate column
# of -1.5), so the top-k logits are small numbers, whose rounding step is far below their gaps:
# the rule then excuses ~1% of rows (bf16; asserted < 5%), and the ids are otherwise exactly equal.
_STEP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # relative rounding bound


def _gate_inputs(rows, d, e, dtype):
    x = torch.randn(rows, d)
    x[:, 0] = 1.0
    w = torch.randn(e, d) / d**0.5
    w[:, 0] = -1.5
    return x.to(dtype), w.to(dtype)


def _check_gate(x, w, k, n_extra, dtype, got, want) -> int:
    """Assert the tie rule and the weights' bound; return the number of rows the rule excused."""
    logits = torch.nn.functional.linear(x, w).float()  # [R, E] the reference's logits
    bound = (_STEP[dtype] * logits.abs() + 1e-6 * (x.float().abs() @ w.float().abs().T))  # [R, E]
    want_ids, got_ids = want[1][:, :k], got[1][:, :k]
    ranked = torch.sort(logits, dim=1, descending=True, stable=True)
    top, top_bound = ranked.values[:, :k + 1], bound.gather(1, ranked.indices[:, :k + 1])
    assert torch.equal(logits.gather(1, want_ids), top[:, :k])  # softmax keeps the logits' order
    picked = logits.gather(1, got_ids)
    assert ((picked - top[:, :k]).abs() <= 2 * top_bound[:, :k]).all()
    differ = (got_ids != want_ids).any(1)
    near_tie = ((top[:, :-1] - top[:, 1:]) <= top_bound[:, :-1] + top_bound[:, 1:]).any(1)
    assert not (differ & ~near_tie).any(), f"rows {differ.nonzero().flatten().tolist()} differ without a near tie"
    # weights: one output rounding (x2) and the softmax of logits moved by <= the row's largest bound (x2)
    out_step = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    rel = 2 * out_step + 2 * bound.max(1, keepdim=True).values
    assert ((got[0][:, :k].float() - want[0][:, :k].float()).abs() <= rel * want[0][:, :k].float().abs() + 1e-30).all()
    assert (got[0][:, k:] == 1).all() and torch.equal(got[1][:, k:], want[1][:, k:])
    assert not got[0].isnan().any()
    return int(differ.sum())


_ONE, _SPLIT = K.router_topk_gate, K.router_topk_gate_split
_RANDOM_CASES = [(_ONE, 1, 200, 8, 3, 0), (_ONE, 5, 200, 64, 6, 0), (_ONE, 37, 200, 66, 6, 2), (_ONE, 1, 2048, 64, 6, 2),
                 (_SPLIT, 1, 200, 8, 3, 0), (_SPLIT, 19, 200, 66, 6, 2), (_SPLIT, 1, 2048, 64, 6, 2)]


@pytest.mark.parametrize("gate, rows, d, e, k, n_extra", _RANDOM_CASES, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gate_matches_linear_then_router(seed, gate, rows, d, e, k, n_extra, dtype):
    """Random logits: the tie rule (the split form's summation order is its own)."""
    torch.manual_seed(seed)
    x, w = _gate_inputs(rows, d, e, dtype)
    route = dict(scale=2.5, n_extra=n_extra, first_extra=e, out_dtype=dtype)
    got, want = gate(x, w, k, **route), K.router_topk_gate_ref(x, w, k, **route)
    assert got[0].shape == got[1].shape == (rows, k + n_extra) and got[0].dtype == dtype and got[1].dtype == torch.int64
    excused = _check_gate(x, w, k, n_extra, dtype, got, want)
    assert excused <= max(1, rows // 8), f"{excused} of {rows} rows excused by the tie rule"


def test_router_topk_gate_tie_rule_is_rare(seed):
    """bf16, 512 rows at the 16b's E=64, k=6: measured ~1% of rows excused (30 seeds), bound 5%."""
    torch.manual_seed(seed)
    x, w = _gate_inputs(512, 200, 64, torch.bfloat16)
    route = dict(n_extra=2, first_extra=64, out_dtype=torch.bfloat16)
    got = K.router_topk_gate(x, w, 6, config=K.GATE_CONFIGS[-1], **route)
    excused = _check_gate(x, w, 6, 2, torch.bfloat16, got, K.router_topk_gate_ref(x, w, 6, **route))
    assert excused <= 512 * 0.05, f"{excused} of 512 rows excused by the tie rule"


@pytest.mark.parametrize("config", K.GATE_CONFIGS, ids=str)
def test_router_topk_gate_every_config(seed, config):
    """Both paths: multiply-and-sum (BLOCK_ROWS < 16) and tl.dot; 37 rows, D=200: no block multiple.
    At ~1% of rows excused, <= 4 of 37 (a chance of more: ~4e-5 per run)."""
    torch.manual_seed(seed)
    x, w = _gate_inputs(37, 200, 66, torch.bfloat16)
    route = dict(scale=1.0, n_extra=2, first_extra=66, out_dtype=torch.bfloat16)
    got = K.router_topk_gate(x, w, 6, config=config, **route)
    assert _check_gate(x, w, 6, 2, torch.bfloat16, got, K.router_topk_gate_ref(x, w, 6, **route)) <= 4


def _bf16_tie() -> tuple[torch.Tensor, torch.Tensor]:
    """x [3, 40], w [16, 40] bf16: expert 1's fp32 logit is 1 + 2^-9, expert 0's 1 (equal in bf16), the rest -1."""
    x = torch.zeros(3, 40, dtype=torch.bfloat16)
    x[:, :2] = 1.0
    w = torch.full((16, 40), -0.5, dtype=torch.bfloat16)
    w[0, 0], w[1, 0], w[1, 1] = 1.0, 1.0, 2.0**-9
    w[0, 1] = 0.0
    return x, w


@pytest.mark.parametrize("config", [K.GATE_CONFIGS[0], K.GATE_CONFIGS[-1]], ids=str)
def test_router_topk_gate_rounds_the_logits_to_x_dtype(config):
    """Expert 1's fp32 logit is 1 + 2^-9, expert 0's 1: in bf16 both are 1.0 (a tie: the lower index
    first). A kernel that ranked the fp32 sums would put expert 1 first."""
    x, w = _bf16_tie()
    _, ids = K.router_topk_gate(x, w, 2, out_dtype=torch.float32, config=config)
    assert ids.tolist() == [[0, 1]] * 3
    _, ids32 = K.router_topk_gate(x.float(), w.float(), 2, out_dtype=torch.float32, config=config)
    assert ids32.tolist() == [[1, 0]] * 3  # in fp32 the sums differ


@pytest.mark.parametrize("gate", [K.router_topk_gate, K.router_topk_gate_split], ids=lambda f: f.__name__)
def test_strided_and_empty(gate):
    x = torch.randn(4, 300)[:, :200]  # row stride 300
    w = torch.randn(8, 256)[:, :200]
    got, want = gate(x, w, 3), K.router_topk_gate_ref(x, w, 3)
    assert _check_gate(x, w, 3, 0, torch.float32, got, want) == 0
    weights, ids = gate(torch.randn(0, 200), w, 3, n_extra=2)
    assert weights.shape == ids.shape == (0, 5)


@pytest.mark.parametrize("x, w, k, match", [
    (torch.randn(3, 64), torch.randn(8, 32), 2, r"weight \(8, 32\) is not \[E, D\]"),
    (torch.randn(3, 64), torch.randn(8, 64, dtype=torch.bfloat16), 2, "weight: dtype"),
    (torch.randn(3, 64), torch.randn(2000, 64), 2, "weight rows .* do not fit"),
    (torch.randn(3, 64), torch.randn(8, 64), 9, "k=9"),
    (torch.randn(64, 3).T, torch.randn(8, 64), 2, "x needs unit stride"),
    (torch.randn(3, 64), torch.randn(64, 8).T, 2, "weight needs unit stride"),
    (torch.randn(64), torch.randn(8, 64), 2, "x: expected 2 dims"),
    (torch.randint(0, 9, (3, 64)), torch.randn(8, 64), 2, "x: dtype"),
])
def test_router_topk_gate_bad_inputs_name_the_tensor(x, w, k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        K.router_topk_gate(x, w, k)


# --- router_topk_gate_split: the experts split over programs, the last program of a row block routes ---
# In the interpreter the programs run one after another, so the arrival counter's logic (count, the
# last program routes, the reset) is exercised here, but not its memory ordering (bar.sync + the
# acq_rel atomic, the .cg reads of the other programs' logits): that is checked on the GPU, by the
# benchmark's exact-id rows (benchmarks/kernels.py topk, CUDA graphs: hundreds of replays on one
# counter buffer). torch.empty is NaN-poisoned here (conftest): the scratch logits and the outputs.
def _exact_gate_inputs(rows, d, e, dtype):
    """x with 8 entries of +-1 per row, gate entries k/16 in [-1, 1]: every logit is a multiple of 1/16
    below 8 in magnitude, exact in bf16 / fp16 / fp32 whatever the summation order, so the kernels'
    ids and weights must equal the reference's exactly (ties included: the logit grid has many)."""
    x = torch.zeros(rows, d)
    for r in range(rows):
        x[r, torch.randperm(d)[:8]] = torch.randint(0, 2, (8,)).float() * 2 - 1
    w = torch.randint(-16, 17, (e, d)).float() / 16
    return x.to(dtype), w.to(dtype)


def _counters_clean() -> None:
    from dsv3_export.kernels import _common

    for dev, buf in _common._arrival_buffers.items():
        assert (buf == 0).all(), f"arrival counters on {dev} not reset: {buf[buf != 0][:8].tolist()}"


@pytest.mark.parametrize("config, dtype", [(c, torch.bfloat16) for c in K.GATE_SPLIT_CONFIGS] + [
    (K.GATE_SPLIT_CONFIGS[0], torch.float32), (K.GATE_SPLIT_CONFIGS[-1], torch.float16)], ids=str)
def test_router_topk_gate_split_every_config_exact(seed, config, dtype):
    """11 rows (no row-block multiple), D=200 (no BLOCK_K multiple), E=66 (no BLOCK_E multiple):
    ids equal to the reference's and to router_topk_gate's, weights bit-equal to router_topk_gate's
    (the same _route on the same logits) and within one output rounding of the reference's."""
    torch.manual_seed(seed)
    x, w = _exact_gate_inputs(11, 200, 66, dtype)
    route = dict(scale=2.5, n_extra=2, first_extra=66, out_dtype=dtype)
    got = K.router_topk_gate_split(x, w, 6, config=config, **route)
    one = K.router_topk_gate(x, w, 6, **route)
    want = K.router_topk_gate_ref(x, w, 6, **route)
    assert got[0].shape == got[1].shape == (11, 8) and got[0].dtype == dtype and got[1].dtype == torch.int64
    assert torch.equal(got[1], want[1]) and torch.equal(got[1], one[1])
    assert torch.equal(_bits(got[0]), _bits(one[0]))
    ulp = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert ((got[0].float() - want[0].float()).abs() <= 2 * ulp * want[0].float().abs()).all()
    _counters_clean()


    _counters_clean()


@pytest.mark.parametrize("config", [K.GATE_SPLIT_CONFIGS[0], K.GATE_SPLIT_CONFIGS[-1]], ids=str)
def test_router_topk_gate_split_rounds_the_logits_and_breaks_ties_low(config):
    """As router_topk_gate: experts 0 and 1 tie in bf16 (1 + 2^-9 rounds to 1) and the lower index comes
    first, in fp32 they do not; a row of equal logits gives experts 0..k-1 in order."""
    x, w = _bf16_tie()
    _, ids = K.router_topk_gate_split(x, w, 2, out_dtype=torch.float32, config=config)
    assert ids.tolist() == [[0, 1]] * 3
    _, ids32 = K.router_topk_gate_split(x.float(), w.float(), 2, out_dtype=torch.float32, config=config)
    assert ids32.tolist() == [[1, 0]] * 3
    weights, ids = K.router_topk_gate_split(x, torch.ones(20, 40, dtype=torch.bfloat16), 6, config=config)
    assert ids.tolist() == [list(range(6))] * 3 and torch.equal(weights, torch.full((3, 6), 1 / 20))
    _counters_clean()


@pytest.mark.parametrize("config", K.GATE_SPLIT_CONFIGS, ids=str)
def test_router_topk_gate_split_counters_reset_after_every_call(seed, config):
    """One counter buffer for three launches (the eager cache's and a CUDA graph's situation): zero
    after each, so each launch's last program is found again; the results stay exact."""
    torch.manual_seed(seed)
    x, w = _exact_gate_inputs(9, 136, 20, torch.bfloat16)
    want = K.router_topk_gate_ref(x, w, 4, n_extra=1, first_extra=20)
    counters = torch.zeros(9, dtype=torch.int32)
    for call in range(3):
        weights = torch.full((9, 5), float("nan"))
        ids = torch.full((9, 5), -7, dtype=torch.int64)
        logits = torch.full((9, 20), float("nan"), dtype=torch.bfloat16)
        K.launch(*K.router_gate_split_spec(x, w, 4, 1.0, 1, 20, logits, counters, weights, ids), config)
        assert (counters == 0).all(), f"call {call}: counters {counters.tolist()}"
        assert torch.equal(ids, want[1]) and not weights.isnan().any()
        assert torch.equal(logits.float(), torch.nn.functional.linear(x, w).float())  # every logit written
    assert K.MIN_SPLIT_ROWS == 1  # engines/torch_router.py sizes its counters one per row


def test_router_topk_gate_split_bad_inputs():
    with pytest.raises(ValueError, match=r"router_topk_gate: weight \(8, 32\) is not \[E, D\]"):
        K.router_topk_gate_split(torch.randn(3, 64), torch.randn(8, 32), 2)
    with pytest.raises(ValueError, match="k=9"):
        K.router_topk_gate_split(torch.randn(3, 64), torch.randn(8, 64), 9)
    _counters_clean()
