"""Multi-head Latent Attention (MLA), naive and absorbed, as in DeepSeek's inference/model.py.

naive:  expands the latent through wkv_b into per-head K/V and caches them
        (k_cache [B, S, H, qk_head_dim], v_cache [B, S, H, v_head_dim]).
absorb: caches only the normalized latent and the roped key part
        (kv_cache [B, S, kv_lora_rank], pe_cache [B, S, qk_rope_head_dim]) and folds wkv_b into the
        query (W_UK) and the output (W_UV). This is the form dsv3::mla_attention computes.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.layers import Linear, RMSNorm, apply_rotary_emb


def causal_mask(seqlen: int, start_pos: int, end_pos: int, device: torch.device) -> torch.Tensor | None:
    """[s, end_pos] additive mask: query i (at start_pos + i) sees keys t <= start_pos + i."""
    if seqlen == 1:
        return None
    return torch.full((seqlen, end_pos), float("-inf"), device=device).triu_(start_pos + 1)


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = args.softmax_scale
        self.attn_impl = args.attn_impl
        lin = dict(fp8=args.dtype == "fp8", dtype=dtype, block_size=args.block_size)

        if self.q_lora_rank == 0:
            self.wq = Linear(args.dim, self.n_heads * self.qk_head_dim, **lin)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank, **lin)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps, dtype)
            self.wq_b = Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, **lin)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, **lin)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps, dtype)
        self.wkv_b = Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), **lin)
        self.wo = Linear(self.n_heads * self.v_head_dim, args.dim, **lin)

        cache = (args.max_batch_size, args.max_seq_len)
        if self.attn_impl == "naive":
            self.register_buffer("k_cache", torch.zeros(*cache, self.n_heads, self.qk_head_dim, dtype=dtype), persistent=False)
            self.register_buffer("v_cache", torch.zeros(*cache, self.n_heads, self.v_head_dim, dtype=dtype), persistent=False)
        else:
            self.register_buffer("kv_cache", torch.zeros(*cache, self.kv_lora_rank, dtype=dtype), persistent=False)
            self.register_buffer("pe_cache", torch.zeros(*cache, self.qk_rope_head_dim, dtype=dtype), persistent=False)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank == 0:
            return self.wq(x)
        return self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        q = self.project_q(x).view(bsz, seqlen, self.n_heads, self.qk_head_dim)  # [b, s, h, dq]
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, cos, sin)  # [b, s, h, r]
        kv = self.wkv_a(x)  # [b, s, c + r]
        kv, k_pe = torch.split(kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), cos, sin)  # [b, s, 1, r]
        mask = causal_mask(seqlen, start_pos, end_pos, x.device)
        if self.attn_impl == "naive":
            out = self.attend_naive(x, q_nope, q_pe, kv, k_pe, start_pos, end_pos, mask)
        else:
            out = self.attend_absorb(x, q_nope, q_pe, kv, k_pe, start_pos, end_pos, mask)
        return self.wo(out.flatten(2))  # [b, s, dim]

    def attend_naive(self, x, q_nope, q_pe, kv, k_pe, start_pos, end_pos, mask):
        bsz, seqlen = x.shape[:2]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, dq]
        kv = self.wkv_b(self.kv_norm(kv)).view(bsz, seqlen, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)  # [b, s, h, dq]
        self.k_cache[:bsz, start_pos:end_pos] = k
        self.v_cache[:bsz, start_pos:end_pos] = v
        scores = torch.einsum("bshd,bthd->bsht", q, self.k_cache[:bsz, :end_pos]) * self.softmax_scale
        if mask is not None:
            scores = scores + mask.unsqueeze(1)  # [s, t] -> [s, 1, t]
        scores = scores.softmax(dim=-1, dtype=torch.float32).type_as(x)
        return torch.einsum("bsht,bthd->bshd", scores, self.v_cache[:bsz, :end_pos])  # [b, s, h, dv]

    def attend_absorb(self, x, q_nope, q_pe, kv, k_pe, start_pos, end_pos, mask):
        bsz = x.shape[0]
        wkv_b = self.wkv_b.dense_weight(x.dtype).view(self.n_heads, -1, self.kv_lora_rank)  # [h, dn + dv, c]
        w_uk = wkv_b[:, : self.qk_nope_head_dim]  # [h, dn, c]
        w_uv = wkv_b[:, -self.v_head_dim :]  # [h, dv, c]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [b, s, h, c]
        self.kv_cache[:bsz, start_pos:end_pos] = self.kv_norm(kv)
        self.pe_cache[:bsz, start_pos:end_pos] = k_pe.squeeze(2)
        scores = (torch.einsum("bshc,btc->bsht", q_latent, self.kv_cache[:bsz, :end_pos])
                  + torch.einsum("bshr,btr->bsht", q_pe, self.pe_cache[:bsz, :end_pos])) * self.softmax_scale
        if mask is not None:
            scores = scores + mask.unsqueeze(1)
        scores = scores.softmax(dim=-1, dtype=torch.float32).type_as(x)
        out_latent = torch.einsum("bsht,btc->bshc", scores, self.kv_cache[:bsz, :end_pos])  # [b, s, h, c]
        return torch.einsum("bshc,hdc->bshd", out_latent, w_uv)  # [b, s, h, dv]
