"""DebugLatentCacheStep computes exactly LatentCacheStep, and its stages are the reference model's modules."""

from __future__ import annotations

import torch

from dsv3_export.checkpoint import preset_model
from dsv3_export.debug_step import DebugLatentCacheStep, stage_names
from dsv3_export.export import static_moe
from dsv3_export.reports.reference import reference_stages
from dsv3_export.step import LatentCacheStep


def test_debug_step_matches_step_and_reference(seed):
    model = preset_model("tiny", torch.float32, "cpu", seed=seed % 1000)
    g = torch.Generator().manual_seed(seed)
    b, s, cache_len = 2, 7, 11
    tokens = torch.randint(0, model.args.vocab_size, (b, s), generator=g)
    start = torch.zeros(b, dtype=torch.int64)
    step = LatentCacheStep(model)
    cache = step.empty_cache(b, cache_len, torch.float32)
    with torch.no_grad(), static_moe(model):
        logits, new_kv = step(tokens, start, cache)
        d_logits, d_kv, hidden = DebugLatentCacheStep(model)(tokens, start, cache)
    assert torch.equal(logits, d_logits) and torch.equal(new_kv, d_kv)
    L = model.args.n_layers
    assert hidden.shape == (b, L + 2, s, model.args.dim) and len(stage_names(L)) == L + 2
    ref_logits, ref_hidden = reference_stages(model, tokens)  # eager model, MoE loop, forward hooks
    torch.testing.assert_close(ref_hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(hidden[:, 0], model.embed(tokens))
