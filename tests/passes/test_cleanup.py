"""Cleanups: each removes what it claims on our programs, nothing else, and is idempotent."""

from __future__ import annotations

import pytest
import torch
from torch.export.graph_signature import InputKind

from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.cleanup import (CAST_OPS, remove_noop_casts, remove_tensor_asserts,
                                        remove_unused_constants)
from dsv3_export.passes.graph_utils import count_calls
from tests.passes.tiny_programs import run, step_inputs, tiny_model, tiny_program

aten = torch.ops.aten
DTYPES = (torch.float32, torch.bfloat16)
CLEANUPS = (remove_noop_casts, remove_tensor_asserts, remove_unused_constants)


def _casts(program) -> int:
    return count_calls(program.graph, CAST_OPS)


def _assert_outputs_identical(before, after, kind, dtype, seed):
    inputs = step_inputs(kind, seed, dtype=dtype)
    for b, a in zip(run(before, inputs), run(after, inputs)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noop_casts_removed_real_casts_kept(dtype, seed):
    program = tiny_program("decode", dtype)
    result = remove_noop_casts(program, PassConfig())
    assert result.matches > 0
    assert _casts(result.program) == _casts(program) - result.matches
    for node in result.program.graph.nodes:
        if node.target in CAST_OPS:  # every cast left changes the dtype
            assert node.meta["val"].dtype != node.args[0].meta["val"].dtype
    if dtype == torch.float32:
        assert _casts(result.program) == 0
    else:
        assert _casts(result.program) > 0  # bf16 <-> fp32 around norms, rotary, softmax, logits
    _assert_outputs_identical(program, result.program, "decode", dtype, seed)


def test_logits_output_renamed_when_its_cast_goes():
    program = tiny_program("prefill")
    result = remove_noop_casts(program, PassConfig()).program
    outputs = [spec.arg.name for spec in result.graph_signature.output_specs]
    assert outputs == [a.name for a in result.graph.output_node().args[0]]
    result.validate()


def test_proven_asserts_removed_unproven_kept():
    program = tiny_program("decode")
    result = remove_tensor_asserts(program, PassConfig())
    assert result.matches == count_calls(program.graph, [aten._assert_tensor_metadata.default]) > 0
    assert count_calls(result.program.graph, [aten._assert_tensor_metadata.default]) == 0

    # an assert the metadata does not prove (a wrong dtype) must stay; edit a program of our own
    doubted = remove_noop_casts(program, PassConfig()).program
    node = next(n for n in doubted.graph.nodes if n.target == aten._assert_tensor_metadata.default)
    node.kwargs = {**node.kwargs, "dtype": torch.float64}
    kept = remove_tensor_asserts(doubted, PassConfig())
    assert count_calls(kept.program.graph, [aten._assert_tensor_metadata.default]) == 1


def test_unused_constants_dropped_user_inputs_kept(seed):
    program = tiny_program("prefill")
    result = remove_unused_constants(program, PassConfig())
    n_layers = tiny_model().args.n_layers
    assert result.matches == 2 * n_layers  # every MLA module's kv_cache and pe_cache buffer
    specs = result.program.graph_signature.input_specs
    targets = {s.target for s in specs}
    assert not any(t and t.endswith(("attn.kv_cache", "attn.pe_cache")) for t in targets)
    assert [s.arg.name for s in specs if s.kind == InputKind.USER_INPUT] == ["tokens", "start_pos", "kv_cache"]
    assert not any(k.endswith("_cache") for k in result.program.constants)
    assert set(result.program.state_dict) == set(program.state_dict)  # every parameter is used
    _assert_outputs_identical(program, result.program, "prefill", torch.float32, seed)


@pytest.mark.parametrize("cleanup", CLEANUPS, ids=lambda f: f.__name__)
def test_idempotent(cleanup):
    once = cleanup(tiny_program("decode"), PassConfig()).program
    twice = cleanup(once, PassConfig())
    assert twice.matches == 0 and twice.program is once and twice.notes
