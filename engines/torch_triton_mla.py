"""The MLA triton_op: dsv3::mla_attention as kernels/mla_*.py launches (absorbed projections, decode, prefill).

    dsv3_aoti::mla_attention   W_UK absorbed into the query, then kernels/mla_attention.py over [cache | new keys]
                               (split-KV mla_decode in the decode program, causal mla_prefill in prefill; the new
                               keys passed separately, the cache only read), then W_UV. The decode program's W_UK
                               and W_UV are kernels/mla_absorb.py head_gemm (one launch each on the strided views;
                               DSV3_TORCH_ABSORB_GEMM=0: einsums), W_UV at batch <= 2 its CUDA-core form head_gemv
                               (DSV3_TORCH_HEAD_GEMV), there with mla_decode's split merge in its launch
                               (kernels/mla_merge_uv.py, DSV3_TORCH_MERGE_UV); prefill's are einsums.

engines/torch_triton.py triton_lowerings maps dsv3::mla_attention here (bf16/fp16; fp32 keeps ATen: the kernels'
fp32 dots would be TF32); the switches below are read when a program is lowered.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.library import triton_op

from dsv3_export.engines import torch_launch
from dsv3_export.engines.torch_decode_gemv import gated, prefetch_before_wait
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels import fp8_gemv as kv
from dsv3_export.kernels import mla_absorb as ka
from dsv3_export.kernels import mla_decode as kd
from dsv3_export.kernels import mla_merge_uv as km_uv
from dsv3_export.kernels import mla_prefill as kp
from dsv3_export.kernels import mla_query as kq

# The decode program's absorbed MLA projections (q_nope @ W_UK, lat @ W_UV per head): `1` (default)
# kernels/mla_absorb.py head_gemm, one launch each reading the strided activation and weight views;
# `0` the einsums (Inductor: a permute copy + cuBLAS bmm + a copy each, ~9 us per layer for both in
# the 16b batch-1 decode profile). Read when a program is lowered; prefill keeps the einsums (cuBLAS
# wins at large M).
ABSORB_ENV = "DSV3_TORCH_ABSORB_GEMM"


def absorb_gemm_on() -> bool:
    return env_choice(ABSORB_ENV, "1", {"1": "head_gemm kernel, decode program", "0": "einsums"}) == "1"


# The decode program's W_UV projection at batch <= 2 (with DSV3_TORCH_DECODE_GEMV on): `1` (default)
# kernels/mla_absorb.py head_gemv (CUDA-core FMAs, one row per program), head_gemm above, each launch gated by
# the batch; `0` head_gemm at every batch. Read when a program is lowered. Session 18 (H200, 27-layer batch-1
# profile): 2.3 us per call (62 us per step), where head_gemm took 3.1-4.2 us per call on average over W_UK
# and W_UV in the builds without it.
HEAD_GEMV_ENV = "DSV3_TORCH_HEAD_GEMV"


def head_gemv_on() -> bool:
    return env_choice(HEAD_GEMV_ENV, "1", {"1": "W_UV by head_gemv at batch <= 2", "0": "head_gemm"}) == "1"


# With head_gemv (DSV3_TORCH_HEAD_GEMV on): `1` (default) at batch <= 2 the decode attention's split merge and
# W_UV in one launch (kernels/mla_merge_uv.py; the same bits as the reduce kernel then head_gemv), above it the
# reduce kernel and head_gemm, each launch gated by the batch; `0` the reduce kernel at every batch, then
# head_gemv / head_gemm. Read when a program is lowered. One launch fewer per layer at batch 1; on the H200
# (session 19, 27-layer 16b fp8 decode, batch-1 profiles) 98-109 us per step against 107-112 for the reduce
# kernel + head_gemv, with DSV3_TORCH_GATE_SPLIT and DSV3_TORCH_MOE_COMBINE=adds in the same A/B.
MERGE_UV_ENV = "DSV3_TORCH_MERGE_UV"


# With merge_uv: W_UV's rows prefetched into L2 before the kernel's wait (kernels/mla_merge_uv.py PREFETCH_W; the
# same bits): `auto` (default) where our kernels wait (DSV3_TRITON_GDC: under the programmatic port the prefetch
# overlaps the producer's end), `1` always, `0` never. Read when a program is lowered. Alone, without the wait,
# within the noise on the H200 (session 22); on in every build with the wait timed in sessions 25-26.
MERGE_UV_PREFETCH_ENV = "DSV3_TORCH_MERGE_UV_PREFETCH"


def merge_uv_prefetch_on() -> bool:
    return prefetch_before_wait(MERGE_UV_PREFETCH_ENV, "W_UV's rows prefetched into L2 first")


def merge_uv_on() -> bool:
    return env_choice(MERGE_UV_ENV, "1", {"1": "split merge + W_UV in one launch at batch <= 2",
                                          "0": "the reduce kernel, then head_gemv"}) == "1"


def _head_gemm(x: torch.Tensor, w: torch.Tensor, gemv: bool = False) -> torch.Tensor:
    """kernels/mla_absorb.py head_gemm's launch: x [b, h, k] @ w [h, k, n] per head -> [b, h, n]
    (strided views read as they are), tuned for the decode bucket (b is symbolic when traced).
    gemv (HEAD_GEMV_ENV): head_gemv at b <= kv.GEMV_MAX_ROWS, head_gemm above (each launch gated)."""
    out = torch.empty((x.shape[0], x.shape[1], w.shape[2]), dtype=x.dtype, device=x.device)  # [b, h, n]
    tile_gate = 1
    if gemv and ka.head_gemv_suits(w):
        gate = kv.gemv_gate(x.shape[0])
        torch_launch.launch_spec(gated(ka.head_gemv_spec(x, w, out), gate))
        tile_gate = 1 - gate
    torch_launch.launch_spec(gated(ka.head_gemm_spec(x, w, out, ka.DECODE_MAX_M), tile_gate))
    return out


class QueryRope(NamedTuple):
    """A q_pe passed before RoPE: the rope tables [P, r/2] fp32 that rotate it at each row's start_pos, and where:
    in the MLA split kernel, or (in_query) in W_UK's head_gemm launch (kernels/mla_query.py;
    engines/torch_q_rope.py)."""

    cos: torch.Tensor
    sin: torch.Tensor
    in_query: bool = False


def _head_gemm_rope(x: torch.Tensor, w: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/mla_query.py's launch: (x [b, h, k] @ w [h, k, n] per head, q_pe [b, h, r] rotated at positions)."""
    out = torch.empty((x.shape[0], x.shape[1], w.shape[2]), dtype=x.dtype, device=x.device)  # [b, h, n]
    q_pe_out = torch.empty(q_pe.shape, dtype=q_pe.dtype, device=x.device)  # [b, h, r]
    torch_launch.launch_spec(kq.head_gemm_rope_spec(x, w, out, ka.DECODE_MAX_M, q_pe, cos, sin, positions, q_pe_out))
    return out, q_pe_out


def decode_query(q_nope: torch.Tensor, w_uk: torch.Tensor, absorb_gemm: bool) -> torch.Tensor:
    """W_UK absorbed into the decode query: q_nope [b, 1, h, dn] x w_uk [h, dn, c] -> [b, h, c], by
    head_gemm on the strided [b, h, dn] slice (absorb_gemm) or the einsum."""
    if absorb_gemm:
        return _head_gemm(q_nope[:, 0], w_uk)
    return torch.einsum("bshd,hdc->bshc", q_nope, w_uk).contiguous()[:, 0]


def decode_latent(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                  start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float, absorb_gemm: bool,
                  q_rope: QueryRope | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode attention up to W_UV: decode_partials, then the reduce kernel -> (lat [b, h, c], w_uv [h, dv, c])."""
    parts, w_uv = decode_partials(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, absorb_gemm,
                                  q_rope)
    return kd.mla_decode_reduce(parts, q_nope.dtype), w_uv


# The configs the decode program's MLA split kernel is autotuned among, read when a program is lowered: `best`
# (default since session 20) kernels/mla_decode.py BEST_DECODE_CONFIGS, its two configs that were the fastest at
# every batch pinned; `all` every config of DECODE_CONFIGS. Why: the decode program is tuned at batch 64, and
# session 19's packages picked among four configs there, 191-256 us of split kernel per 27-layer batch-1 step; the
# two in `best` were the 191 (BN 64 w4 s2 P2) and 199 us (BN 32 w4 s3) picks (benchmarks/RESULTS.md session 19).
MLA_CONFIGS_ENV = "DSV3_TORCH_MLA_CONFIGS"


def mla_config_set() -> str:
    return env_choice(MLA_CONFIGS_ENV, "best", {"best": "autotuned among the two fastest when pinned",
                                                "all": "autotuned among every split-kernel config"})


def decode_partials(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                    start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float, absorb_gemm: bool,
                    q_rope: QueryRope | None = None) -> tuple[kd.DecodePartials, torch.Tensor]:
    """W_UK into the query (decode_query), then mla_decode's split kernel over the cache rows
    t < min(start_pos, T) and the one new key, under the runtime split rule; the merge left to the caller
    -> (the split partials, w_uv [h, dv, c]). q_rope: q_pe is before RoPE, rotated at each row's start_pos by the
    split kernel, or with q_rope.in_query (and absorb_gemm) by W_UK's head_gemm launch (engines/torch_q_rope.py);
    q_pe is read as the view it is."""
    _, s, h, dn = q_nope.shape
    c = wkv_b.shape[-1]
    torch._check(s == 1, lambda: f"dsv3_aoti::mla_attention: decode needs one new position, got {s}")
    w = wkv_b.view(h, -1, c)  # [h, dn + dv, c]
    w_uk, w_uv = w[:, :dn], w[:, dn:]  # [h, dn, c], [h, dv, c]
    # start_pos as it is: the kernels clamp it to [0, T] themselves (kernels/mla_splits.py _clamped_load), where a
    # clamp here cost Inductor kernels of its own (14 launches per 27-layer 16b decode step)
    positions = start_pos.contiguous()
    rope = None
    if q_rope is not None and q_rope.in_query and absorb_gemm:  # [b, h, c], the rotated [b, h, r]
        q_latent, q_pe_rows = _head_gemm_rope(q_nope[:, 0], w_uk, q_pe[:, 0], q_rope.cos, q_rope.sin, positions)
    else:
        q_latent = decode_query(q_nope, w_uk, absorb_gemm)  # [b, h, c]
        rope = None if q_rope is None else (q_rope.cos, q_rope.sin, positions)  # the tables at each row's position
        q_pe_rows = q_pe[:, 0] if rope is not None else q_pe.contiguous()[:, 0]  # the raw view: no copy kernel
    parts = kd.mla_decode_partials(q_latent, q_pe_rows, kv_cache[..., :c], kv_cache[..., c:], positions,
                                   softmax_scale, kv_new=kv_new[:, 0, :c], pe_new=kv_new[:, 0, c:], runtime_splits=True,
                                   config_set=mla_config_set(), q_rope=rope)
    return parts, w_uv


def _merged_head_gemv(parts: kd.DecodePartials, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_UV after the split kernel: w [h, c, dv] (c contiguous, ka.head_gemv_suits) -> [b, h, dv] in dtype. At
    b <= kv.GEMV_MAX_ROWS kernels/mla_merge_uv.py (the merge and head_gemv in one launch), above it the reduce
    kernel into the latent, then head_gemm; each launch gated by the batch."""
    b, h, _, c = parts.o_part.shape
    out = torch.empty((b, h, w.shape[2]), dtype=dtype, device=w.device)  # [b, h, dv]
    gate = kv.gemv_gate(b)
    torch_launch.launch_spec(gated(km_uv.merge_uv_spec(parts, w, out, merge_uv_prefetch_on()), gate))
    lat = torch.empty((b, h, c), dtype=dtype, device=w.device)  # [b, h, c], written above batch 2 only
    torch_launch.launch_spec(gated(kd.reduce_spec(parts, lat), 1 - gate))
    torch_launch.launch_spec(gated(ka.head_gemm_spec(lat, w, out, ka.DECODE_MAX_M), 1 - gate))
    return out


@triton_op("dsv3_aoti::mla_attention", mutates_args={})
def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                  start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float, decode: bool,
                  absorb_gemm: bool = True, head_gemv: bool = False, merge_uv: bool = False) -> torch.Tensor:
    """dsv3::mla_attention (step.absorbed_attention's math): W_UK absorbed into the query, the
    kernel over cache positions t < min(start_pos, T) plus the s new keys (causal), then W_UV.

    decode=True needs s == 1 (the decode program's static seq) and runs mla_decode; otherwise
    mla_prefill. Clamping start_pos to [0, T] keeps the op's masking (t >= start_pos and t >= T are
    not keys) and the new keys' causal order, and keeps the kernels' cache reads in bounds.
    absorb_gemm (decode, bf16/fp16; ABSORB_ENV): W_UK and W_UV by kernels/mla_absorb.py head_gemm,
    one launch each, instead of the einsums. head_gemv (with absorb_gemm; HEAD_GEMV_ENV): W_UV by
    head_gemv at batch <= kv.GEMV_MAX_ROWS. merge_uv (with head_gemv; MERGE_UV_ENV): at those batches the split
    merge and head_gemv in one launch (_merged_head_gemv).
    """
    if decode:
        return _decode_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, absorb_gemm,
                                 head_gemv, merge_uv, None)
    return _prefill_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale)


@triton_op("dsv3_aoti::mla_attention_rope_q", mutates_args={})
def mla_attention_rope_q(q_nope: torch.Tensor, q_pe_raw: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                         kv_new: torch.Tensor, kv_cache: torch.Tensor, start_pos: torch.Tensor, wkv_b: torch.Tensor,
                         softmax_scale: float, absorb_gemm: bool = True, head_gemv: bool = False,
                         merge_uv: bool = False, rope_in_query: bool = False) -> torch.Tensor:
    """dsv3_aoti::mla_attention's decode form with q_pe before RoPE: the rope tables rope_cos / rope_sin [P, r/2] fp32
    rotate it at each row's start_pos inside the split kernel, or (rope_in_query, with absorb_gemm) in W_UK's
    head_gemm launch (engines/torch_q_rope.py)."""
    return _decode_attention(q_nope, q_pe_raw, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, absorb_gemm,
                             head_gemv, merge_uv, QueryRope(rope_cos, rope_sin, rope_in_query))


def _decode_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale: float, absorb_gemm: bool,
                      head_gemv: bool, merge_uv: bool, q_rope) -> torch.Tensor:
    """mla_attention's decode program form -> [b, 1, h, dv]; q_rope: see decode_partials."""
    absorb_gemm = absorb_gemm and q_nope.dtype in ka.DOT_DTYPES  # fp32 dots would be TF32
    if absorb_gemm and head_gemv and merge_uv:
        parts, w_uv = decode_partials(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, True, q_rope)
        w = w_uv.transpose(1, 2)  # [h, c, dv], c contiguous
        if ka.head_gemv_suits(w):  # static: the weight's shape and strides
            return _merged_head_gemv(parts, w, q_nope.dtype)[:, None]  # [b, 1, h, dv]
        return _head_gemm(kd.mla_decode_reduce(parts, q_nope.dtype), w)[:, None]
    lat, w_uv = decode_latent(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale,
                              absorb_gemm, q_rope)  # [b, h, c], [h, dv, c]
    if absorb_gemm:
        return _head_gemm(lat, w_uv.transpose(1, 2), head_gemv)[:, None]  # [b, 1, h, dv]
    return torch.einsum("bshc,hdc->bshd", lat[:, None], w_uv)  # [b, 1, h, dv]


def _prefill_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale: float) -> torch.Tensor:
    """mla_attention's prefill form: einsums for W_UK / W_UV around kernels/mla_prefill.py -> [b, s, h, dv]."""
    h, dn = q_nope.shape[2:]
    c = wkv_b.shape[-1]
    w = wkv_b.view(h, -1, c)  # [h, dn + dv, c]
    w_uk, w_uv = w[:, :dn], w[:, dn:]  # [h, dn, c], [h, dv, c]
    q_pe = q_pe.contiguous()
    seen = start_pos.clamp(0, kv_cache.shape[1]).to(torch.int32)  # [b] cached keys per row
    kv_c, pe_c = kv_cache[..., :c], kv_cache[..., c:]  # [b, T, c], [b, T, r]
    kv_n, pe_n = kv_new[..., :c], kv_new[..., c:]  # [b, s, c], [b, s, r]
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk).contiguous()  # [b, s, h, c]
    lat = kp.mla_prefill(q_latent, q_pe, kv_c, pe_c, seen, softmax_scale, kv_new=kv_n, pe_new=pe_n)
    return torch.einsum("bshc,hdc->bshd", lat, w_uv)  # [b, s, h, dv]

