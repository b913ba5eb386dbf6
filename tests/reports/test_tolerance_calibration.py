"""The bf16 entry of the tolerance table accepts bf16 rounding and still catches a real bug.

Eager stand-in for a bf16 engine: the reference model in bf16 (weights rounded to bf16) against
the fp32 reference, stage by stage, as `diff` compares them.
"""

from __future__ import annotations

import numpy as np
import torch

from dsv3_export.checkpoint import preset_model
from dsv3_export.debug_step import stage_names
from dsv3_export.reports import metrics
from dsv3_export.reports.reference import reference_stages
from dsv3_export.reports.tolerances import default_tolerances

N_LAYERS = 6


def _first_failing(ref_model, test_model, tokens) -> tuple[str | None, dict]:
    tol = default_tolerances("bf16", "cuda")
    rl, rh = reference_stages(ref_model, tokens)
    tl, th = reference_stages(test_model, tokens)
    names = stage_names(N_LAYERS)
    failing = [n for i, n in enumerate(names)  # depth of stage i is i + 1, as in diff
               if not metrics.error_stats(rh[:, i].flatten(0, 1), th[:, i].flatten(0, 1),
                                          tol.tensor.at_depth(i + 1)).passed]
    kl = metrics.kl_per_position(rl.flatten(0, 1), tl.flatten(0, 1))
    top1 = metrics.top1_match(rl.flatten(0, 1), tl.flatten(0, 1)).mean()
    logits_ok = (metrics.error_stats(rl.flatten(0, 1), tl.flatten(0, 1), tol.tensor.at_depth(len(names) + 1)).passed
                 and kl.mean() <= tol.logits.max_kl_mean and np.percentile(kl, 99) <= tol.logits.max_kl_p99
                 and top1 >= tol.logits.min_top1)
    if not logits_ok:
        failing.append("logits")
    return (failing[0] if failing else None), {"kl": float(kl.mean()), "top1": float(top1)}


def test_bf16_rounding_passes_and_a_bug_fails(seed):
    weights_seed = seed % 10_000
    tokens = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(seed))
    ref = preset_model("tiny", torch.float32, "cpu", seed=weights_seed, n_layers=N_LAYERS)
    bf16 = preset_model("tiny", torch.bfloat16, "cpu", seed=weights_seed, n_layers=N_LAYERS)
    first, info = _first_failing(ref, bf16, tokens)
    assert first is None, f"bf16 rounding alone fails at {first} ({info})"
    with torch.no_grad():
        bf16.layers[3].attn.wo.weight.mul_(1.25)  # a wrong scale in one projection of layer 3
    first, _ = _first_failing(ref, bf16, tokens)
    assert first == "layers.3"
