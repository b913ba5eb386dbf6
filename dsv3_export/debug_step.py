"""A LatentCacheStep that also returns the hidden state after every stage, for `dsv3-export diff`.

    step = DebugLatentCacheStep(model)
    logits, new_kv, hidden = step(tokens, start_pos, kv_cache)
        hidden [b, L + 2, s, dim]   stage outputs in model order: the embedding, each of the L
                                    blocks (after its ffn residual), the final norm

Why a separate step and not hooks: an engine is a compiled graph with no modules left to hook.
`diff` therefore builds a debug engine from the same source through the same export, passes and
backend (build_engine(..., step_factory=DebugLatentCacheStep)); its extra output, compared with
the reference model's per-module outputs (forward hooks), names the first stage that goes wrong.
The computation is LatentCacheStep's, stage for stage; tests/reports/test_debug_step.py checks
that logits and new_kv are identical to it.
"""

from __future__ import annotations

import torch

from dsv3_export.step import LatentCacheStep, mla_step

HIDDEN_OUTPUT = "hidden"


def stage_names(n_layers: int) -> list[str]:
    """Names of hidden's L + 2 stages, as the reference model's module names: embed, layers.i, norm."""
    return ["embed", *(f"layers.{i}" for i in range(n_layers)), "norm"]


class DebugLatentCacheStep(LatentCacheStep):
    """LatentCacheStep with a third output: the hidden state after each stage (see module docstring)."""

    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor,
                kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s = tokens.shape
        positions = start_pos[:, None] + torch.arange(s, device=tokens.device)  # [b, s]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [b, s, r/2]
        h = self.embed(tokens)  # [b, s, dim]
        stages, new_kv = [h], []
        for i, layer in enumerate(self.layers):
            attn_out, kv_new = mla_step(layer.attn, layer.attn_norm(h), cos, sin, kv_cache[:, i], start_pos)
            h = h + attn_out
            h = h + layer.ffn(layer.ffn_norm(h))
            new_kv.append(kv_new)
            stages.append(h)
        normed = self.norm(h)
        stages.append(normed)
        logits = self.head(normed).float()  # [b, s, vocab]
        return logits, torch.stack(new_kv, dim=1), torch.stack(stages, dim=1)  # [b, L, s, w], [b, L + 2, s, dim]
