"""Tensor names: HuggingFace <-> ours (DeepSeek's convert.py table), fused experts, rope row order.

Ours are DeepSeek's names: `layers.3.attn.wkv_a.weight`, `layers.3.ffn.experts.7.w1.scale`,
`layers.3.ffn.gate.bias`. HF's are `model.layers.3.self_attn.kv_a_proj_with_mqa.weight`,
`model.layers.3.mlp.experts.7.gate_proj.weight_scale_inv`, `...mlp.gate.e_score_correction_bias`.
transformers 5 keeps experts as fused 3-D parameters in memory (`mlp.experts.gate_up_proj`
[E, 2I, D] = gate rows then up rows, `mlp.experts.down_proj` [E, D, I]) but save_pretrained writes
the per-expert names; both load here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# HF module name -> ours, one path component at a time.
HF_TO_OURS = {
    "embed_tokens": "embed", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn": "attn", "mlp": "ffn", "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b",
    "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "head",
    "weight_scale_inv": "scale", "e_score_correction_bias": "bias",
}
OURS_TO_HF = {v: k for k, v in HF_TO_OURS.items()}
# Components that are spelled the same on both sides.
_SAME = frozenset({"layers", "experts", "shared_experts", "gate", "norm", "weight"})
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Piece:
    """Our tensor `name` is `index` of the stored tensor (None: all of it).

    whole: the shape the stored tensor must have for `index` to mean what it says (a fused expert tensor
    [E, 2I, D] / [E, D, I]); a slice of a larger or smaller tensor would load part of it, or fail to index.
    """

    name: str
    index: tuple | None = None
    whole: tuple[int, ...] | None = None


def layer_of(hf_name: str) -> int | None:
    m = _LAYER.match(hf_name)
    return int(m.group(1)) if m else None


def hf_to_ours(hf_name: str, n_experts: int, moe_inter_dim: int, dim: int) -> list[Piece] | None:
    """Our name(s) for one stored HF tensor, or None when it has no counterpart."""
    fused = _FUSED.match(hf_name)
    if fused:
        layer, kind = fused.groups()
        prefix = f"layers.{layer}.ffn.experts"
        i = moe_inter_dim
        if kind == "down_proj":  # [E, D, I]
            whole = (n_experts, dim, i)
            return [Piece(f"{prefix}.{e}.w2.weight", (e,), whole) for e in range(n_experts)]
        whole = (n_experts, 2 * i, dim)  # [E, 2I, D]: gate rows [0, I), up rows [I, 2I)
        return [p for e in range(n_experts) for p in (Piece(f"{prefix}.{e}.w1.weight", (e, slice(0, i)), whole),
                                                        Piece(f"{prefix}.{e}.w3.weight", (e, slice(i, 2 * i)), whole))]
    parts = hf_name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    elif parts[0] != "lm_head":
        return None
    out = []
    for part in parts:
        if part in HF_TO_OURS:
            out.append(HF_TO_OURS[part])
        elif part in _SAME or part.isdigit():
            out.append(part)
        else:
            return None
    return [Piece(".".join(out))]


def ours_to_hf(name: str) -> str:
    """HF name of one of our tensors (per-expert layout, as save_pretrained writes it)."""
    parts = [OURS_TO_HF.get(p, p) for p in name.split(".")]
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def rope_row_permutation(name: str, n_rows: int, n_heads: int, qk_nope: int, qk_rope: int,
                         kv_lora_rank: int) -> torch.Tensor | None:
    """Row order taking HF's rotate_half layout (rope_interleave=False) to DeepSeek's interleaved pairs.

    rotate_half pairs dims (i, i + r/2) with frequency i; DeepSeek pairs (2i, 2i + 1). So our rope
    row 2i is HF's row i and our row 2i+1 is HF's row i + r/2, in every head of the query
    projection (wq / wq_b) and in the key rope rows of wkv_a. None for other tensors.
    """
    half = torch.arange(qk_rope // 2)
    within = torch.stack((half, half + qk_rope // 2), dim=1).flatten()  # [r]: 0, r/2, 1, r/2+1, ...
    perm = torch.arange(n_rows)
    if re.search(r"\.attn\.(wq|wq_b)\.weight$", name):
        head = qk_nope + qk_rope
        for h in range(n_heads):
            start = h * head + qk_nope
            perm[start:start + qk_rope] = start + within
        return perm
    if name.endswith(".attn.wkv_a.weight"):
        perm[kv_lora_rank:kv_lora_rank + qk_rope] = kv_lora_rank + within
        return perm
    return None
