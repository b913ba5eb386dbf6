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


def test_switch_and_program_kinds(monkeypatch):
    """On by default (`where`, session 21), `cat` keeps the program, prefill programs never rewritten, a bad value
    named."""
    from dsv3_export.engines import torch_kv_row as R

    program = _fp8_decode_program()
    monkeypatch.delenv(R.KV_ROW_ENV, raising=False)
    assert R.kv_row_as_where(program, "decode")[1].endswith(f"({R.KV_ROW_ENV}=where)")
    monkeypatch.setenv(R.KV_ROW_ENV, "cat")
    assert R.kv_row_as_where(program, "decode") == (program, f"cat ({R.KV_ROW_ENV}=cat)")
    monkeypatch.setenv(R.KV_ROW_ENV, "where")
    assert R.kv_row_as_where(program, "prefill") == (program, "cat (prefill)")
    monkeypatch.setenv(R.KV_ROW_ENV, "pad")
    with pytest.raises(ValueError, match="DSV3_TORCH_KV_ROW='pad'"):
        R.kv_row_as_where(program, "decode")
