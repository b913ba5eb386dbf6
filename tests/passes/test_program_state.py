"""ProgramState: adding / replacing / removing weights keeps graph, signature and state in step."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.export.graph_signature import InputKind
from torch._subclasses.fake_tensor import FakeTensor

from dsv3_export.export import export_step
from dsv3_export.passes.program_state import ProgramState, state_nbytes
from dsv3_export.reference import ModelArgs, Transformer
from tests.passes.tiny_programs import run, step_inputs, tiny_program

aten = torch.ops.aten


def _output_node(state: ProgramState):
    return next(n for n in reversed(state.graph.nodes) if n.op == "output")


def _add_to_logits(state: ProgramState, tensor_node):
    """logits -> logits + tensor_node (the first program output)."""
    out = _output_node(state)
    logits = out.args[0][0]
    with state.graph.inserting_before(out):
        new = state.call(aten.add.Tensor, (logits, tensor_node), meta_from=logits)
    out.args = ((new, *out.args[0][1:]),)
    return new


def _kind_order_ok(program) -> bool:
    kinds = [s.kind for s in program.graph_signature.input_specs]
    rank = {InputKind.PARAMETER: 0, InputKind.BUFFER: 1, InputKind.CONSTANT_TENSOR: 2, InputKind.USER_INPUT: 5}
    return [rank[k] for k in kinds] == sorted(rank[k] for k in kinds)


def test_add_parameter_is_used_and_the_input_program_is_unchanged(seed):
    program = tiny_program("decode")
    n_nodes, n_specs = len(program.graph.nodes), len(program.graph_signature.input_specs)
    state = ProgramState(program)
    bias = torch.randn(1000, generator=torch.Generator().manual_seed(seed))
    node = state.add_parameter("extra.bias", bias)
    assert isinstance(node.meta["val"], FakeTensor) and node.meta["val"].fake_mode is state.fake_mode
    assert tuple(node.meta["val"].shape) == (1000,)
    _add_to_logits(state, node)
    new = state.program()

    assert isinstance(new.state_dict["extra.bias"], torch.nn.Parameter)
    assert _kind_order_ok(new)
    spec = next(s for s in new.graph_signature.input_specs if s.target == "extra.bias")
    assert spec.kind == InputKind.PARAMETER and spec.arg.name == node.name
    inputs = step_inputs("decode", seed)
    before, after = run(program, inputs), run(new, inputs)
    torch.testing.assert_close(after[0], before[0] + bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    # the input program is untouched
    assert len(program.graph.nodes) == n_nodes and len(program.graph_signature.input_specs) == n_specs
    assert "extra.bias" not in program.state_dict


@pytest.mark.parametrize("persistent", [True, False])
def test_add_buffer_goes_to_state_dict_or_constants(persistent):
    state = ProgramState(tiny_program("decode"))
    node = state.add_buffer("extra.offset", torch.full((1000,), 0.5), persistent=persistent)
    _add_to_logits(state, node)
    new = state.program()
    assert ("extra.offset" in new.state_dict) == persistent
    assert ("extra.offset" in new.constants) == (not persistent)
    assert _kind_order_ok(new)
    inputs = step_inputs("decode", 3)
    torch.testing.assert_close(run(new, inputs)[0], run(tiny_program("decode"), inputs)[0] + 0.5)


def test_add_refuses_an_existing_name():
    state = ProgramState(tiny_program("decode"))
    with pytest.raises(ValueError, match="already has a tensor"):
        state.add_parameter("head.weight", torch.zeros(1))


def test_replace_changes_value_shape_and_dtype(seed):
    program = tiny_program("decode")
    state = ProgramState(program)
    head = state.tensor("head.weight")
    node = state.replace("head.weight", head * 2)
    assert isinstance(state.state_dict["head.weight"], torch.nn.Parameter)
    inputs = step_inputs("decode", seed)
    torch.testing.assert_close(run(state.program(), inputs)[0], 2 * run(program, inputs)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(program.state_dict["head.weight"], head)  # the source is untouched

    # new dtype and shape: meta follows, the old value's metadata assertions go
    state = ProgramState(program)
    node = state.replace("head.weight", torch.zeros(3, 4, dtype=torch.bfloat16))
    assert node.meta["val"].dtype == torch.bfloat16 and tuple(node.meta["val"].shape) == (3, 4)
    assert not any(u.target is aten._assert_tensor_metadata.default for u in node.users)


def test_remove_needs_an_unused_placeholder_then_drops_everything():
    program = tiny_program("decode")
    state = ProgramState(program)
    with pytest.raises(ValueError, match="still used"):
        state.remove("head.weight")
    # an unused buffer (the MLA modules' own caches ride along, unused by the step)
    unused = next(s.target for s in program.graph_signature.input_specs if s.target and s.target.endswith("kv_cache"))
    assert state.remove_if_unused([unused, "head.weight"]) == [unused]
    new = state.program()
    assert unused not in new.state_dict and unused not in new.constants
    assert all(s.target != unused for s in new.graph_signature.input_specs)
    assert any(s.target == unused for s in program.graph_signature.input_specs)
    inputs = step_inputs("decode", 5)
    torch.testing.assert_close(run(new, inputs)[0], run(program, inputs)[0], rtol=0, atol=0)


def test_dead_code_elimination_drops_asserts_of_dead_values_only(seed):
    program = tiny_program("decode")
    state = ProgramState(program)
    # point the head Linear at the embedding matrix (same [vocab, dim] shape): the old linear, the
    # head weight's cast and that cast's _assert_tensor_metadata become dead
    head_linear = next(n for n in state.graph.nodes if n.target is aten.linear.default
                       and n.args[1].op != "placeholder" and n.args[1].args[0] is state.node_of("head.weight"))
    with state.graph.inserting_before(head_linear):
        new = state.call(aten.linear.default, (head_linear.args[0], state.node_of("embed.weight")), meta_from=head_linear)
    head_linear.replace_all_uses_with(new)
    n_asserts = sum(n.target is aten._assert_tensor_metadata.default for n in state.graph.nodes)
    assert state.eliminate_dead_code() >= 3
    assert head_linear._erased
    assert not state.node_of("head.weight").users  # its cast and the cast's assertion are gone
    left = sum(n.target is aten._assert_tensor_metadata.default for n in state.graph.nodes)
    assert 0 < left < n_asserts  # the asserts of live values stay
    state.remove("head.weight")
    tied = state.program()
    assert "head.weight" not in tied.state_dict

    reference = ProgramState(program)
    reference.replace("head.weight", program.state_dict["embed.weight"])
    inputs = step_inputs("decode", seed)
    torch.testing.assert_close(run(tied, inputs)[0], run(reference.program(), inputs)[0], rtol=0, atol=0)


@functools.cache
def _meta_program():
    with torch.device("meta"):
        model = Transformer(ModelArgs.preset("tiny").replace(n_layers=2))
    return export_step(model, "decode")


def test_meta_device_program():
    program = _meta_program()
    state = ProgramState(program)
    w = state.add_parameter("extra.w", torch.empty(7, 5, device="meta", dtype=torch.float8_e4m3fn))
    assert w.meta["val"].device.type == "meta" and w.meta["val"].dtype == torch.float8_e4m3fn
    state.replace("head.weight", torch.empty(1000, 192, device="meta", dtype=torch.bfloat16))
    unused = [s.target for s in program.graph_signature.input_specs if s.target and s.target.endswith("pe_cache")]
    state.remove_if_unused(unused)
    new = state.program()  # validates
    assert new.state_dict["extra.w"].device.type == "meta"
    assert new.state_dict["head.weight"].dtype == torch.bfloat16
    assert state_nbytes(new) == state_nbytes(program) + 35 - 1000 * 192 * 2 - sum(
        program.state_dict.get(t, program.constants.get(t)).nbytes for t in unused)
