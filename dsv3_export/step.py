"""The exportable form of a Transformer: one step over an explicit latent KV cache.

    step = LatentCacheStep(model)          # shares the model's modules and weights
    logits, new_kv = step(tokens, start_pos, kv_cache)
        tokens    [b, s]            int64
        start_pos [b]               int64   position of tokens[:, 0] for each row
        kv_cache  [b, L, T, c + r]  model dtype: per layer, the normalized latent (c =
                                    kv_lora_rank) and the roped key (r = qk_rope_head_dim) of
                                    positions [0, T); entries at t >= start_pos[row] are ignored
        logits    [b, s, vocab]     float32
        new_kv    [b, L, s, c + r]  cache entries of the s new positions, for the caller to write
                                    at [start_pos, start_pos + s)

Why explicit input/output instead of mutated buffers (DeepSeek's design, our reference model):
ONNX and TensorRT have no in-place buffer semantics, so a mutated buffer would turn into a
scatter that copies the whole cache on every step. Here the graph only reads the cache and
returns the s new rows; the runtime owns the cache and writes those rows in place (O(s) per
step, IOBinding on CUDA). Attention therefore runs over two key blocks, the cache (masked at
t >= start_pos) and the new positions (causal), with one softmax over both: no concatenation of
the cache either. The cache is 576 values per token and layer for the 16b model (FlashMLA's
layout), against 5120 for naive K/V.

Per-row start positions let one batch hold prompts of different lengths: prefill right-padded
prompts at start_pos 0, then decode each row at its own position; padded entries are later
overwritten before any query can see them (a query at p sees only t <= p).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.attention import MLA
from dsv3_export.reference.layers import apply_rotary_emb
from dsv3_export.reference.model import Transformer


def absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                       start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Absorbed MLA attention over [cache | new]: the math of dsv3::mla_attention.

    q_nope [b, s, h, dn], q_pe [b, s, h, r] (roped), kv_new [b, s, c + r], kv_cache [b, T, c + r],
    start_pos [b] int64, wkv_b [h * (dn + dv), c] -> out [b, s, h, dv].
    """
    b, s, h, dn = q_nope.shape
    c = wkv_b.shape[-1]
    t_len = kv_cache.shape[1]
    wkv_b = wkv_b.view(h, -1, c)  # [h, dn + dv, c]
    w_uk, w_uv = wkv_b[:, :dn], wkv_b[:, dn:]  # [h, dn, c], [h, dv, c]
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [b, s, h, c]
    q = torch.cat([q_latent, q_pe], dim=-1)  # [b, s, h, c + r]
    scores_past = torch.einsum("bshk,btk->bsht", q, kv_cache) * softmax_scale  # [b, s, h, T]
    scores_new = torch.einsum("bshk,buk->bshu", q, kv_new) * softmax_scale  # [b, s, h, s]
    t = torch.arange(t_len, device=q.device)
    past_visible = t[None, :] < start_pos[:, None]  # [b, T]
    new_visible = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()  # [s, u]
    scores_past = scores_past.masked_fill(~past_visible[:, None, None, :], float("-inf"))
    scores_new = scores_new.masked_fill(~new_visible[None, :, None, :], float("-inf"))
    probs = torch.cat([scores_past, scores_new], dim=-1).softmax(dim=-1, dtype=torch.float32).type_as(q)
    p_past, p_new = torch.split(probs, [t_len, s], dim=-1)  # [b, s, h, T], [b, s, h, s]
    out_latent = (torch.einsum("bsht,btc->bshc", p_past, kv_cache[..., :c])
                  + torch.einsum("bshu,buc->bshc", p_new, kv_new[..., :c]))  # [b, s, h, c]
    return torch.einsum("bshc,hdc->bshd", out_latent, w_uv)  # [b, s, h, dv]


def naive_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                    start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Naive MLA attention over [cache | new], for attn_impl="naive" models: the same inputs and
    the same function as absorbed_attention, but every latent (cached and new) is expanded
    through wkv_b into per-head K/V first, as DeepSeek's naive path does. The cache is still the
    latent one; passes.fuse_mla_absorb turns this subgraph into dsv3::mla_attention as well.
    """
    b, s, h, dn = q_nope.shape
    c = wkv_b.shape[-1]
    t_len = kv_cache.shape[1]
    kv_all = torch.cat([kv_cache, kv_new], dim=1)  # [b, T + s, c + r]
    kv = torch.einsum("btc,hec->bthe", kv_all[..., :c], wkv_b.view(h, -1, c))  # [b, T + s, h, dn + dv]
    k_nope, v = kv[..., :dn], kv[..., dn:]  # [b, T + s, h, dn], [b, T + s, h, dv]
    k_pe = kv_all[..., c:].unsqueeze(2).expand(-1, -1, h, -1)  # [b, T + s, h, r]
    k = torch.cat([k_nope, k_pe], dim=-1)  # [b, T + s, h, dn + r]
    q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, dn + r]
    scores = torch.einsum("bshd,bthd->bsht", q, k) * softmax_scale  # [b, s, h, T + s]
    t = torch.arange(t_len, device=q.device)
    past_visible = (t[None, :] < start_pos[:, None])[:, None, :].expand(-1, s, -1)  # [b, s, T]
    new_visible = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()[None].expand(b, -1, -1)  # [b, s, s]
    visible = torch.cat([past_visible, new_visible], dim=-1)  # [b, s, T + s]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).type_as(q)
    return torch.einsum("bsht,bthd->bshd", probs, v)  # [b, s, h, dv]


ATTENTION_BY_IMPL = {"absorb": absorbed_attention, "naive": naive_attention}


def mla_step(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
             start_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, s, dim] -> (attention output [b, s, dim], new cache entries [b, s, c + r])."""
    b, s, _ = x.shape
    q = attn.project_q(x).view(b, s, attn.n_heads, attn.qk_head_dim)  # [b, s, h, dq]
    q_nope, q_pe = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    q_pe = apply_rotary_emb(q_pe, cos, sin)
    kv = attn.wkv_a(x)  # [b, s, c + r]
    latent, k_pe = torch.split(kv, [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    k_pe = apply_rotary_emb(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # [b, s, r]
    kv_new = torch.cat([attn.kv_norm(latent), k_pe], dim=-1)  # [b, s, c + r]
    attend = ATTENTION_BY_IMPL[attn.attn_impl]
    out = attend(q_nope, q_pe, kv_new, kv_cache, start_pos, attn.wkv_b.dense_weight(x.dtype), attn.softmax_scale)
    return attn.wo(out.flatten(2)), kv_new


class LatentCacheStep(nn.Module):
    """A prefill or decode step of `model` with the latent cache as explicit input and output.

    Holds the model's own embed/layers/norm/head modules, so parameter names (and the exported
    program's state dict) are the checkpoint's names. The cache is the latent one whatever the
    model's attn_impl: a naive-mode model attends with naive_attention over it (same function).
    """

    def __init__(self, model: Transformer):
        super().__init__()
        self.args = model.args
        self.embed, self.layers, self.norm, self.head = model.embed, model.layers, model.norm, model.head
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def empty_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        return empty_cache(self.args, batch, length, dtype, device)

    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor,
                kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = tokens.shape
        positions = start_pos[:, None] + torch.arange(s, device=tokens.device)  # [b, s]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [b, s, r/2]
        h = self.embed(tokens)  # [b, s, dim]
        new_kv = []
        for i, layer in enumerate(self.layers):
            attn_out, kv_new = mla_step(layer.attn, layer.attn_norm(h), cos, sin, kv_cache[:, i], start_pos)
            h = h + attn_out
            h = h + layer.ffn(layer.ffn_norm(h))
            new_kv.append(kv_new)
        logits = self.head(self.norm(h)).float()  # [b, s, vocab]
        return logits, torch.stack(new_kv, dim=1)  # [b, L, s, c + r]


def empty_cache(args: ModelArgs, batch: int, length: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed latent cache [batch, L, length, latent_cache_width]: the layout every step reads."""
    return torch.zeros(batch, args.n_layers, length, args.latent_cache_width, dtype=dtype, device=device)


def write_cache(kv_cache: torch.Tensor, new_kv: torch.Tensor, start_pos: torch.Tensor) -> None:
    """kv_cache[r, :, start_pos[r] + j] = new_kv[r, :, j] for every row r < b and j < s.

    new_kv [b, L, s, w] into kv_cache [B, L, T, w], in one scatter along T (no host sync, no loop). A decode step's
    one token (s = 1) needs no index tensor of its own: one kernel per step, where the index_put this replaced took
    four on CUDA (two aranges and an add building its indices; every step of `generate` runs it).
    """
    b, layers, s, w = new_kv.shape
    cols = start_pos.to(device=kv_cache.device, dtype=torch.int64).view(b, 1, 1, 1)
    if s > 1:
        cols = cols + torch.arange(s, device=kv_cache.device).view(1, 1, s, 1)  # [b, 1, s, 1]
    kv_cache[:b].scatter_(2, cols.expand(b, layers, s, w), new_kv)


def step_writing_cache(step, tokens: torch.Tensor, start_pos: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """One step's logits [b, s, V] with its new latent rows written into kv_cache at start_pos.

    A step that can do both in one call (its own `step_writing_cache`: the torch engine's decode CUDA graphs replay
    the write with the step) does; any other step runs, then write_cache. Why: on a captured decode step the host's
    scatter launch and new_kv copy were most of the work around the graph, paid on every token.
    """
    fused = getattr(step, "step_writing_cache", None)
    if fused is not None:
        return fused(tokens, start_pos, kv_cache)
    logits, new_kv = step(tokens, start_pos, kv_cache)
    write_cache(kv_cache, new_kv, start_pos)
    return logits
