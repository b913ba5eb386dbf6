"""The decode CUDA graphs' bookkeeping (engines/torch_step.py _DecodeGraphs) and step_writing_cache, on CPU.

No CUDA graph can be captured here, so the stream calls and capture_graph are replaced by stand-ins whose
"replay" re-runs what was recorded into the recorded output buffers, as a graph replays into its static outputs.
What is tested is ours: which graph a call replays (keyed by the cache buffer and by whether the write is in the
graph), that the written form writes the step's new rows at the positions copied in for that call, and that its
logits and cache equal the plain step followed by write_cache.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

import dsv3_export.engines.torch_step as torch_step
from dsv3_export.engines.torch_step import AOTIStep, _DecodeGraphs
from dsv3_export.step import step_writing_cache, write_cache

LAYERS, WIDTH, VOCAB = 3, 5, 7


def toy_decode(tokens, start_pos, kv_cache):
    """A decode step whose logits read the cache (so a missed or misplaced write shows) and whose new rows depend on
    the token and position: logits [b, 1, V], new_kv [b, L, 1, w]."""
    b = tokens.shape[0]
    seen = kv_cache.float().sum(dim=(1, 3))  # [b, T]
    weights = torch.arange(1, kv_cache.shape[2] + 1, dtype=torch.float32)
    logits = (seen @ weights)[:, None, None] + torch.arange(VOCAB) * tokens[:, :, None].float()
    rows = (tokens.float() * 10 + start_pos[:, None].float())[:, :, None, None]  # [b, 1, 1, 1]
    new_kv = rows.expand(b, LAYERS, 1, WIDTH) + torch.arange(LAYERS).view(1, LAYERS, 1, 1)
    return logits, new_kv.to(kv_cache.dtype)


class ReplayedGraph:
    """capture_graph's stand-in: replay() runs the recorded function again into the first run's output buffers."""

    def __init__(self, record):
        self.record = record
        # a capture executes nothing: the tensors the recorded function closes over (the cache, the static inputs)
        # are put back as they were after the run that allocates the output buffers
        closed = [v for v in inspect.getclosurevars(record).nonlocals.values() if isinstance(v, torch.Tensor)]
        saved = [t.clone() for t in closed]
        self.outputs = record()
        for t, before in zip(closed, saved):
            t.copy_(before)
        self.replays = 0

    def replay(self):
        self.replays += 1
        for static, new in zip(self.outputs, self.record()):
            static.copy_(new)


@pytest.fixture
def cpu_capture(monkeypatch):
    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())

    def capture(record, plan):
        graph = ReplayedGraph(record)
        return graph, graph.outputs, None

    monkeypatch.setattr(torch_step, "capture_graph", capture)


def inputs(seed: int, batch: int = 2, length: int = 9):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(batch, LAYERS, length, WIDTH, generator=gen)
    tokens = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    pos = torch.randint(0, length, (batch,), generator=gen)
    return tokens, pos, cache


def step_then_write(tokens, pos, cache):
    """The plain step's logits and the cache after write_cache, on a copy of `cache`: what a written step must give."""
    want_cache = cache.clone()
    want_logits, new_kv = toy_decode(tokens, pos, want_cache)
    write_cache(want_cache, new_kv, pos)
    return want_logits, want_cache


def test_written_graph_equals_the_step_then_write_cache(cpu_capture, seed):
    graphs = _DecodeGraphs(toy_decode)
    tokens, pos, cache = inputs(seed)
    want_logits, want_cache = step_then_write(tokens, pos, cache)
    (logits,) = graphs(tokens, pos, cache, write=True)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    torch.testing.assert_close(cache, want_cache, rtol=0, atol=0)
    # a second call replays the same graph at its own positions, into the same cache buffer
    tokens2, pos2 = (tokens + 1) % VOCAB, (pos + 3) % cache.shape[2]
    want_logits, want_cache = step_then_write(tokens2, pos2, want_cache)
    (logits2,) = graphs(tokens2, pos2, cache, write=True)
    torch.testing.assert_close(logits2, want_logits, rtol=0, atol=0)
    torch.testing.assert_close(cache, want_cache, rtol=0, atol=0)
    assert graphs.captures == 1 and next(iter(graphs.graphs.values()))["graph"].replays == 2
    assert logits.data_ptr() != logits2.data_ptr()  # the logits are the caller's copies, not the static buffer


def test_plain_and_written_steps_are_separate_graphs(cpu_capture, seed):
    graphs = _DecodeGraphs(toy_decode)
    tokens, pos, cache = inputs(seed)
    before = cache.clone()
    logits, new_kv = graphs(tokens, pos, cache)  # the plain graph only reads the cache
    torch.testing.assert_close(cache, before, rtol=0, atol=0)
    want_logits, want_kv = toy_decode(tokens, pos, before)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    torch.testing.assert_close(new_kv, want_kv, rtol=0, atol=0)
    graphs(tokens, pos, cache, write=True)
    assert graphs.captures == 2
    graphs(tokens, pos, cache.clone(), write=True)  # another cache buffer: another graph
    assert graphs.captures == 3


def test_a_failed_capture_falls_back_and_still_writes(monkeypatch, cpu_capture, seed):
    def broken(record, plan):
        raise RuntimeError("capture not supported")

    monkeypatch.setattr(torch_step, "capture_graph", broken)
    graphs = _DecodeGraphs(toy_decode)
    tokens, pos, cache = inputs(seed)
    want_logits, want_cache = step_then_write(tokens, pos, cache)
    (logits,) = graphs(tokens, pos, cache, write=True)
    assert graphs.failed
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    torch.testing.assert_close(cache, want_cache, rtol=0, atol=0)


@pytest.mark.parametrize("graphed", [True, False])
def test_aoti_step_writing_cache_matches_step_then_write(cpu_capture, seed, graphed):
    """AOTIStep.step_writing_cache through its decode graphs (a CPU step given graphs by hand) and without them,
    and dsv3_export.step.step_writing_cache on a step that has no fused form."""
    step = AOTIStep(toy_decode, toy_decode, torch.device("cpu"), torch.float32)
    if graphed:
        step._graphs = _DecodeGraphs(toy_decode)
    tokens, pos, cache = inputs(seed)
    want_logits, want_cache = step_then_write(tokens, pos, cache)
    got_cache = cache.clone()
    logits = step_writing_cache(step, tokens, pos, got_cache)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    torch.testing.assert_close(got_cache, want_cache, rtol=0, atol=0)
    if graphed:  # one graph, the one with the write (not the plain step's followed by a write from the host)
        assert step._graphs.captures == 1 and [key[-1] for key in step._graphs.graphs] == [True]
    else:
        assert step._graphs is None
    plain_cache = cache.clone()
    plain = step_writing_cache(toy_decode, tokens, pos, plain_cache)  # a bare function: the step, then write_cache
    torch.testing.assert_close(plain, want_logits, rtol=0, atol=0)
    torch.testing.assert_close(plain_cache, want_cache, rtol=0, atol=0)


def test_aoti_step_writing_cache_checks_its_inputs():
    step = AOTIStep(toy_decode, toy_decode, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="tokens must be int64"):
        step.step_writing_cache(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                                torch.zeros(2, LAYERS, 4, WIDTH))
