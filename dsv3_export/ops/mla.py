"""dsv3::mla_attention: absorbed Multi-head Latent Attention over [latent cache | new positions].

    out = mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale)
        q_nope    [b, s, h, dn]     query, no-position part (dn = qk_nope_head_dim)
        q_pe      [b, s, h, r]      query, roped part (r = qk_rope_head_dim)
        kv_new    [b, s, c + r]     normalized latent | roped key of the s new positions
        kv_cache  [b, T, c + r]     the same for positions [0, T); t >= start_pos[row] is ignored
        start_pos [b]       int64   position of the first new token of each row
        wkv_b     [h * (dn + dv), c] the up-projection (W_UK | W_UV per head), dense
        -> out    [b, s, h, dv]

Why one op: the absorbed form never materializes per-head K/V; a fused kernel (FlashMLA's
layout, 576 values per cached token) reads the latent cache once for all heads. The eager body
is `dsv3_export.step.absorbed_attention`, the exact math the exported graph computes, so a
program rewritten by passes.fuse_mla_absorb still runs anywhere; the CUDA kernel registers as
this op's CUDA implementation.
"""

from __future__ import annotations

import torch

from dsv3_export.step import absorbed_attention


@torch.library.custom_op("dsv3::mla_attention", mutates_args=())
def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                  start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    return absorbed_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale).contiguous()


@mla_attention.register_fake
def _(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale):
    b, s, h, dn = q_nope.shape
    torch._check(wkv_b.shape[0] % h == 0, lambda: f"wkv_b rows {wkv_b.shape[0]} not divisible by {h} heads")
    dv = wkv_b.shape[0] // h - dn
    return q_nope.new_empty(b, s, h, dv)  # [b, s, h, dv]
