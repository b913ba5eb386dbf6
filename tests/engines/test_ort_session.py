"""The CUDA fp8 engine's weight dequantization is folded by ONNX Runtime at session creation.

The graph is the CUDA target's (com.microsoft.MoE, every fp8 weight dequantized by
DequantizeLinear -> Cast), exported in fp32 so that ORT's CPU provider can run it: the folding
happens in ORT's level-1 optimizations, before any provider is chosen, so what is folded here is
what is folded on the GPU (the bf16 graph only changes the Cast's target type). On the H200 the
unfolded dequantization made fp8 decode 3.6x slower than bf16 (117 vs 32 ms/step).

Tolerance: the folded graph vs the fp8 program it was built from, fp32 throughout and weights
dequantized bit-exactly on both sides: TOLERANCES["fp32_engine"] (measured 6e-7).
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from dsv3_export.engines import ort_session
from dsv3_export.engines.base import Target
from dsv3_export.engines.onnx_graph import MODEL_FILE
from tests.conftest import TOLERANCES, rel_err
from tests.engines._ort_engines import tiny_model

FP8 = onnx.TensorProto.FLOAT8E4M3FN
_SCRATCH = tempfile.TemporaryDirectory(prefix="dsv3-ort-session-")  # this process's builds; removed at exit


@lru_cache(maxsize=None)
def cuda_fp8_graph_fp32():
    """(engine dir, the fp8 program it was lowered from): the CUDA target's lowering in fp32."""
    pytest.importorskip("dsv3_export.passes.pipeline")
    from dsv3_export.engines.onnxruntime import BACKEND
    from dsv3_export.export import export_step
    from dsv3_export.passes.base import PassConfig
    from dsv3_export.passes.pipeline import run_pipeline

    model = tiny_model()
    # As the build does for onnxruntime/cuda: com.microsoft.MoE is weight-only fp8.
    program, _ = run_pipeline(export_step(model, "prefill"), PassConfig(precision="fp8", fp8_activations=False))
    out = Path(_SCRATCH.name) / "cuda-fp8-in-fp32"
    out.mkdir()
    BACKEND.build({"prefill": program}, model.args, Target("fp8", "cuda"), out)
    return out, program


def optimized(model_path: Path, config: dict[str, str], tmp_path: Path) -> onnx.GraphProto:
    """The graph ORT holds after creating a CPU session with these config entries."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    options.optimized_model_filepath = str(tmp_path / f"optimized-{len(list(tmp_path.iterdir()))}.onnx")
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath, load_external_data=False).graph


def fp8_readers(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """fp8 initializer name -> op types of the nodes reading it."""
    fp8 = {t.name for t in graph.initializer if t.data_type == FP8}
    readers: dict[str, list[str]] = {name: [] for name in fp8}
    for node in graph.node:
        for name in node.input:
            if name in fp8:
                readers[name].append(node.op_type)
    return readers


def test_every_fp8_weight_is_read_by_one_dequantize_linear_only():
    """The invariant the folding relies on: one foldable node per weight, nothing else reading fp8
    (a Cast or Mul on an fp8 weight is the old lowering whose fp32 intermediates ORT held)."""
    engine_dir, _ = cuda_fp8_graph_fp32()
    graph = onnx.load(str(engine_dir / MODEL_FILE), load_external_data=False).graph
    readers = fp8_readers(graph)
    assert len(readers) >= 10  # attention, dense MLP and expert weights of the tiny model
    assert all(ops == ["DequantizeLinear"] for ops in readers.values()), readers
    dequant_out = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert len(dequant_out) == len(readers)


def test_cuda_session_folds_every_fp8_dequant_and_matches_the_fp8_program(tmp_path, seed):
    engine_dir, program = cuda_fp8_graph_fp32()
    model_path = engine_dir / MODEL_FILE
    n_fp8 = len(fp8_readers(onnx.load(str(model_path), load_external_data=False).graph))

    config = ort_session.session_config("cuda", model_path)
    folded = optimized(model_path, config, tmp_path)
    assert not fp8_readers(folded) and not any(n.op_type == "DequantizeLinear" for n in folded.node)
    # ORT's defaults (the CPU target's session) keep them: fp8 stays fp8 in memory.
    kept = optimized(model_path, ort_session.session_config("cpu", model_path), tmp_path)
    assert len(fp8_readers(kept)) == n_fp8 and sum(n.op_type == "DequantizeLinear" for n in kept.node) == n_fp8
    # The size limit is honoured under its key: below the dequantized weights' size, nothing folds.
    capped = optimized(model_path, {**config, ort_session.FOLD_LIMIT: "1024"}, tmp_path)
    assert len(fp8_readers(capped)) == n_fp8

    session = ort.InferenceSession(str(model_path), ort_session.session_options("cuda", model_path),
                                   providers=["CPUExecutionProvider"])
    args = tiny_model().args
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=gen)
    start_pos = torch.randint(0, 7, (2,), generator=gen)
    cache = torch.randn(2, args.n_layers, 17, args.latent_cache_width, generator=gen)
    with torch.no_grad():
        logits, new_kv = program.module()(tokens, start_pos, cache)
    got_logits, got_kv = session.run(None, {"tokens": tokens.numpy(), "start_pos": start_pos.numpy(),
                                            "kv_cache": cache.numpy()})
    assert rel_err(torch.from_numpy(got_logits), logits) < TOLERANCES["fp32_engine"]
    assert rel_err(torch.from_numpy(got_kv), new_kv) < TOLERANCES["fp32_engine"]


def test_fold_limit_is_the_largest_fp8_weights_fp32_size(tmp_path):
    """The 16b model's stacked w13 [64, 2816, 2048]: its fp32 dequantization is the 1476395008 bytes
    ORT refused to fold under its 1 GiB default. Data is never read, so none is written."""
    def model_with(*shapes):
        inits = []
        for i, dims in enumerate(shapes):
            t = onnx.TensorProto(name=f"w{i}", data_type=FP8, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
            t.external_data.add(key="location", value="absent.data")
            inits.append(t)
        graph = onnx.helper.make_graph([], "g", [], [], inits)
        path = tmp_path / f"m{len(shapes)}.onnx"
        onnx.save(onnx.helper.make_model(graph), str(path))
        return path

    big = model_with([64, 2048, 1408], [64, 2816, 2048], [2048, 2048])
    assert ort_session.fold_limit(big) == 4 * 64 * 2816 * 2048 == 1476395008
    assert ort_session.session_config("cuda", big) == {ort_session.DISABLE_QDQ: "1",
                                                       ort_session.FOLD_LIMIT: "1476395008"}
    assert ort_session.session_config("cpu", big) == {}
    assert ort_session.fold_limit(model_with([2048, 2048])) == ort_session.ORT_DEFAULT_FOLD_LIMIT
    assert ort_session.fold_limit(model_with()) == ort_session.ORT_DEFAULT_FOLD_LIMIT
