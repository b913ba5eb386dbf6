"""Split-KV flash-decoding of absorbed MLA over the latent cache: one query per batch row -> [B, H, C].

The shared picture (layouts, the absorbed-MLA math, which keys a row sees, dtypes) is in
kernels/mla_attention.py, which also holds the input checks and mla_decode_ref. How decode works
(splits, the merge kernel, the runtime split rule, the tiles' layout) is in
kernels/mla_decode_kernels.py with the kernels; this module holds their configs and autotuner, the
launcher mla_decode (= mla_decode_partials, the split kernel, then mla_decode_reduce; kernels/mla_merge_uv.py
merges the partials inside W_UV's launch instead) and the host side of a launch (split_plan, split_partials,
split_kernel_args, reduce_spec).

Variants (session 8, kernels/mla_variants.py; "early" is not the default: benchmarks/kernels.py
mla_sweep, H200: 13.8 vs 14.1 us at B=1 ctx 1024 and 26.9 vs 28.7 at B=8 ctx 4096, eager-only for now).
Sessions 4-5 left B=32 at context 4096 at 0.059 ms (61% of copy) with BN=32 w4 s3 at 8 splits, where
bytes in flight are not short (two programs per SM, two 36.9 KB tiles ahead each): what is left is
per-tile issue work and the serial chain of each tile. At B=1 (16 programs of one or two tiles) the
time is latency: "early" issues q and the new token before the program waits for its cache length
(which the runtime rule's row check does) and scores the new token from q in registers, where the
default reloads q after the loop (with session 8's kernel, on sm_90, it also used fewer registers: 134
against 173 at BN=32 with the new token).

Session 16 (benchmarks/mla_variant_probe.py at commit b6ca583, H200, CUDA graphs, split + merge): the split
kernel's loop was 735 sm_90 instructions per warp and 32-key tile, a third of them cp.async addresses and
masks, and the score dot (keys on its M) ran every MMA twice (Triton put all 4 warps on the 2 row blocks of 16
keys). Now the heads are the score dot's M (each warp scores BN / 4 keys), rows past the chunk re-read its
last key instead of a masked zero fill (their scores are -inf, p = 0), and the softmax denominator is summed
per key slot, once after the loop (no cross-warp sum per tile): 495 instructions, half the HMMA, 5 barriers
instead of 7. B=32 ctx 4096: 58.1 -> 56.4 us (62.5 -> 64.4% of copy); B=1 ctx 1024 15.5 -> 14.3; B=8 ctx 4096
28.7 -> 27.6; B=64 ctx 1024 50.4 -> 48.7 (BN=32 w4 s3; BN=64 w4 s2 P2 at B=64: 56.3 -> 46.8). A further form,
the score dot in three independent parts (a shorter MMA chain), was no faster (56.3 / 14.7 / 27.6 / 49.5).

Session 27 (benchmarks/mla_merge_probe.py, mla_read_probe.py, H200, B=32 ctx 4096, issue #4's 70%-of-copy point =
51.6 us): split + reduce 56.0 us (64.9%), the split kernel alone 53.2 (68.3%), the merge 2.8 us more (a programmatic
edge into it changes nothing); a read of the same bytes with this kernel's tiling and pipeline but no attention math
48.4 us (74.7%; TMA 51.6), a copy-like flat read 46 us (78.5%). The math is not hidden because the next tile's
cp.async is issued only after the value wgmma has drained the buffer it reuses (sm_90 SASS: two KV buffers, one tile
in flight while a program computes); L2 prefetches per line, 3-4 programs per SM, BN64 and 8 warps were all slower,
and warp specialization (a producer that loads ahead) fails to compile on this loop (triton 3.9) or computes wrong
results (triton 3.6, the fp8 GEMM). Session 28 ran the two candidates it prepared, BULK_PREFETCH_CONFIGS and the
"lazy" variant (kernels/mla_variants.py), whose common path skips the accumulator's rescale (sm_90 SASS: 86 of the
loop's 493 instructions per warp and tile sit in the rescale branch, against 469 in all for the default): neither
helps (do_bench's flush: the default 56.4 us, bulk prefetch 57.3 / 58.9, lazy 57.0). With the benchmark's L2 flush
leaving clean lines (benchmarks/l2_flush_probe.py) the default's split + reduce reads 46.1-46.8 us, 77-78% of copy.

Removed in session 14 as measured no faster on the H200 (benchmarks/RESULTS.md, from CUDA graphs):
the fused merge (merge="fused": the last split program of each (row, head block), found with an atomic
arrival counter, merged the partials in the split kernel's launch): 0.0766 ms against the separate
merge's 0.0614 at B=32 ctx 4096 (session 4), 107 us against 14.1 at B=1 ctx 1024 (session 8); and the
TMA loads (variants "tma" / "tma_early": KV tiles through device-side tensor descriptors): 59.0 us like
the default at B=32 ctx 4096, slower at B=1 (15.6 vs 14.1) and B=8 ctx 4096 (30.3 vs 28.7; session 8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from dsv3_export.kernels._common import (LaunchSpec, autotune_or_single, cdiv, check_tensor, is_interpreted, launch,
                                         next_pow2, traceable, tracing)
from dsv3_export.kernels.mla_attention import LOG2E, _check_caches, _check_new
from dsv3_export.kernels.mla_decode_kernels import _mla_decode_reduce_kernel, _mla_decode_split_kernel
from dsv3_export.kernels.mla_query import check_rope_tables
from dsv3_export.kernels.mla_splits import (DECODE_PROGRAMS_PER_SM, MAX_BLOCK_H, MAX_SPLITS,  # noqa: F401
                                           MIN_BLOCK_H, MIN_SPLIT_KEYS, RUNTIME_MIN_SPLITS,
                                           SPLIT_OVERHEAD_KEYS, _block_h, choose_num_splits, runtime_num_splits,
                                           runtime_split_target)
from dsv3_export.kernels.mla_variants import DECODE_VARIANTS, VARIANT_FLAGS

# Decode is a stream over the cache: what matters is how many cache bytes each SM keeps in flight.
# A [BN, 512 + 64] bf16 tile is BN x 1152 B (36.9 KB at BN = 32). The pipeline keeps num_stages - 1
# tile buffers and, from 3 stages on, the next tiles load while the current one is computed (the
# score dot is mma.sync at every BN since session 16, heads on its M; before, BN = 64 made it wgmma,
# which needed one buffer more, so that only 2 stages fit in 227 KB). PREFETCH = d > 0 also asks L2 for the tile d tiles ahead (prefetch.global.L2, no
# registers or shared memory): up to d tiles in flight per program however few buffers fit. It
# only adds to the pipeline when d exceeds its own lookahead (num_stages - 1 tiles for BN < 64);
# resident prefetched bytes stay <= 29 MB of the 50 MB L2 (256 x 3 x 36.9 KB for BN=32 s3 at 2
# programs per SM; 132 x 4 x 36.9 KB and 132 x 2 x 73.7 KB = 19 MB for the 1-per-SM tiles).
# Shared memory / registers per thread at H = 16, sm_90 (session 16's kernel, ptxas): BN=32 w4 s3 93 KB
# (2 per SM), 144 regs (168 with the kv_new epilogue); BN=32 w4 s2 with the 168 cap 55 KB (3 per SM), no
# spill. The autotuner times them all. PREFETCH and PREFETCH_BULK sit in every config: the sm_90 compile test passes
# config kwargs as constexprs, and torch's tracing of the launch (AOTInductor) needs every kernel argument by name,
# defaults included (one left out and it takes every input as written: VARIANT_FLAGS).
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 3, "PREFETCH_BULK": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 4, "PREFETCH_BULK": 0}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=8, num_stages=5),
    # More programs per SM to hide each tile's latency chain (score dot, cross-warp max, value
    # wgmma): registers capped so that 65536 / (cap x 128 threads) programs fit, shared memory too.
    # 4 per SM: 56 KB, 128 registers (pairs with 16 splits at B=32: 512 programs = one wave of 4 x 132);
    # 3 per SM: 56 / 74 KB, 168 registers (12 splits: 384 programs = one wave of 3 x 132). No spills
    # (kv_new at 128: 144 B). choose_num_splits still sizes for 2 per SM: the benchmark's split sweep
    # times every (splits, config) pair.
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=4, num_stages=3, maxnreg=128),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=4, num_stages=2, maxnreg=168),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0, "PREFETCH_BULK": 0}, num_warps=4, num_stages=4, maxnreg=168),
    triton.Config({"BLOCK_N": 64, "PREFETCH": 1, "PREFETCH_BULK": 0}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "PREFETCH": 2, "PREFETCH_BULK": 0}, num_warps=4, num_stages=2),
]

# L2 prefetch by cp.async.bulk.prefetch (PREFETCH_BULK = n: every n tiles one range of the next n tiles from two
# ahead, one instruction per range (per cache unless [latent | rope] rows interleave), issued by the program's first
# thread), for the benchmark's sweep (benchmarks/mla_merge_probe.py); not autotuned: slower on the H200 (session 28,
# B=32 ctx 4096: 57.3 / 58.9 us for 2 / 4 tiles per range against 56.4). Why it was tried: a program holds one tile
# in flight while it computes (session 27: the next tile's cp.async waits for the value wgmma to drain its buffer),
# and the per-line prefetches (PREFETCH) made B=32 ctx 4096 slower (56.3 -> 59.0-73.5 us), with 32 more instructions
# per warp and tile; these cost a compare per tile and ~40 instructions per range.
BULK_PREFETCH_CONFIGS = [triton.Config({"BLOCK_N": 32, "PREFETCH": 0, "PREFETCH_BULK": n}, num_warps=4, num_stages=3)
                         for n in (2, 4)]

# The kernel variant a call runs unless it names one (variant=...; kernels/mla_variants.py says what each
# changes). The benchmark's mla_sweep times the others against it; none replaces it before it is measured.
DECODE_VARIANT = "pointer"

_INTERPRETED = is_interpreted(_mla_decode_split_kernel)
_TUNE_KEY = ["H", "C", "R", "NUM_SPLITS", "SPLIT_TARGET"]
_decode_tuned = autotune_or_single(_mla_decode_split_kernel, DECODE_CONFIGS, key=_TUNE_KEY)
# config_set="best": the autotuner chooses between the two configs that were the fastest, or within 3%, at every
# batch when each was pinned at the 16b decode program's shapes (session 18, benchmarks/mla_config_probe.py,
# H200, us per call at B = 1 / 8 / 64: BN64 w4 s2 P2 9.94 / 12.20 / 39.21, BN32 w4 s3 10.14 / 12.21 / 40.40).
# Among all of DECODE_CONFIGS the packages' picks moved the 27-layer batch-1 step by ~65 us (session 19:
# 191-256 us of split kernel per step). A one-config pin crashed a package once (session 18), so this keeps
# the autotuner, with two choices. The packages' default since session 20 (engines/torch_triton_mla.py
# MLA_CONFIGS_ENV): their picks took 192-205 us per batch-1 step, against 205-253 among all configs.
BEST_DECODE_CONFIGS = [c for c in DECODE_CONFIGS if not c.maxnreg and (c.kwargs["BLOCK_N"], c.kwargs["PREFETCH"],
                       c.num_warps, c.num_stages) in ((64, 2, 4, 2), (32, 0, 4, 3))]
_decode_tuned_best = autotune_or_single(_mla_decode_split_kernel, BEST_DECODE_CONFIGS, key=_TUNE_KEY)
CONFIG_SETS = {"all": (DECODE_CONFIGS, _decode_tuned), "best": (BEST_DECODE_CONFIGS, _decode_tuned_best)}
# The config the autotuner chose, per (H, C, R, NUM_SPLITS, dtype, HAS_NEW, SPLIT_TARGET, variant, config set,
# ROPE_Q); later eager calls launch the kernel with it directly. Autotuner.run re-keys all ~30 arguments on every
# call (list lookups, str(dtype)): host time each decode step pays before its kernels are queued.
_decode_chosen: dict[tuple, triton.Config] = {}


def decode_config(heads: int, c: int, r: int, splits: int, dtype: torch.dtype, has_new: bool = False,
                  split_target: int = 0, variant: str | None = None, config_set: str = "all", rope_q: bool = False):
    """The split kernel's config for this shape once the autotuner has chosen it (None before).
    split_target: 0 for a host-chosen split count; runtime_splits calls: splits=MAX_SPLITS and
    split_target=runtime_split_target(device)."""
    return _decode_chosen.get((heads, c, r, splits, dtype, has_new, split_target, variant or DECODE_VARIANT,
                               config_set, rope_q))


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               cache_seqlens: torch.Tensor, softmax_scale: float, *, kv_new: torch.Tensor | None = None,
               pe_new: torch.Tensor | None = None, num_splits: int | None = None,
               config: triton.Config | None = None, runtime_splits: bool = False,
               variant: str | None = None) -> torch.Tensor:
    """One query per batch row -> [B, H, C].

    q_latent [B, H, C], q_pe [B, H, R]; keys: cache positions t < cache_seqlens[b] (int32 or int64 [B], clamped
    to [0, T] by the kernels: the step's start_pos as it is),
    then, when given, the row's new token kv_new [B, C] / pe_new [B, R] (not in the cache).
    num_splits: KV splits per row (default choose_num_splits). runtime_splits=True instead lets the
    kernels pick each row's splits from the launch's batch and the row's cache length
    (runtime_num_splits): nothing on the host depends on the batch or cache length, for programs
    traced with a symbolic batch. The split kernel writes fp32 partials, the reduce kernel merges them.
    variant: one of DECODE_VARIANTS (default DECODE_VARIANT; VARIANT_FLAGS says what each changes).
    """
    parts = mla_decode_partials(q_latent, q_pe, kv_cache, pe_cache, cache_seqlens, softmax_scale, kv_new=kv_new,
                                pe_new=pe_new, num_splits=num_splits, config=config, runtime_splits=runtime_splits,
                                variant=variant)
    return mla_decode_reduce(parts, q_latent.dtype)


class DecodePartials(NamedTuple):
    """The split kernel's outputs and what merging them needs: o_part fp32 [B, H, S, C] and lse fp32
    [B, H, S] (row b's first `splits` written, the count its rule gives), the cache lengths the launch read,
    its head blocks and SPLIT_TARGET (0: all S splits written)."""

    o_part: torch.Tensor
    lse: torch.Tensor
    cache_seqlens: torch.Tensor
    seq_cap: int  # the cache's length: the kernels clamp cache_seqlens to [0, seq_cap]
    head_blocks: int
    split_target: int

    def merge_args(self) -> tuple:
        """The merge's leading kernel arguments (the reduce kernel's, kernels/mla_merge_uv.py's)."""
        bsz, heads, splits, c = self.o_part.shape
        so, sl = (heads * splits * c, splits * c, c), (heads * splits, splits)  # o_part, lse: contiguous
        return (self.o_part, self.lse, self.cache_seqlens, self.seq_cap, splits, self.head_blocks, *so, *sl)

    def merge_constexprs(self) -> dict:
        c, splits = self.o_part.shape[3], self.o_part.shape[2]
        return dict(C=c, BLOCK_S=next_pow2(splits), SPLIT_TARGET=self.split_target, MIN_SPLITS=RUNTIME_MIN_SPLITS,
                    MIN_KEYS=MIN_SPLIT_KEYS)


def mla_decode_partials(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                        cache_seqlens: torch.Tensor, softmax_scale: float, *, kv_new: torch.Tensor | None = None,
                        pe_new: torch.Tensor | None = None, num_splits: int | None = None,
                        config: triton.Config | None = None, runtime_splits: bool = False,
                        variant: str | None = None, config_set: str = "all",
                        q_rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> DecodePartials:
    """mla_decode's split kernel alone (same arguments): its partials, for a caller that merges them itself
    (mla_decode_reduce, or kernels/mla_merge_uv.py with W_UV in the same launch). config_set: the configs the
    autotuner chooses among, a key of CONFIG_SETS. q_rope: (cos, sin, positions): the rope tables fp32 [P, R/2]
    and each row's position [B] (int, clamped to the tables' rows); q_pe is then the query's rope part before RoPE,
    which the kernel applies (reference/layers.py apply_rotary_emb)."""
    check_tensor("mla_decode: q_latent", q_latent, ndim=3)
    bsz, heads, _ = q_latent.shape
    c, r = _check_caches("mla_decode", q_latent, q_pe, kv_cache, pe_cache, bsz)
    check_tensor("mla_decode: cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), ndim=1,
                 device=q_latent.device, contiguous=True)
    if cache_seqlens.shape[0] != bsz:
        raise ValueError(f"mla_decode: cache_seqlens has {cache_seqlens.shape[0]} entries for batch {bsz}")
    has_new = _check_new("mla_decode", kv_new, pe_new, q_latent, (bsz, c), (bsz, r))
    if q_rope is not None:
        check_rope_tables("mla_decode", q_rope, bsz, r, q_latent.device)
    variant = variant or DECODE_VARIANT
    if variant not in DECODE_VARIANTS:
        raise ValueError(f"mla_decode: variant={variant!r} must be one of {DECODE_VARIANTS}")
    if config_set not in CONFIG_SETS:
        raise ValueError(f"mla_decode: config_set={config_set!r} must be one of {sorted(CONFIG_SETS)}")
    configs, tuned = CONFIG_SETS[config_set]
    dev = q_latent.device
    head_blocks = cdiv(heads, _block_h(heads))
    if bsz * heads * c == 0:  # nothing to launch (and, as before, no split plan to check)
        return DecodePartials(*split_partials(bsz, heads, 1, c, dev), cache_seqlens, kv_cache.shape[1], head_blocks, 0)
    splits, split_target = split_plan("mla_decode", bsz, heads, kv_cache.shape[1], dev, runtime_splits, num_splits)
    o_part, lse = split_partials(bsz, heads, splits, c, dev)
    grid = (bsz, head_blocks, splits)
    # early and lazy: pinned (`config`, else the first). The autotuner's cache is keyed by _TUNE_KEY, not the variant
    # flags, so a variant tuned through it would hand its pick to the default at the same shape.
    tuned = None if VARIANT_FLAGS[variant]["EARLY"] or VARIANT_FLAGS[variant]["LAZY"] else tuned
    tune_key = (heads, c, r, splits, q_latent.dtype, has_new, split_target, variant, config_set, q_rope is not None)
    eager_tuned = config is None and tuned is not None and not tracing()  # tracing needs the autotuner
    cfg = _decode_chosen.get(tune_key) if eager_tuned else config
    args, kwargs = split_kernel_args(q_latent, q_pe, kv_cache, pe_cache, kv_new, pe_new, cache_seqlens, o_part, lse,
                                     softmax_scale, split_target, variant=variant, q_rope=q_rope)
    launch(_mla_decode_split_kernel, tuned, configs, lambda meta: grid, args, kwargs, cfg)
    chosen = getattr(tuned, "best_config", None) if eager_tuned and cfg is None else None
    if chosen is not None:
        _decode_chosen[tune_key] = chosen
    return DecodePartials(o_part, lse, cache_seqlens, kv_cache.shape[1], head_blocks, split_target)


def mla_decode_reduce(parts: DecodePartials, dtype: torch.dtype) -> torch.Tensor:
    """The reduce kernel: parts' splits merged -> [B, H, C] in dtype (q_latent's)."""
    bsz, heads, _, c = parts.o_part.shape
    out = torch.empty((bsz, heads, c), dtype=dtype, device=parts.o_part.device)
    if out.numel():
        spec = reduce_spec(parts, out)
        traceable(spec.kernel)[spec.grid({})](*spec.args, **spec.kwargs)  # Triton's default warps and stages
    return out


def reduce_spec(parts: DecodePartials, out: torch.Tensor) -> LaunchSpec:
    """The reduce kernel's launch into out [B, H, C] (contiguous), one program per (row, head); no config of
    its own (configs[0] is empty: Triton's default warps and stages)."""
    bsz, heads, _, c = parts.o_part.shape
    args = (*parts.merge_args(), out, heads * c, c)
    kwargs = dict(parts.merge_constexprs(), BLOCK_C=next_pow2(c))
    return LaunchSpec(_mla_decode_reduce_kernel, None, [triton.Config({})], lambda meta: (bsz, heads), args, kwargs)


def split_plan(op: str, bsz: int, heads: int, cache_len: int, device: torch.device, runtime_splits: bool,
               num_splits: int | None) -> tuple[int, int]:
    """(split programs per row, split_target) of a decode launch: MAX_SPLITS under the runtime rule
    (runtime_split_target), else num_splits or choose_num_splits; errors name `op`."""
    if runtime_splits and num_splits is not None:
        raise ValueError(f"{op}: num_splits={num_splits} with runtime_splits=True; pass one of them")
    split_target = runtime_split_target(device) if runtime_splits else 0
    splits = MAX_SPLITS if runtime_splits else num_splits or choose_num_splits(bsz, heads, cache_len, device)
    if not 1 <= splits <= 1024:
        raise ValueError(f"{op}: num_splits={splits} must be in [1, 1024]")
    return splits, split_target


def split_partials(bsz, heads, splits: int, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split kernel's outputs: o_part fp32 [B, H, S, C] and lse fp32 [B, H, S] (B may be symbolic)."""
    return (torch.empty((bsz, heads, splits, c), dtype=torch.float32, device=device),
            torch.empty((bsz, heads, splits), dtype=torch.float32, device=device))


def split_kernel_args(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                      kv_new: torch.Tensor | None, pe_new: torch.Tensor | None, cache_seqlens: torch.Tensor,
                      o_part: torch.Tensor, lse: torch.Tensor, softmax_scale: float, split_target: int, *,
                      variant: str = "pointer", q_rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[tuple, dict]:
    """The split kernel's arguments and constexprs (less the config's) writing o_part [B, H, S, C] and
    lse [B, H, S], in one place so that a new kernel argument cannot be left out of a launch (a traced
    launch missing one makes torch assume every input mutated: VARIANT_FLAGS)."""
    bsz, heads, c = q_latent.shape
    r, splits = q_pe.shape[-1], o_part.shape[2]
    has_new = kv_new is not None
    kvn, pen = (kv_new, pe_new) if has_new else (kv_cache, pe_cache)  # never read without HAS_NEW
    # Strides: one stride() tuple per input; the fresh contiguous buffers' strides by arithmetic
    # (each Tensor.stride(i) call is host time on every decode step).
    sq, sqp, skv, spe = q_latent.stride(), q_pe.stride(), kv_cache.stride(), pe_cache.stride()
    so = (heads * splits * c, splits * c, c)  # o_part [B, H, splits, C]
    sl = (heads * splits, splits)  # lse [B, H, splits]
    cos, sin, pos = q_rope if q_rope is not None else (lse, lse, cache_seqlens)  # never read without ROPE_Q
    rope_rows = cos.shape[0] if q_rope is not None else 1
    args = (q_latent, q_pe, kv_cache, pe_cache, kvn, pen, cache_seqlens, o_part, lse, cos, sin, pos, heads, splits,
            kv_cache.shape[1], softmax_scale * LOG2E, sq[0], sq[1], sqp[0], sqp[1], skv[0], skv[1], spe[0], spe[1],
            kvn.stride(0), pen.stride(0), cos.stride(0) if q_rope is not None else 0, rope_rows, *so, *sl)
    kwargs = dict(C=c, R=r, BLOCK_C=next_pow2(c), BLOCK_R=next_pow2(r), HAS_NEW=has_new,
                  UPCAST=_INTERPRETED,  # fp32 .to(fp32) is a no-op; also skips PTX
                  SPLIT_TARGET=split_target, MIN_SPLITS=RUNTIME_MIN_SPLITS, MIN_KEYS=MIN_SPLIT_KEYS,
                  BLOCK_H=_block_h(heads), ROPE_Q=q_rope is not None, **VARIANT_FLAGS[variant])
    return args, kwargs
