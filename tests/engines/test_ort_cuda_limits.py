"""OrtStep keeps every tensor of a CUDA run under 2^31 elements, and orders ONNX Runtime after torch.

The 16b bf16 CUDA engine crashed ("CUDA failure 700: an illegal memory access") in `dsv3-export
profile --batch 1,8,64 --prompt-len 128,1024`: the prefill at batch 64 x 1024 tokens materializes
2.18e9-element attention scores and 6.7e9-element logits, past the 32-bit indexing of ONNX Runtime's
CUDA kernels. The fix (engines/ort_cuda_limits.py) runs such a batch over row chunks. The CUDA
kernels cannot run here, so these tests check the invariant on the CPU provider with a small limit:
the bound covers every tensor of the CUDA graph, no run exceeds the limit, and the chunked step
equals the one-run step and the reference. The stream test needs onnxruntime-gpu and a GPU.
"""

from __future__ import annotations

import math

import onnx
import onnxruntime as ort
import pytest
import torch

from dsv3_export.engines.base import get_backend
from dsv3_export.engines.onnx_graph import MODEL_FILE
from dsv3_export.engines.onnxruntime import OrtStep
from dsv3_export.engines.ort_cuda_limits import CUDA_MAX_ELEMENTS, rows_per_run, step_row_elements
from dsv3_export.manifest import verify_engine_dir
from dsv3_export.reference.args import ModelArgs
from dsv3_export.step import LatentCacheStep
from tests.conftest import TOLERANCES, rel_err
from tests.engines._ort_engines import built, tiny_model


def _inputs(gen: torch.Generator, args: ModelArgs, batch: int, seq: int, cache_len: int):
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=gen)
    start_pos = torch.randint(0, cache_len - seq + 1, (batch,), generator=gen)
    cache = torch.randn(batch, args.n_layers, cache_len, args.latent_cache_width, generator=gen)
    return tokens, start_pos, cache


class _RecordingSession:
    """An InferenceSession that records the shape of every tensor bound in each run."""

    def __init__(self, session):
        self.session = session
        self.runs: list[dict[str, list[int]]] = []

    def io_binding(self):
        return _RecordingBinding(self.session.io_binding())

    def run_with_iobinding(self, binding):
        self.session.run_with_iobinding(binding.binding)
        self.runs.append(binding.shapes)


class _RecordingBinding:
    def __init__(self, binding):
        self.binding = binding
        self.shapes: dict[str, list[int]] = {}

    def bind_input(self, name, device, device_id, element_type, shape, ptr):
        self.shapes[name] = list(shape)
        self.binding.bind_input(name, device, device_id, element_type, shape, ptr)

    def bind_output(self, name, device, device_id, element_type, shape, ptr):
        self.shapes[name] = list(shape)
        self.binding.bind_output(name, device, device_id, element_type, shape, ptr)


def _cuda_graph_on_cpu():
    engine_dir = built("fp32", device="cuda")
    args = ModelArgs.from_dict(verify_engine_dir(engine_dir).model)
    return engine_dir, args, ort.InferenceSession(str(engine_dir / MODEL_FILE), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch,seq,cache_len", [(3, 5, 9), (2, 7, 7), (4, 1, 30), (1, 200, 250)])
def test_row_bound_covers_every_tensor_of_the_cuda_graph(seed, batch, seq, cache_len):
    """step_row_elements is an upper bound of every value of the CUDA-target graph (numel / batch),
    measured by running the graph with every node output exposed (s < T, s == T, decode)."""
    engine_dir, args, _ = _cuda_graph_on_cpu()
    model = onnx.load(str(engine_dir / MODEL_FILE))
    exposed = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in exposed:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                exposed.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as built
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    tokens, start_pos, cache = _inputs(torch.Generator().manual_seed(seed), args, batch, seq, cache_len)
    values = session.run(None, {"tokens": tokens.numpy(), "start_pos": start_pos.numpy(), "kv_cache": cache.numpy()})
    bound = batch * step_row_elements(args, seq, cache_len)
    sizes = {o.name: v.size for o, v in zip(session.get_outputs(), values)}
    assert len(sizes) > 300  # every node output of the 3-layer graph, not just logits and new_kv
    over = {name: n for name, n in sizes.items() if n > bound}
    assert not over, f"bound {bound} (batch {batch} x {bound // batch}) below {over}"
    assert max(sizes.values()) > bound / 4  # and not loose by orders of magnitude


def test_large_batch_runs_in_row_chunks_equal_to_one_run_and_the_reference(seed):
    _, args, session = _cuda_graph_on_cpu()
    batch, seq, cache_len = 5, 7, 12
    limit = 2 * step_row_elements(args, seq, cache_len) + 1  # two rows per run
    recording = _RecordingSession(session)
    chunked = OrtStep(recording, torch.device("cpu"), torch.float32, args, max_elements=limit)
    whole = OrtStep(session, torch.device("cpu"), torch.float32, args)
    tokens, start_pos, cache = _inputs(torch.Generator().manual_seed(seed), args, batch, seq, cache_len)

    got_logits, got_kv = chunked(tokens, start_pos, cache)
    assert [run["tokens"][0] for run in recording.runs] == [2, 2, 1]
    for run in recording.runs:
        rows = run["tokens"][0]
        assert rows * step_row_elements(args, seq, cache_len) <= limit
        assert run["logits"] == [rows, seq, args.vocab_size] and run["new_kv"][0] == rows
    one_logits, one_kv = whole(tokens, start_pos, cache)
    assert rel_err(got_logits, one_logits) < 1e-6 and rel_err(got_kv, one_kv) < 1e-6
    with torch.no_grad():
        want_logits, want_kv = LatentCacheStep(tiny_model())(tokens, start_pos, cache)
    assert rel_err(got_logits, want_logits) < TOLERANCES["fp32_engine"]
    assert rel_err(got_kv, want_kv) < TOLERANCES["fp32_engine"]


def test_row_too_large_for_one_run_is_refused():
    _, args, session = _cuda_graph_on_cpu()
    step = OrtStep(session, torch.device("cpu"), torch.float32, args, max_elements=step_row_elements(args, 9, 9) - 1)
    tokens, start_pos, cache = _inputs(torch.Generator().manual_seed(0), args, 1, 9, 9)
    with pytest.raises(ValueError, match="per-run limit"):
        step(tokens, start_pos, cache)


def test_16b_profile_prefill_at_batch_64_is_split_and_the_benchmark_shapes_are_not():
    """The crashing configuration needs tensors past 2^31 elements in one run; the shapes the 16b
    engine ran fine (benchmarks/onnxruntime_16b.py, the profile's smaller configurations) fit one run."""
    args = ModelArgs.preset("16b").replace(max_batch_size=64)
    assert 64 * args.n_heads * 1024 * (1056 + 1024) > 2**31  # attention scores of the crashing prefill
    assert 64 * 1024 * args.vocab_size > 2**31  # its logits
    rows = rows_per_run(args, 1024, 1056, CUDA_MAX_ELEMENTS)
    assert rows < 64 and math.ceil(64 / rows) == 7
    assert rows * 1024 * args.vocab_size < 2**31
    for batch, seq, cache_len in [(1, 1024, 1024), (1, 1, 1036), (8, 1, 1036), (64, 1, 1036),  # benchmark
                                  (1, 128, 160), (8, 1024, 1056), (64, 128, 160), (64, 1, 1056)]:  # profile
        assert rows_per_run(args, seq, cache_len, CUDA_MAX_ELEMENTS) >= batch, (batch, seq, cache_len)


def test_cuda_step_reads_inputs_after_the_callers_pending_kernels(seed):
    """start_pos written by a torch kernel queued behind ~50 ms of GPU sleep on the caller's stream:
    the step must see the written value (ONNX Runtime ordered after the caller's stream)."""
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a GPU and onnxruntime-gpu (CUDAExecutionProvider)")
    engine_dir = built("fp32", device="cuda")
    step = get_backend("onnxruntime").load(engine_dir, verify_engine_dir(engine_dir))
    args = step.args
    tokens, start_pos, cache = _inputs(torch.Generator().manual_seed(seed), args, 2, 3, 20)
    with torch.no_grad():
        want_logits, _ = LatentCacheStep(tiny_model())(tokens, start_pos, cache)
    tokens, cache, written = tokens.cuda(), cache.cuda(), start_pos.cuda()
    pos = torch.full((2,), 10**9, dtype=torch.int64, device="cuda")  # out of range if read too early
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    pos.copy_(written)  # a device copy, queued behind the sleep on the caller's stream
    got_logits, _ = step(tokens, pos, cache)
    torch.cuda.synchronize()
    assert rel_err(got_logits.cpu(), want_logits) < 1e-3
