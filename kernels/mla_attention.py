"""Absorbed MLA attention over the latent cache: split-KV decode and causal prefill.

In absorbed MLA every head attends to the same per-token cache row: the normalized latent
kv [C = kv_lora_rank] (key and value at once) and the roped key part pe [R]. With the query
already folded through W_UK:
    score[h, t] = (q_latent[h] . kv[t] + q_pe[h] . pe[t]) * softmax_scale
    out[h]      = sum_t softmax_t(score[h, :]) kv[t]                     (the latent, C wide)
W_UV is applied afterwards by the caller (dsv3_export.reference.attention.MLA.attend_absorb).

Layouts: q_latent [B, H, C] (decode) / [B, S_q, H, C] (prefill), q_pe likewise with R,
kv_cache [Bmax, S, C], pe_cache [Bmax, S, R]; batch row b uses cache row b; unit stride on the
last dim only, so views of one FlashMLA-style [B, S, C + R] cache (cache[..., :C], cache[..., C:])
work as they are. Outputs take q_latent's dtype; softmax and accumulation are fp32 (fp32 inputs
go through TF32 tensor cores on the GPU; bf16 is the intended dtype).

Keys of batch row b: cache positions t < len_b, then optionally the new tokens kv_new/pe_new
(not yet written to the cache; dsv3::mla_attention is functional): decode's one new token is key
len_b; prefill's new token u is key start_b + u and query i sees u <= i. Without kv_new the new
tokens must already be in the cache.

Decode lives in kernels/mla_decode.py (split-KV flash-decoding, a reduce kernel merges the
splits; its Triton kernels in kernels/mla_decode_kernels.py), prefill in kernels/mla_prefill.py
(causal). This module is the family's entry point: what both share (DTYPES, LOG2E, the input
checks), the pure-torch references, and every name of the kernel modules, re-exported (see
_REEXPORTS), so `from dsv3_export.kernels.mla_attention import mla_decode` and
`mla_attention.DECODE_CONFIGS` keep working.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from dsv3_export.kernels._common import check_tensor
from dsv3_export.reference.attention import causal_mask

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LOG2E = 1.4426950408889634


def _check_caches(op: str, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                  pe_cache: torch.Tensor, batch: int) -> tuple[int, int]:
    dev = q_latent.device
    check_tensor(f"{op}: q_latent", q_latent, dtypes=DTYPES)
    check_tensor(f"{op}: q_pe", q_pe, dtypes=(q_latent.dtype,), ndim=q_latent.dim(), device=dev)
    check_tensor(f"{op}: kv_cache", kv_cache, dtypes=(q_latent.dtype,), ndim=3, device=dev)
    check_tensor(f"{op}: pe_cache", pe_cache, dtypes=(q_latent.dtype,), ndim=3, device=dev)
    c, r = q_latent.shape[-1], q_pe.shape[-1]
    if q_pe.shape[:-1] != q_latent.shape[:-1]:
        raise ValueError(f"{op}: q_pe {tuple(q_pe.shape)} and q_latent {tuple(q_latent.shape)} differ before the last dim")
    if kv_cache.shape[-1] != c or pe_cache.shape[-1] != r or kv_cache.shape[:2] != pe_cache.shape[:2]:
        raise ValueError(f"{op}: kv_cache {tuple(kv_cache.shape)} must be [Bmax, S, C={c}] and pe_cache "
                         f"{tuple(pe_cache.shape)} [Bmax, S, R={r}] with the same Bmax, S")
    if kv_cache.shape[0] < batch:
        raise ValueError(f"{op}: batch {batch} exceeds the cache's {kv_cache.shape[0]} rows")
    for name, t in (("q_latent", q_latent), ("q_pe", q_pe), ("kv_cache", kv_cache), ("pe_cache", pe_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs unit stride on its last dim, got strides {t.stride()}")
    return c, r


def _check_new(op: str, kv_new: torch.Tensor | None, pe_new: torch.Tensor | None, q_latent: torch.Tensor,
               shape_c: tuple[int, ...], shape_r: tuple[int, ...]) -> bool:
    """Validate the optional new-token keys; True when they are given."""
    if (kv_new is None) != (pe_new is None):
        raise ValueError(f"{op}: pass both kv_new and pe_new, or neither")
    if kv_new is None:
        return False
    for name, t, shape in (("kv_new", kv_new, shape_c), ("pe_new", pe_new, shape_r)):
        check_tensor(f"{op}: {name}", t, dtypes=(q_latent.dtype,), device=q_latent.device)
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must be {shape}, got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs unit stride on its last dim, got strides {t.stride()}")
    return True


# ---------------------------------------------------------------------------------------------
# pure-torch references (the einsum math of MLA.attend_absorb, in fp32)


def _attend_ref(q: torch.Tensor, qp: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, scale: float,
                mask: torch.Tensor | None) -> torch.Tensor:
    """q [s, h, c], qp [s, h, r], kv [t, c], pe [t, r] -> [s, h, c] fp32."""
    scores = (torch.einsum("shc,tc->sht", q.float(), kv.float())
              + torch.einsum("shr,tr->sht", qp.float(), pe.float())) * scale
    if mask is not None:
        scores = scores + mask.unsqueeze(1)  # [s, t] -> [s, 1, t]
    return torch.einsum("sht,tc->shc", scores.softmax(dim=-1), kv.float())


def mla_decode_ref(q_latent, q_pe, kv_cache, pe_cache, cache_seqlens, softmax_scale, *, kv_new=None,
                   pe_new=None) -> torch.Tensor:
    out = torch.zeros(q_latent.shape, dtype=torch.float32, device=q_latent.device)
    for b, n in enumerate(cache_seqlens.tolist()):
        n = min(max(n, 0), kv_cache.shape[1])  # the kernels' clamp (lengths may be the step's start_pos as it is)
        kv, pe = kv_cache[b, :n], pe_cache[b, :n]
        if kv_new is not None:
            kv, pe = torch.cat([kv, kv_new[b, None]]), torch.cat([pe, pe_new[b, None]])
        if kv.shape[0] > 0:
            out[b] = _attend_ref(q_latent[b, None], q_pe[b, None], kv, pe, softmax_scale, None)[0]
    return out.to(q_latent.dtype)


def mla_prefill_ref(q_latent, q_pe, kv_cache, pe_cache, start_pos, softmax_scale, *, kv_new=None,
                    pe_new=None) -> torch.Tensor:
    bsz, s_q = q_latent.shape[:2]
    starts = start_pos.tolist() if isinstance(start_pos, torch.Tensor) else [start_pos] * bsz
    out = []
    for b, start in enumerate(starts):
        end = start + s_q
        kv, pe = kv_cache[b, :end], pe_cache[b, :end]
        if kv_new is not None:
            kv, pe = torch.cat([kv_cache[b, :start], kv_new[b]]), torch.cat([pe_cache[b, :start], pe_new[b]])
        mask = causal_mask(s_q, start, end, q_latent.device)
        out.append(_attend_ref(q_latent[b], q_pe[b], kv, pe, softmax_scale, mask))
    return torch.stack(out).to(q_latent.dtype)


# The kernel modules' names, by module. Resolved on first access (PEP 562 module __getattr__), not
# imported here: mla_decode and mla_prefill import this module's checks, so importing them at the top
# would be an import cycle whichever module is imported first. Each name is the kernel module's own
# object, read when accessed: module state (DECODE_CONFIGS, _decode_chosen) lives in mla_decode alone,
# and is changed there (mla_decode.DECODE_CONFIGS = ...), not here.
_REEXPORTS = {
    "mla_decode": ("DECODE_CONFIGS", "_decode_tuned", "_decode_chosen", "decode_config", "mla_decode"),
    "mla_decode_kernels": ("_mla_decode_split_kernel", "_mla_decode_reduce_kernel"),
    "mla_splits": (
        "MAX_SPLITS", "MIN_BLOCK_H", "MAX_BLOCK_H", "DECODE_PROGRAMS_PER_SM", "MIN_SPLIT_KEYS",
        "SPLIT_OVERHEAD_KEYS", "choose_num_splits", "_num_splits", "_block_h",
    ),
    "mla_prefill": (
        "PREFILL_CONFIGS", "_load_keys", "_attend_tile", "_mla_prefill_kernel", "_prefill_tuned", "mla_prefill",
    ),
}
_MODULE_OF = {name: module for module, names in _REEXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    """A kernel module's name (mla_decode, DECODE_CONFIGS, _mla_prefill_kernel...), from that module."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"dsv3_export.kernels.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
