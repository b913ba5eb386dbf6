"""engines/torch_kv_row.py: the decode program's kv_new cat as where(pad, pad), the same values bit for bit."""

from __future__ import annotations

import pytest
import torch


def _fp8_decode_program():
    from dsv3_export.passes.base import PassConfig
    from dsv3_export.passes.pipeline import run_pipeline
    from tests.passes.tiny_programs import tiny_program

    return run_pipeline(tiny_program("decode"), PassConfig(precision="fp8"))[0]


def _kv_new_args(program) -> list:
    return [n.args[2] for n in program.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.dsv3.mla_attention.default]


def test_where_row_is_the_cat_bit_for_bit(seed, monkeypatch):
    """Every layer's kv_new becomes a where (no cat left feeding mla_attention or the stacked rows), and the
    program's outputs (logits, new kv rows) are the same bits on random tokens, positions and cache."""
    from dsv3_export.engines import torch_kv_row as R
    from tests.passes.tiny_programs import step_inputs

    program = _fp8_decode_program()
    monkeypatch.setenv(R.KV_ROW_ENV, "where")
    rewritten, how = R.kv_row_as_where(program, "decode")
    kv_new = _kv_new_args(rewritten)
    assert kv_new and all(n.target is torch.ops.aten.where.self for n in kv_new), kv_new
    stacks = [n for n in rewritten.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.stack.default
              and set(n.args[0]) == set(kv_new)]
    assert len(stacks) == 1, "the step's stacked kv rows are not the where rows"
    assert how.startswith(f"{len(kv_new)} kv_new cats -> where"), how
    inputs = step_inputs("decode", seed)
    want, got = program.module()(*inputs), rewritten.module()(*inputs)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_over_the_row_is_the_cat_up_to_the_sum_order(seed, monkeypatch, dtype):
    """DSV3_TORCH_KV_ROW=norm: each layer's kv_norm reduces over the whole kv row, masked (the fp32 mean summed in
    another order): every layer rewritten (the bf16 program through its casts), no rms_norm over the latent left,
    and the outputs within that rounding of the cat's: the new kv rows (the norm's own output) within 2e-6 in fp32
    and one bf16 ulp (2^-7 relative) in bf16; the logits within 1e-5 (fp32) and 2e-2 (bf16) relative in norm."""
    from dsv3_export.engines import torch_kv_row as R
    from dsv3_export.passes.base import PassConfig
    from dsv3_export.passes.pipeline import run_pipeline
    from tests.passes.tiny_programs import step_inputs, tiny_model, tiny_program

    precision = "fp8" if dtype == torch.float32 else "bf16"
    program = run_pipeline(tiny_program("decode", dtype), PassConfig(precision=precision))[0]
    latent = tiny_model(dtype).args.kv_lora_rank
    latent_norms = lambda p: sum(n.op == "call_function" and n.target is torch.ops.aten.rms_norm.default  # noqa: E731
                                 and list(n.args[1]) == [latent] for n in p.graph.nodes)
    layers = len(_kv_new_args(program))
    assert latent_norms(program) == layers
    monkeypatch.setenv(R.KV_ROW_ENV, "norm")
    rewritten, how = R.kv_row_as_where(program, "decode")
    assert how == f"{layers} kv_new cats -> where(pad, pad), {layers} kv_norms over the whole row " \
                  f"({R.KV_ROW_ENV}=norm)", how
    assert latent_norms(rewritten) == 0
    inputs = step_inputs("decode", seed, dtype)
    (want_logits, want_kv), (got_logits, got_kv) = program.module()(*inputs), rewritten.module()(*inputs)
    kv_tol = 2e-6 if dtype == torch.float32 else 2**-7
    assert torch.allclose(got_kv.float(), want_kv.float(), rtol=kv_tol, atol=kv_tol), \
        (got_kv.float() - want_kv.float()).abs().max()
    rel = ((got_logits.float() - want_logits.float()).norm() / want_logits.float().norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


@pytest.mark.parametrize("case", ["fp32", "bf16 row", "no weight", "eps None", "dim 2", "tiny values"])
def test_norm_over_row_matches_rms_norm(case):
    """_norm_over_row on a small program: rms_norm(split(kv, [c, r], dim)[0].float(), [c], weight, eps) with a
    non-unit weight (the tiny model's norms are all ones: a dropped weight would pass the test above) and values
    small enough for eps to matter; the same values as torch's rms_norm in eager (within an fp32 ulp or two)."""
    import torch.nn.functional as F

    from dsv3_export.engines import torch_kv_row as R
    from dsv3_export.passes.graph_utils import is_call
    from dsv3_export.passes.program_state import ProgramState

    c, r = 24, 8
    dtype = torch.bfloat16 if case == "bf16 row" else torch.float32
    weight = None if case == "no weight" else torch.rand(c, generator=torch.Generator().manual_seed(1)) + 0.5
    eps = None if case == "eps None" else 1e-6
    dim = 2 if case == "dim 2" else -1

    class Norm(torch.nn.Module):
        def forward(self, kv, w):
            latent, k_pe = torch.split(kv, [c, r], dim=dim)
            return F.rms_norm(latent.float(), (c,), w, eps).to(kv.dtype), k_pe

    kv = torch.randn(3, 1, c + r, generator=torch.Generator().manual_seed(2)) * (1e-4 if case == "tiny values" else 1)
    kv = kv.to(dtype)
    program = torch.export.export(Norm(), (kv, weight))
    state = ProgramState(program)
    norm = next(n for n in state.graph.nodes if is_call(n, torch.ops.aten.rms_norm.default))
    assert R._norm_over_row(state, norm, c + r)
    state.eliminate_dead_code()
    rewritten = state.program()
    assert not any(is_call(n, torch.ops.aten.rms_norm.default) for n in rewritten.graph.nodes)
    want, got = program.module()(kv, weight)[0], rewritten.module()(kv, weight)[0]
    assert got.dtype == want.dtype
    assert torch.allclose(got.float(), want.float(), rtol=4e-7, atol=0), (got.float() - want.float()).abs().max()


def test_switch_and_program_kinds(monkeypatch):
    """On by default (`norm` since session 22, `where` in session 21), `cat` keeps the program, prefill programs never
    rewritten, a bad value named."""
    from dsv3_export.engines import torch_kv_row as R

    program = _fp8_decode_program()
    monkeypatch.delenv(R.KV_ROW_ENV, raising=False)
    assert R.kv_row_as_where(program, "decode")[1].endswith(f"({R.KV_ROW_ENV}=norm)")
    monkeypatch.setenv(R.KV_ROW_ENV, "cat")
    assert R.kv_row_as_where(program, "decode") == (program, f"cat ({R.KV_ROW_ENV}=cat)")
    monkeypatch.setenv(R.KV_ROW_ENV, "where")
    assert R.kv_row_as_where(program, "prefill") == (program, "cat (prefill)")
    monkeypatch.setenv(R.KV_ROW_ENV, "pad")
    with pytest.raises(ValueError, match="DSV3_TORCH_KV_ROW='pad'"):
        R.kv_row_as_where(program, "decode")
