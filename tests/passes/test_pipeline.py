"""The pipeline: order, reports, --dump-graphs, --verify-each-pass, and end to end vs the reference."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3_export.passes import debug, pipeline
from dsv3_export.passes.base import PassConfig, PassError, PassResult
from dsv3_export.passes.fuse_mla_absorb import MLA_OP
from dsv3_export.passes.graph_utils import copy_graph, count_calls, rebuild_program
from dsv3_export.step import LatentCacheStep, write_cache
from tests.conftest import TOLERANCES, rel_err
from tests.passes.tiny_programs import step_inputs, tiny_model, tiny_program

CLEANUPS = ("remove_noop_casts", "remove_tensor_asserts", "remove_unused_constants")


def test_order_is_explicit_and_fixed():
    names = list(pipeline.PASS_NAMES)
    assert names[0] == "fuse_mla_absorb"
    assert names[-len(CLEANUPS):] == list(CLEANUPS)
    if "rewrite_moe_grouped_gemm" in names and "quantize_fp8_blockwise" in names:
        assert names.index("rewrite_moe_grouped_gemm") < names.index("quantize_fp8_blockwise")
    for module in ("rewrite_moe_grouped_gemm", "quantize_fp8_blockwise"):
        present = pipeline._optional_pass(module) is not None
        assert (module in names) == present, f"{module}: module present={present} but in PIPELINE={module in names}"


def test_reports_chain_node_counts():
    program = tiny_program("decode")
    result, reports = pipeline.run_pipeline(program, PassConfig())
    assert [r.name for r in reports] == list(pipeline.PASS_NAMES)
    assert reports[0].nodes_before == len(program.graph.nodes)
    assert reports[-1].nodes_after == len(result.graph.nodes) < len(program.graph.nodes)
    for prev, nxt in zip(reports, reports[1:]):
        assert prev.nodes_after == nxt.nodes_before
    by_name = {r.name: r for r in reports}
    assert by_name["fuse_mla_absorb"].matches == tiny_model().args.n_layers
    assert all(r.seconds >= 0 and r.drift is None for r in reports)
    assert count_calls(result.graph, [MLA_OP]) == tiny_model().args.n_layers
    result.validate()


def test_pass_that_matches_nothing_says_so():
    once, _ = pipeline.run_pipeline(tiny_program("decode"), PassConfig(), passes=["fuse_mla_absorb"])
    _, reports = pipeline.run_pipeline(once, PassConfig(debug=True), passes=["fuse_mla_absorb"])
    assert reports[0].matches == 0
    assert "no match" in reports[0].summary() and "no attention subgraph" in reports[0].summary()


def test_dump_graphs(tmp_path):
    dump = tmp_path / "graphs"
    _, reports = pipeline.run_pipeline(tiny_program("decode"), PassConfig(), dump_dir=dump)
    stages = sorted(p.name for p in dump.iterdir() if p.is_dir())
    assert stages == ["00_input"] + [f"{i:02d}_{r.name}" for i, r in enumerate(reports, start=1)]
    fused = dump / "01_fuse_mla_absorb"
    assert json.loads((fused / "ops.json").read_text())["dsv3.mla_attention.default"] == tiny_model().args.n_layers
    assert "torch.ops.dsv3.mla_attention.default" in (fused / "graph.txt").read_text()
    assert f"{tiny_model().args.n_layers}  dsv3.mla_attention.default  (+3)" in (fused / "ops.txt").read_text()
    assert "einsum" not in (fused / "ops.json").read_text()
    assert len(json.loads((dump / "report.json").read_text())) == len(reports)
    assert [p.name for p in tmp_path.iterdir()] == ["graphs"]  # no staging folder left behind


def test_verify_each_pass_records_drift():
    _, reports = pipeline.run_pipeline(tiny_program("prefill"), PassConfig(), verify_each_pass=True)
    for report in reports:
        assert len(report.drift) == 2  # logits, new_kv
        assert all(d["rel_err"] <= TOLERANCES["fp32_structural"] for d in report.drift)


def _perturb_scale(program, config):
    """A broken 'structural' pass: softmax scale off by 2% in every attention."""
    graph = copy_graph(program)
    nodes = [n for n in graph.nodes if n.target == MLA_OP]
    for node in nodes:
        node.args = node.args[:-1] + (node.args[-1] * 1.02,)
    return PassResult(rebuild_program(program, graph), len(nodes))


def _not_a_pass(program, config):
    return program


@pytest.fixture
def extended_pipeline(monkeypatch):
    def install(*extra):
        steps = pipeline.PIPELINE[:1] + tuple((fn.__name__.strip("_"), fn) for fn in extra) + pipeline.PIPELINE[1:]
        monkeypatch.setattr(pipeline, "PIPELINE", steps)
        monkeypatch.setattr(pipeline, "PASS_NAMES", tuple(n for n, _ in steps))
    return install


def test_verify_stops_at_the_first_drifting_pass(extended_pipeline, tmp_path):
    extended_pipeline(_perturb_scale)
    with pytest.raises(PassError) as err:
        pipeline.run_pipeline(tiny_program("decode"), PassConfig(), verify_each_pass=True, dump_dir=tmp_path / "g")
    assert err.value.pass_name == "perturb_scale"
    assert "drifted" in str(err.value) and "tolerance float32" in str(err.value) and "seed" in str(err.value)
    # the dump is written up to the failing pass
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["00_input", "01_fuse_mla_absorb", "report.json"]


def test_pass_returning_the_wrong_type_is_named(extended_pipeline):
    extended_pipeline(_not_a_pass)
    with pytest.raises(PassError, match="pass not_a_pass: returned ExportedProgram, not a PassResult"):
        pipeline.run_pipeline(tiny_program("decode"), PassConfig(), passes=["not_a_pass"])


def test_unknown_pass_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown pass.*fuse_melt.*available: fuse_mla_absorb"):
        pipeline.run_pipeline(tiny_program("decode"), PassConfig(), passes=["fuse_melt"])


def test_verify_refuses_a_meta_program():
    with torch.device("meta"):
        linear = torch.nn.Linear(4, 4)
    program = torch.export.export(linear, (torch.randn(2, 4, device="meta"),))
    with pytest.raises(ValueError, match="meta device"):
        pipeline.run_pipeline(program, PassConfig(), verify_each_pass=True)


def test_fp8_quantization_only_at_fp8_precision():
    if "quantize_fp8_blockwise" not in pipeline.PASS_NAMES:
        pytest.skip("passes/quantize_fp8_blockwise.py is not written yet")
    program = tiny_program("decode")
    result, reports = pipeline.run_pipeline(program, PassConfig(precision="fp32"), passes=["quantize_fp8_blockwise"])
    assert result is program and reports[0].matches == 0 and "skipped" in reports[0].notes[0]


def test_drift_tolerances_come_from_one_table():
    program = tiny_program("decode")
    ref = [torch.randn(1000, dtype=torch.float64).float()]
    close = [ref[0] * (1 + 1e-6)]
    lossy = [ref[0] + 0.05 * torch.randn(1000)]  # rel err ~5e-2, cosine ~0.999
    debug.check_drift("some_structural_pass", program, ref, close, seed=1)
    with pytest.raises(PassError, match="pass some_structural_pass: output 0 drifted"):
        debug.check_drift("some_structural_pass", program, ref, lossy, seed=1)
    debug.check_drift("quantize_fp8_blockwise", program, ref, lossy, seed=1)  # judged by cosine
    with pytest.raises(PassError, match="cosine"):
        debug.check_drift("quantize_fp8_blockwise", program, ref, [torch.randn(1000)], seed=1)
    with pytest.raises(PassError, match="drifted"):
        debug.check_drift("some_structural_pass", program, ref, [ref[0] * float("nan")], seed=1)


# --- end to end ----------------------------------------------------------------------------------
def _reference_greedy(model, prompt: torch.Tensor, steps: int):
    model.reset_cache()
    logits = [model(prompt, 0)[:, -1]]
    tokens = [logits[-1].argmax(-1)]
    pos = prompt.shape[1]
    for _ in range(steps):
        logits.append(model(tokens[-1][:, None], pos)[:, -1])
        tokens.append(logits[-1].argmax(-1))
        pos += 1
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def _program_greedy(prefill, decode, model, prompt: torch.Tensor, steps: int):
    b, s = prompt.shape
    cache = LatentCacheStep(model).empty_cache(b, s + steps + 1, model.dtype)
    start = torch.zeros(b, dtype=torch.int64)
    prefill_fn, decode_fn = prefill.module(), decode.module()
    with torch.no_grad():
        out, new_kv = prefill_fn(prompt, start, cache)
        write_cache(cache, new_kv, start)
        logits = [out[:, -1]]
        tokens = [logits[-1].argmax(-1)]
        start = start + s
        for _ in range(steps):
            out, new_kv = decode_fn(tokens[-1][:, None], start, cache)
            write_cache(cache, new_kv, start)
            logits.append(out[:, -1])
            tokens.append(logits[-1].argmax(-1))
            start = start + 1
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def test_end_to_end_greedy_decode_matches_reference(seed):
    model = tiny_model()
    prefill, reports_p = pipeline.run_pipeline(tiny_program("prefill"), PassConfig())
    decode, reports_d = pipeline.run_pipeline(tiny_program("decode"), PassConfig())
    for reports in (reports_p, reports_d):
        assert {r.name: r.matches for r in reports}["fuse_mla_absorb"] == model.args.n_layers
    prompt = torch.randint(0, model.args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    ref_tokens, ref_logits = _reference_greedy(model, prompt, steps=32)
    tokens, logits = _program_greedy(prefill, decode, model, prompt, steps=32)
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(logits, ref_logits) < TOLERANCES["fp32_engine"]


def test_step_inputs_are_usable_by_verify(seed):
    inputs = debug.random_step_inputs(tiny_program("decode"), seed)
    tokens, start_pos, kv_cache = inputs
    assert tokens.shape[1] == 1 and kv_cache.shape[0] == tokens.shape[0] == start_pos.shape[0]
    assert int(start_pos.max()) <= kv_cache.shape[2]
    assert step_inputs("decode", seed)[0].shape[1] == 1


def _crashing_pass(program, config):
    raise KeyError("layers.0.attn.wkv_b.weight")


def test_a_crashing_pass_is_named(extended_pipeline):
    extended_pipeline(_crashing_pass)
    with pytest.raises(PassError, match=r"pass crashing_pass: failed with KeyError: 'layers.0.attn.wkv_b.weight'"):
        pipeline.run_pipeline(tiny_program("decode"), PassConfig(), passes=["crashing_pass"])


def test_optional_pass_module_without_its_function_is_an_error():
    assert pipeline._optional_pass("no_such_pass_module") is None
    with pytest.raises(ImportError, match="defines no pass function graph_utils"):
        pipeline._optional_pass("graph_utils")  # the module exists, the function does not


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_whole_pipeline_is_idempotent(precision):
    once, _ = pipeline.run_pipeline(tiny_program("decode"), PassConfig(precision=precision))
    twice, reports = pipeline.run_pipeline(once, PassConfig(precision=precision))
    assert [r.matches for r in reports] == [0] * len(reports)
    assert twice is once
