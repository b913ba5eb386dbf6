"""The MoE's one-token split-K (kernels/moe_split.py) vs the per-expert reference and the unsplit flow."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import moe as M  # noqa: E402
from dsv3_export.kernels import moe_split as S  # noqa: E402
from dsv3_export.kernels._common import launch  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402
from tests.kernels.test_moe import _recorded_aligns, _recorded_grids  # noqa: E402

# K of the up GEMM 3 blocks of 128 (ragged), of the down GEMM 2 (ragged): split 4 leaves the up GEMM an
# empty chunk, whose program writes zeros; I = 200 also puts a gate/up boundary inside a scale block.
E, D, I, K_SLOTS = 12, 333, 200, 4


def _case(t: int, precision: str):
    ids = torch.stack([torch.randperm(E)[:K_SLOTS] for _ in range(t)])  # distinct experts per token
    rw = torch.rand(t, K_SLOTS)
    x = torch.randn(t, D, dtype=torch.float16)
    w13, w2 = torch.randn(E, 2 * I, D) / D**0.5, torch.randn(E, D, I) / I**0.5
    if precision == "fp16":
        return x, ids, rw.half(), (w13.half(), w2.half()), {}
    (q13, s13), (q2, s2) = [[torch.stack(p) for p in zip(*(R.weight_quant(w[e]) for e in range(E)))]
                            for w in (w13, w2)]
    return x, ids, rw.half(), (q13, q2), dict(w13_scale=s13, w2_scale=s2, act_quant=precision == "fp8")


@pytest.mark.parametrize("precision", ["fp8", "fp16", "w8a16"])
@pytest.mark.parametrize("t,split", [(1, (2, 2)), (1, (4, 3)), (2, (4, 2))])
def test_split_flow_against_reference_and_unsplit(seed, monkeypatch, precision, t, split):
    """At one token the GEMMs' grids get a third axis of split_k programs, the SwiGLU reduce runs and
    act_quant of h does not; above one token the axis has one program and the reverse holds. Outputs
    NaN-poisoned (conftest), within the reference's tolerance, and within 1e-3 of the unsplit flow
    (only the fp32 sum order and the down GEMM's fp32 output differ)."""
    torch.manual_seed(seed)
    x, ids, rw, (w13, w2), kw = _case(t, precision)
    unsplit = M.fused_moe(x, w13, w2, rw, ids, **kw)
    aligns = _recorded_aligns(monkeypatch)
    grids = _recorded_grids(monkeypatch, M, "launch")
    out = M.fused_moe(x, w13, w2, rw, ids, split_k=split, **kw)
    assert_finite("fused_moe split", out)
    gemm_z = [g[2] for name, g in grids if name == "_grouped_gemm_kernel"]
    names = [name for name, _ in grids]
    if t == 1:
        assert gemm_z == list(split) and names.count("_swiglu_partials_kernel") == 1 and not aligns, grids
        assert names.count("_act_quant_ieee_kernel") == (precision == "fp8"), "act_quant of h ran at one token"
    else:
        assert gemm_z == [1, 1] and "_swiglu_partials_kernel" not in names and len(aligns) == 1, grids
    ref = M.fused_moe_ref(x, w13, w2, rw, ids, **kw)
    tol = TOL["fused_moe_fp8_fp16" if precision == "fp8" else "fused_moe_fp16"]
    if precision == "w8a16":
        tol = TOL["fp8_weight_only_vs_op"]
    assert mean_rel(out, ref) < tol
    assert mean_rel(out, unsplit) < 1e-3


@pytest.mark.parametrize("quant", [False, True])
def test_swiglu_partials_kernel(seed, quant):
    """The reduce: silu(gate) * up of the planes' sum (in plane order), rounded to h's dtype, and with
    quant act_quant's q and s of that h, bit for bit; rows x columns off the 128 grid."""
    torch.manual_seed(seed)
    planes, rows, n = 3, 5, 200
    parts = torch.randn(planes, rows, 2 * n)
    h = torch.empty(rows, n, dtype=torch.float16)
    want = S.swiglu_partials_ref(parts, torch.float16)
    if quant:
        q = torch.empty(rows, n, dtype=M.FP8_DTYPE)
        s = torch.empty(rows, -(-n // 128), dtype=torch.float32)
        launch(*S.swiglu_partials_spec(parts, planes, h, q, s, scale_reciprocal=False), None)
        q_ref, s_ref = R.act_quant(want)
        assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())
    else:
        launch(*S.swiglu_partials_spec(parts, planes, h), None)
        assert torch.equal(h, want)


def test_split_planes_rule_and_refusals():
    """split_k planes at one token, one above (also for the symbolic form's int arithmetic at T=0); a
    split without the direct mode, or a flow without direct ids, is refused by name."""
    assert [S.split_planes(t, 4) for t in (0, 1, 2, 64)] == [4, 4, 1, 1]
    x, ids, rw, (w13, w2), kw = _case(1, "fp16")
    with pytest.raises(ValueError, match="split_k=2 must be >= 1, and 1 without direct mode"):
        M.fused_moe(x, w13, w2, rw, ids, direct=False, split_k=2)
    routing = M.moe_routing(ids, E, 16, direct=False)
    with pytest.raises(ValueError, match="split_experts: the split-K runs in the direct mode only"):
        S.split_experts(lambda spec: None, x, w13, w2, rw, routing, K_SLOTS, 2)


@pytest.mark.parametrize("t", [1, 2])
def test_engine_lowering_runs_the_same_flow(seed, t):
    """dsv3_aoti::moe_experts_fp8 with (up, down) splits (the CUDA lowering's launch code, interpreted)
    gives fused_moe's bits at the same splits and block_m."""
    from dsv3_export.engines import torch_triton as TT

    torch.manual_seed(seed)
    x, ids, rw, (w13, w2), kw = _case(t, "fp8")
    x = x.bfloat16()
    out = TT.moe_experts_fp8(x, rw.bfloat16(), ids, w13, kw["w13_scale"], w2, kw["w2_scale"], 16, 4, 2)
    eager = M.fused_moe(x, w13, w2, rw.bfloat16(), ids, block_m=16, split_k=(4, 2), **kw)
    assert_finite("moe_experts_fp8 split", out)
    assert torch.equal(out, eager)
