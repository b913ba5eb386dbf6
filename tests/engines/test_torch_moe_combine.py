"""engines/torch_triton_moe.py DSV3_TORCH_MOE_COMBINE: the MoE's combine over its k slots as one fp32 reduction
(`sum`, default) or as unrolled fp32 adds in slot order (`adds`), which leave no reduction in the traced
program (so Inductor can fuse them into the next pointwise or norm kernel; the fusion itself happens in a
CUDA build only). Both are fp32 sums of the same bf16 terms cast to bf16: they differ by the summation order,
at most one bf16 rounding step, and each is within one step of the fp64 sum."""

from __future__ import annotations

import pytest
import torch



def _torch_triton():
    """engines/torch_triton_moe.py, imported inside the tests: a module-level import of triton here would come
    before tests/kernels' conftest sets TRITON_INTERPRET (it refuses to run then)."""
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_triton_moe

    return torch_triton_moe


def _ulp_bound(ref: torch.Tensor) -> torch.Tensor:
    return 2.0**-7 * ref.abs() + 1e-6  # one bf16 step (8 significant bits) of |ref|


def test_adds_match_the_sum(seed, monkeypatch):
    tt = _torch_triton()
    g = torch.Generator().manual_seed(seed)
    t, k, d = 3, 8, 37
    y = torch.randn(t * k, d, generator=g).bfloat16()
    exact = y.double().view(t, k, d).sum(1)
    forms = {}
    for form in ("sum", "adds"):
        monkeypatch.setenv(tt.MOE_COMBINE_ENV, form)
        forms[form] = tt._combine(y, t, k, torch.bfloat16)
        assert forms[form].shape == (t, d) and forms[form].dtype == torch.bfloat16
        assert ((forms[form].double() - exact).abs() <= _ulp_bound(exact)).all(), form
    assert ((forms["adds"].float() - forms["sum"].float()).abs() <= _ulp_bound(forms["sum"].float())).all()


def test_adds_leave_no_reduction_in_the_traced_program(monkeypatch):
    """Traced with a symbolic token count: `sum` is an aten.sum over the slots, `adds` only adds."""
    from torch.export import Dim, export

    tt = _torch_triton()

    class Combine(torch.nn.Module):
        def forward(self, y):
            return tt._combine(y, y.shape[0] // 8, 8, torch.bfloat16)

    y = torch.randn(3 * 8, 5).bfloat16()
    ops = {}
    for form in ("sum", "adds"):
        monkeypatch.setenv(tt.MOE_COMBINE_ENV, form)
        ep = export(Combine(), (y,), dynamic_shapes=({0: 8 * Dim("tokens", min=1, max=64)},))
        ops[form] = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("aten.sum" in o for o in ops["sum"]), ops["sum"]
    assert not any("aten.sum" in o for o in ops["adds"]) and any("aten.add" in o for o in ops["adds"]), ops["adds"]


def test_switch_rejects_unknown(monkeypatch):
    tt = _torch_triton()
    monkeypatch.setenv(tt.MOE_COMBINE_ENV, "tree")
    with pytest.raises(ValueError, match="DSV3_TORCH_MOE_COMBINE='tree': use sum"):
        tt._combine(torch.zeros(8, 2), 1, 8, torch.float32)
