"""dsv3_export.runtime: the KV-cache writes, sampling, and generation against the reference model.

Greedy decoding must give exactly the reference model's own greedy tokens (its buffer cache,
model(tokens, start_pos)); a batch of prompts of different lengths must give the same tokens as
one prompt at a time. Prompts are fixed (seeded) so that token identity is a deterministic check.
"""

from __future__ import annotations

import pytest
import torch

from dsv3_export.manifest import Manifest, kv_cache_layout
from dsv3_export.runtime import Engine, load_engine, sample
from dsv3_export.step import LatentCacheStep, write_cache
from tests.conftest import reference_greedy
from tests.engines._ort_engines import fp32_engine_dir, tiny_model

PROMPTS = [[5, 17, 256, 999, 3, 42, 7], [11, 12], [900, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]]


class TorchStep:
    """LatentCacheStep as a StepFunction: the runtime's logic checked without any backend."""

    def __init__(self, model):
        self.step, self.device, self.cache_dtype = LatentCacheStep(model).eval(), torch.device("cpu"), torch.float32

    def __call__(self, tokens, start_pos, kv_cache):
        with torch.no_grad():
            return self.step(tokens, start_pos, kv_cache)


def torch_engine() -> Engine:
    args = tiny_model().args
    manifest = Manifest(model=args.to_dict(), backend="torch-eager", precision="fp32", device="cpu", inputs=[],
                        outputs=[], kv_cache=kv_cache_layout(args, "float32"))
    return Engine(manifest=manifest, step=TorchStep(tiny_model()), path=None)


@pytest.mark.parametrize("new_tokens", [4, 1])
def test_write_cache_writes_each_row_at_its_start(seed, new_tokens):
    """Prefill (several tokens) and decode (one); the batch may be shorter than the cache's (rows past it kept)."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(4, 2, 20, 7, generator=gen)
    new_kv = torch.randn(3, 2, new_tokens, 7, generator=gen)
    start_pos = torch.randint(0, 20 - new_tokens + 1, (3,), generator=gen)
    expected = cache.clone()
    for row, pos in enumerate(start_pos.tolist()):
        expected[row, :, pos : pos + new_tokens] = new_kv[row]
    write_cache(cache, new_kv, start_pos)
    assert torch.equal(cache, expected)


def test_write_cache_refuses_a_position_past_the_cache():
    cache, new_kv = torch.zeros(1, 2, 8, 3), torch.ones(1, 2, 2, 3)
    with pytest.raises((RuntimeError, IndexError)):
        write_cache(cache, new_kv, torch.tensor([7]))


def test_runtime_logic_with_an_eager_step_matches_reference_greedy():
    engine, model = torch_engine(), tiny_model()
    assert engine.generate(PROMPTS[0], max_new_tokens=12) == reference_greedy(model, PROMPTS[0], 12)
    assert engine.generate(PROMPTS, max_new_tokens=6) == [reference_greedy(model, p, 6) for p in PROMPTS]


class KeyedStep(TorchStep):
    """TorchStep as a step whose decode graphs are keyed by the cache buffer (engines/torch_step.py
    graphs_keyed_by_cache): it records each cache it is given."""

    graphs_keyed_by_cache = True

    def __init__(self, model):
        super().__init__(model)
        self.caches: list[torch.Tensor] = []

    def __call__(self, tokens, start_pos, kv_cache):
        self.caches.append(kv_cache)
        return super().__call__(tokens, start_pos, kv_cache)


def test_generate_keeps_one_cache_per_bucket_on_a_step_keyed_by_it(monkeypatch, seed):
    """Calls of one batch and capacity bucket get the same buffer (so the same decode graph): whatever an earlier call
    left in it changes no token (the prefill overwrites the prompt's positions, the rest is zeroed; this eager
    attention reads every position, so a NaN left anywhere would show); another bucket or batch gets a new buffer,
    and a step without graphs a fresh cache per call."""
    import dsv3_export.runtime as runtime

    monkeypatch.setattr(runtime, "GENERATE_CACHE_BUCKET", 16)
    model = tiny_model()
    engine = torch_engine()
    engine.step = KeyedStep(model)
    want = [reference_greedy(model, p, 6) for p in PROMPTS]
    assert engine.generate(PROMPTS, max_new_tokens=6) == want  # 13 + 6 - 1 positions: capacity 32
    kept = engine.step.caches[0]
    assert kept.shape[2] == 32 and all(c is kept for c in engine.step.caches)
    kept.copy_(torch.randn(kept.shape, generator=torch.Generator().manual_seed(seed)) * 1e4)  # stale rows
    kept[:, :, 20:] = float("nan")
    engine.step.caches.clear()
    assert engine.generate(PROMPTS, max_new_tokens=5) == [w[:5] for w in want]  # 17 positions: capacity 32
    assert engine.step.caches and all(c is kept for c in engine.step.caches)
    assert engine.generate(PROMPTS, max_new_tokens=4) == [w[:4] for w in want]  # 16 positions: capacity 16
    assert engine.step.caches[-1] is not kept and engine.step.caches[-1].shape[2] == 16
    engine.step.caches.clear()
    engine.generate(PROMPTS, max_new_tokens=5)  # 17: capacity 32 again (a new buffer: one is kept)
    engine.generate(PROMPTS, max_new_tokens=6)  # 18: the same
    assert len({c.data_ptr() for c in engine.step.caches}) == 1
    engine.generate(PROMPTS[:2], max_new_tokens=5)  # another batch
    assert engine.step.caches[-1].shape[0] == 2
    plain = torch_engine()
    plain.step = KeyedStep(model)
    plain.step.graphs_keyed_by_cache = False
    plain.generate(PROMPTS[1], max_new_tokens=2)
    plain.generate(PROMPTS[1], max_new_tokens=2)
    assert plain.step.caches[0] is not plain.step.caches[-1] and plain.step.caches[0].shape[2] == 3


class WritingStep(TorchStep):
    """A step with its own step_writing_cache (as the torch engine's CUDA-graph step has): generate must run every
    step through it, the prefill included; a bare call outside it fails."""

    def __init__(self, model):
        super().__init__(model)
        self.fused_calls, self._inside = 0, False

    def step_writing_cache(self, tokens, start_pos, kv_cache):
        self.fused_calls += 1
        self._inside = True
        try:
            logits, new_kv = super().__call__(tokens, start_pos, kv_cache)
        finally:
            self._inside = False
        write_cache(kv_cache, new_kv, start_pos)
        return logits

    def __call__(self, tokens, start_pos, kv_cache):
        assert self._inside, "generate called the step directly, not through step_writing_cache"
        return super().__call__(tokens, start_pos, kv_cache)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_runs_every_step_through_step_writing_cache(temperature):
    model = tiny_model()
    engine = torch_engine()
    engine.step = WritingStep(model)
    got = engine.generate(PROMPTS, max_new_tokens=5, temperature=temperature, seed=3)
    assert engine.step.fused_calls >= 5  # the prefill and at least the four decode steps
    if temperature == 0.0:
        assert got == [reference_greedy(model, p, 5) for p in PROMPTS]
    engine.generate([PROMPTS[0][:1]], max_new_tokens=3)  # a one-token prompt: its prefill is a decode step


def test_greedy_32_tokens_identical_to_reference_decoding():
    engine = load_engine(fp32_engine_dir())
    assert engine.generate(PROMPTS[0], max_new_tokens=32) == reference_greedy(tiny_model(), PROMPTS[0], 32)


def test_batch_of_different_lengths_equals_one_by_one():
    engine = load_engine(fp32_engine_dir())
    batch = engine.generate(PROMPTS, max_new_tokens=16)
    assert batch == [engine.generate(p, max_new_tokens=16) for p in PROMPTS]
    assert batch[1] == reference_greedy(tiny_model(), PROMPTS[1], 16)


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy():
    engine = torch_engine()
    a = engine.generate(PROMPTS, max_new_tokens=8, temperature=1.3, top_p=0.9, seed=7)
    assert a == engine.generate(PROMPTS, max_new_tokens=8, temperature=1.3, top_p=0.9, seed=7)
    assert all(0 <= t < 1000 for row in a for t in row)
    greedy = engine.generate(PROMPTS, max_new_tokens=8)
    assert engine.generate(PROMPTS, max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=1) == greedy


def test_sample_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, 1.0, 0.7, gen)) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there


def test_eos_stops_a_row():
    engine = torch_engine()
    free = engine.generate(PROMPTS[0], max_new_tokens=10)
    eos = free[3]
    stopped = engine.generate(PROMPTS[0], max_new_tokens=10, eos_id=eos)
    assert stopped == free[: free.index(eos) + 1]


def test_bad_requests_are_refused():
    engine = torch_engine()
    with pytest.raises(ValueError, match="exceed the engine's max_seq_len=256"):
        engine.generate([1] * 250, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1000\)"):
        engine.generate([1, 1000])
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1, 2], []])
    for temperature in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            engine.generate([1, 2], temperature=temperature)
    with pytest.raises(ValueError, match="prompt ids must be integers, got 2.5"):
        engine.generate([1, 2.5])
    # was a raw TypeError from range() (2.5) or a 1-token run (True)
    for bad in (2.5, True, 0, "4"):
        with pytest.raises(ValueError, match=rf"max_new_tokens must be an integer >= 1, got {bad!r}"):
            engine.generate([1, 2], max_new_tokens=bad)
    with pytest.raises(ValueError, match="eos_id must be an integer token id or None, got 2.0"):
        engine.generate([1, 2], eos_id=2.0)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1000\)"):
        engine.forward([[5, 17, -1]])  # (ONNX Gather would wrap -1 to the last row)
    with pytest.raises(ValueError, match="tokens must be integer ids"):
        engine.forward(torch.tensor([[1.0, 2.0]]))


def test_generate_fills_max_seq_len_exactly():
    """The last new token is returned, not fed back: a prompt of L tokens and N new ones need L + N - 1 positions, so
    a full-length prompt still gets one token, and 250 + 7 fits a 256-position engine."""
    engine = torch_engine()
    model = tiny_model()
    prompt = [(7 * i + 3) % 1000 for i in range(256)]
    assert engine.generate(prompt, max_new_tokens=1) == reference_greedy(model, prompt, 1)
    assert engine.generate(prompt[:250], max_new_tokens=7) == reference_greedy(model, prompt[:250], 7)


def test_prompts_as_tensors_and_arrays():
    """A 2-D tensor / array is one prompt per row, a 1-D one a single prompt (a [3, 1] tensor is three prompts of
    one token, not one prompt of three)."""
    import numpy as np

    engine = torch_engine()
    rows = [[1], [2], [3]]
    want = engine.generate(rows, max_new_tokens=3)
    assert engine.generate(torch.tensor(rows), max_new_tokens=3) == want
    assert engine.generate(np.array(rows), max_new_tokens=3) == want
    assert engine.generate([torch.tensor(r) for r in rows], max_new_tokens=3) == want
    assert engine.generate(torch.tensor([1, 2, 3]), max_new_tokens=3) == engine.generate([1, 2, 3], max_new_tokens=3)
    assert engine.generate(np.array([1, 2, 3]), max_new_tokens=3) == engine.generate([1, 2, 3], max_new_tokens=3)


def test_sampling_leaves_the_global_generator_alone_and_survives_a_tiny_temperature():
    engine = torch_engine()
    torch.manual_seed(1234)
    want = torch.rand(2)
    torch.manual_seed(1234)
    engine.generate([1, 2, 3], max_new_tokens=2, temperature=1.0)  # seed=None: a seed of its own
    assert torch.equal(torch.rand(2), want)
    greedy = engine.generate(PROMPTS, max_new_tokens=4)
    assert engine.generate(PROMPTS, max_new_tokens=4, temperature=1e-40, seed=0) == greedy  # logits / T: no inf - inf


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_greedy_queues_the_next_step_before_reading_the_token(monkeypatch, temperature):
    """Greedy: step n+1 is queued before the host reads token n (on a GPU the host's bookkeeping
    overlaps the device's step; tokens unchanged, one step queued past an end-of-sequence stop).
    Sampling reads the logits on the host, so it alternates."""
    import dsv3_export.runtime as runtime

    engine, events = torch_engine(), []
    call = TorchStep.__call__
    monkeypatch.setattr(TorchStep, "__call__", lambda self, tokens, pos, cache: (
        events.append(f"step{tokens.shape[1]}"), call(self, tokens, pos, cache))[1])
    read = runtime._HostCopy.values
    monkeypatch.setattr(runtime._HostCopy, "values", lambda self: (events.append("read"), read(self))[1])
    tokens = engine.generate(PROMPTS[0], max_new_tokens=4, temperature=temperature, seed=3)
    assert len(tokens) == 4
    prefill = f"step{len(PROMPTS[0])}"
    if temperature == 0.0:
        assert tokens == reference_greedy(tiny_model(), PROMPTS[0], 4)
        assert events == [prefill, "step1", "read", "step1", "read", "step1", "read", "read"], events
        events.clear()
        eos = tokens[1]
        assert engine.generate(PROMPTS[0], max_new_tokens=4, eos_id=eos) == tokens[:tokens.index(eos) + 1]
        assert events.count("step1") == tokens.index(eos) + 1, events  # one queued past the stop
    else:
        assert events == [prefill, "read", "step1", "read", "step1", "read", "step1", "read"], events
