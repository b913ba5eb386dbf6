"""Split-KV flash-decoding of absorbed MLA over the latent cache: one query per batch row -> [B, H, C].

The shared picture (layouts, the absorbed-MLA math, which keys a row sees, dtypes) is in
kernels/mla_attention.py, which also holds the input checks and mla_decode_ref. How decode works
(splits, the separate or fused merge, the runtime split rule, the tiles' layout) is in
kernels/mla_decode_kernels.py with the kernels; this module holds their configs and autotuners, the
launcher mla_decode and the host side of a launch (split_plan, split_partials, split_kernel_args).

Variants (session 8, kernels/mla_variants.py; none is the default: benchmarks/kernels.py mla_sweep,
H200: "tma" 59.0 us at B=32 ctx 4096 like the default's 59.0 (62% of copy); "early" 13.8 vs 14.1 us at
B=1 ctx 1024 and 26.9 vs 28.7 at B=8 ctx 4096, eager-only for now). Sessions 4-5 left B=32 at context
4096 at 0.059 ms (61% of copy) with BN=32 w4 s3 at 8 splits, where bytes in flight are not short (two
programs per SM, two 36.9 KB tiles ahead each): what is left is per-tile issue work and the serial chain
of each tile. "tma" moves the tile loads to the TMA unit (device-side descriptors over the row's
[seqlen, C] keys, zero-filled past them): no per-thread address arithmetic, masks or cp.async issue in
the loop. At B=1 (16 programs of one or two tiles) the time is latency: "early" issues q and the new
token before the program waits for its cache length (which the runtime rule's row check does) and scores
the new token from q in registers, where the default reloads q after the loop (and, on sm_90, uses fewer
registers: 134 against 173 at BN=32 with the new token, 168 against 255 at BN=64).
"""

from __future__ import annotations

import torch
import triton

from dsv3_export.kernels._common import COUNTER_BUFFER_MIN, _arrival_buffers, arrival_counters  # noqa: F401
from dsv3_export.kernels._common import (autotune_or_single, cdiv, check_tensor, is_interpreted, launch, next_pow2,
                                         traceable, tracing)
from dsv3_export.kernels.fp8_gemm_persistent import _ensure_allocator
from dsv3_export.kernels.mla_attention import LOG2E, _check_caches, _check_new
from dsv3_export.kernels.mla_decode_kernels import _mla_decode_reduce_kernel, _mla_decode_split_kernel
from dsv3_export.kernels.mla_splits import (DECODE_PROGRAMS_PER_SM, MAX_BLOCK_H, MAX_SPLITS,  # noqa: F401
                                           MIN_BLOCK_H, MIN_SPLIT_KEYS, RUNTIME_MIN_SPLITS,
                                           SPLIT_OVERHEAD_KEYS, _block_h, choose_num_splits, runtime_num_splits,
                                           runtime_split_target)
from dsv3_export.kernels.mla_variants import DECODE_VARIANTS, TMA_DECODE_CONFIGS, VARIANT_FLAGS, tma_unsupported

# How decode merges its splits: "separate" (a second kernel reads the fp32 partials) or "fused" (the
# last split program of each (row, head block) to finish merges them, found with a self-cleaning
# atomic counter: one launch, and the partials are read back while still in L2). `merge=` per call
# overrides this default; the benchmark (benchmarks/kernels.py, mla) times both.
MERGE_MODES = ("separate", "fused")
DECODE_MERGE = "separate"
# The fused merge loads [BLOCK_S, BLOCK_H, MERGE_C] fp32 tiles of partials: MERGE_ELEMS elements (32
# registers per thread at 4 warps, plus their 64-bit addresses), at least MIN_MERGE_C columns
# (merge_cols). sm_90, BN=32 w4 s3 fused: 138 registers at 4096 (208 at 8192; the earlier one-split-
# at-a-time loop took 165 and chained NUM_SPLITS x C/64 dependent L2 round trips).
MERGE_ELEMS = 4096
MIN_MERGE_C = 8


def merge_cols(block_s: int, block_h: int, c: int) -> int:
    """Latent columns per step of the fused merge (a power of 2)."""
    return max(MIN_MERGE_C, min(next_pow2(c), MERGE_ELEMS // (block_s * block_h)))

# Decode is a stream over the cache: what matters is how many cache bytes each SM keeps in flight.
# A [BN, 512 + 64] bf16 tile is BN x 1152 B (36.9 KB at BN = 32). With the mma.sync score dot
# (BN < 64) the pipeline keeps num_stages - 1 tile buffers and, from 3 stages on, the next tiles
# load while the current one is computed; the wgmma score dot (BN = 64) needs one buffer more, so
# only 2 stages fit in 227 KB and its loads do not overlap its compute (one 73.7 KB tile per SM at
# a time). PREFETCH = d > 0 also asks L2 for the tile d tiles ahead (prefetch.global.L2, no
# registers or shared memory): up to d tiles in flight per program however few buffers fit. It
# only adds to the pipeline when d exceeds its own lookahead (num_stages - 1 tiles for BN < 64);
# resident prefetched bytes stay <= 29 MB of the 50 MB L2 (256 x 3 x 36.9 KB for BN=32 s3 at 2
# programs per SM; 132 x 4 x 36.9 KB and 132 x 2 x 73.7 KB = 19 MB for the 1-per-SM tiles).
# Shared memory / registers per thread (4 warps | 8 warps) at H = 16, sm_90:
#   BN=32 s3: 93 KB (2 per SM), 128 | 97 regs    BN=32 s4: 130 KB (1 per SM), 128 | 97
#   BN=16 s5: 93 KB (2 per SM), 128 | 97 regs    BN=64 s2 d=1: 168 KB (1 per SM), 222
# (the kv_new variant needs up to 53 more in its epilogue; BN=64 with kv_new: 255, 20 B spill). The autotuner
# times them all. PREFETCH sits in every config: the sm_90 compile test passes config kwargs as constexprs.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=8, num_stages=5),
    # More programs per SM to hide each tile's latency chain (score dot, cross-warp max/sum, value
    # wgmma): registers capped so that 65536 / (cap x 128 threads) programs fit, shared memory too.
    # 4 per SM: 56 KB, 128 registers (pairs with 16 splits at B=32: 512 programs = one wave of 4 x 132);
    # 3 per SM: 56 / 74 KB, 168 registers (12 splits: 384 programs = one wave of 3 x 132). No spills
    # (kv_new at 128: 144 B). choose_num_splits still sizes for 2 per SM: the benchmark's split sweep
    # times every (splits, config) pair.
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=4, num_stages=3, maxnreg=128),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=2, maxnreg=168),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=4, num_stages=4, maxnreg=168),
    triton.Config({"BLOCK_N": 64, "PREFETCH": 1}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "PREFETCH": 2}, num_warps=4, num_stages=2),
]
# The fused merge's autotune set: the 2-4 per SM configs (BN=64 and the 130 KB ones run 1 per SM, and BN=64
# takes 255 registers with the merge epilogue); each config costs ~1 s of compile per specialization.
_FUSED_KEEP = {(32, 0, 4, 3, None), (32, 3, 4, 3, None), (32, 0, 8, 3, None), (16, 0, 4, 5, None),
               (16, 0, 4, 3, 128), (32, 0, 4, 2, 168), (16, 0, 4, 4, 168)}
FUSED_DECODE_CONFIGS = [c for c in DECODE_CONFIGS if (c.kwargs["BLOCK_N"], c.kwargs["PREFETCH"], c.num_warps,
                                                       c.num_stages, c.maxnreg) in _FUSED_KEEP]

# The kernel variant a call runs unless it names one (variant=...; kernels/mla_variants.py says what each
# changes). The benchmark's mla_sweep times the others against it; none replaces it before it is measured.
DECODE_VARIANT = "pointer"

_INTERPRETED = is_interpreted(_mla_decode_split_kernel)
_decode_tuned = autotune_or_single(_mla_decode_split_kernel, DECODE_CONFIGS,
                                   key=["H", "C", "R", "NUM_SPLITS", "SPLIT_TARGET"])
# The fused-merge form tunes on its own (a second autotuner, its own cache), so one process can time
# both forms; HAS_NEW is in its key (the epilogues differ).
_decode_fused_tuned = autotune_or_single(_mla_decode_split_kernel, FUSED_DECODE_CONFIGS,
                                         key=["H", "C", "R", "NUM_SPLITS", "HAS_NEW", "SPLIT_TARGET"])
# The TMA variant tunes on its own too, both merge forms in one key.
_decode_tma_tuned = autotune_or_single(_mla_decode_split_kernel, TMA_DECODE_CONFIGS,
                                       key=["H", "C", "R", "NUM_SPLITS", "HAS_NEW", "FUSED", "SPLIT_TARGET"])
# The config the autotuner chose, per (H, C, R, NUM_SPLITS, dtype, HAS_NEW, merge, SPLIT_TARGET, variant);
# later eager calls launch the kernel with it directly. Autotuner.run re-keys all ~40 arguments on every call (list
# lookups, str(dtype)): host time each decode step pays before its kernels are queued.
_decode_chosen: dict[tuple, triton.Config] = {}


def decode_config(heads: int, c: int, r: int, splits: int, dtype: torch.dtype, has_new: bool = False,
                  merge: str | None = None, split_target: int = 0, variant: str | None = None):
    """The split kernel's config for this shape once the autotuner has chosen it (None before).
    split_target: 0 for a host-chosen split count; runtime_splits calls: splits=MAX_SPLITS and
    split_target=runtime_split_target(device)."""
    return _decode_chosen.get((heads, c, r, splits, dtype, has_new, merge or DECODE_MERGE, split_target,
                               variant or DECODE_VARIANT))


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               cache_seqlens: torch.Tensor, softmax_scale: float, *, kv_new: torch.Tensor | None = None,
               pe_new: torch.Tensor | None = None, num_splits: int | None = None,
               config: triton.Config | None = None, merge: str | None = None,
               runtime_splits: bool = False, variant: str | None = None) -> torch.Tensor:
    """One query per batch row -> [B, H, C].

    q_latent [B, H, C], q_pe [B, H, R]; keys: cache positions t < cache_seqlens[b] (int32 [B]),
    then, when given, the row's new token kv_new [B, C] / pe_new [B, R] (not in the cache).
    num_splits: KV splits per row (default choose_num_splits). runtime_splits=True instead lets the
    kernels pick each row's splits from the launch's batch and the row's cache length
    (runtime_num_splits): nothing on the host depends on the batch or cache length, for programs
    traced with a symbolic batch.
    merge: "separate" or "fused" (MERGE_MODES; default DECODE_MERGE): how the splits are merged.
    variant: one of DECODE_VARIANTS (default DECODE_VARIANT; VARIANT_FLAGS says what each changes): the
    "tma" ones are eager-only (benchmarks) and need 16-byte aligned caches (tma_unsupported).
    Eager fused calls share one counter buffer per device: do not run two at once on different streams.
    """
    check_tensor("mla_decode: q_latent", q_latent, ndim=3)
    bsz, heads, _ = q_latent.shape
    c, r = _check_caches("mla_decode", q_latent, q_pe, kv_cache, pe_cache, bsz)
    check_tensor("mla_decode: cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=q_latent.device,
                 contiguous=True)
    if cache_seqlens.shape[0] != bsz:
        raise ValueError(f"mla_decode: cache_seqlens has {cache_seqlens.shape[0]} entries for batch {bsz}")
    has_new = _check_new("mla_decode", kv_new, pe_new, q_latent, (bsz, c), (bsz, r))
    merge = merge or DECODE_MERGE
    if merge not in MERGE_MODES:
        raise ValueError(f"mla_decode: merge={merge!r} must be one of {MERGE_MODES}")
    fused = merge == "fused"
    variant = variant or DECODE_VARIANT
    if variant not in DECODE_VARIANTS:
        raise ValueError(f"mla_decode: variant={variant!r} must be one of {DECODE_VARIANTS}")
    flags = VARIANT_FLAGS[variant]
    tma = flags.get("TMA", False)
    if tma:
        if tracing():  # its alignment check reads data_ptr(); AOTInductor's descriptor scratch is untested here
            raise NotImplementedError(f"mla_decode(variant={variant!r}) is eager-only (benchmarks) until TMA is "
                                      "tested inside torch.export / AOTInductor; trace variant='pointer'")
        reason = tma_unsupported(kv_cache, pe_cache)
        if reason:
            raise ValueError(f"mla_decode(variant={variant!r}): {reason}")
        if not _INTERPRETED:
            _ensure_allocator()  # global scratch for the device-side descriptors
    dev = q_latent.device
    out = torch.empty((bsz, heads, c), dtype=q_latent.dtype, device=dev)
    if out.numel() == 0:
        return out
    splits, split_target = split_plan("mla_decode", bsz, heads, kv_cache.shape[1], dev, runtime_splits, num_splits)
    block_h = _block_h(heads)
    head_blocks = cdiv(heads, block_h)
    o_part, lse = split_partials(bsz, heads, splits, c, dev)
    counters = _split_counters(bsz * head_blocks, dev) if fused else cache_seqlens  # never touched unless fused
    grid = (bsz, head_blocks, splits)
    if tma:
        tuned, configs = _decode_tma_tuned, TMA_DECODE_CONFIGS
    else:
        tuned, configs = (_decode_fused_tuned, FUSED_DECODE_CONFIGS) if fused else (_decode_tuned, DECODE_CONFIGS)
    if flags.get("EARLY"):
        tuned = None  # pinned: `config`, else the list's first
    rule = dict(SPLIT_TARGET=split_target, MIN_SPLITS=RUNTIME_MIN_SPLITS, MIN_KEYS=MIN_SPLIT_KEYS)
    tune_key = (heads, c, r, splits, q_latent.dtype, has_new, merge, split_target, variant)
    eager_tuned = config is None and tuned is not None and not tracing()  # tracing needs the autotuner
    cfg = _decode_chosen.get(tune_key) if eager_tuned else config
    args, kwargs = split_kernel_args(q_latent, q_pe, kv_cache, pe_cache, kv_new, pe_new, cache_seqlens, o_part, lse,
                                     out, counters, softmax_scale, split_target, fused=fused, variant=variant)
    launch(_mla_decode_split_kernel, tuned, configs, lambda meta: grid, args, kwargs, cfg)
    chosen = getattr(tuned, "best_config", None) if eager_tuned and cfg is None else None
    if chosen is not None:
        _decode_chosen[tune_key] = chosen
    if not fused:
        so, sl = (heads * splits * c, splits * c, c), (heads * splits, splits)  # o_part, lse: contiguous
        traceable(_mla_decode_reduce_kernel)[(bsz, heads)](
            o_part, lse, out, cache_seqlens, splits, head_blocks, *so, *sl, heads * c, c, C=c, BLOCK_C=next_pow2(c),
            BLOCK_S=next_pow2(splits), **rule)
    return out


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
                      o_part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, counters: torch.Tensor,
                      softmax_scale: float, split_target: int, *, fused: bool = False,
                      variant: str = "pointer") -> tuple[tuple, dict]:
    """The split kernel's arguments and constexprs (less the config's) writing o_part [B, H, S, C] and
    lse [B, H, S], in one place so that a new kernel argument cannot be left out of a launch (a traced
    launch missing one makes torch assume every input mutated: VARIANT_FLAGS). out / counters are only
    touched by the fused merge."""
    bsz, heads, c = q_latent.shape
    r, splits = q_pe.shape[-1], o_part.shape[2]
    has_new = kv_new is not None
    kvn, pen = (kv_new, pe_new) if has_new else (kv_cache, pe_cache)  # never read without HAS_NEW
    # Strides: one stride() tuple per input; the fresh contiguous buffers' strides by arithmetic
    # (each Tensor.stride(i) call is host time on every decode step).
    sq, sqp, skv, spe = q_latent.stride(), q_pe.stride(), kv_cache.stride(), pe_cache.stride()
    so = (heads * splits * c, splits * c, c)  # o_part [B, H, splits, C]
    sl = (heads * splits, splits)  # lse [B, H, splits]
    args = (q_latent, q_pe, kv_cache, pe_cache, kvn, pen, cache_seqlens, o_part, lse, out, counters, heads, splits,
            softmax_scale * LOG2E, sq[0], sq[1], sqp[0], sqp[1], skv[0], skv[1], spe[0], spe[1],
            kvn.stride(0), pen.stride(0), *so, *sl, heads * c, c)
    block_h = _block_h(heads)
    kwargs = dict(C=c, R=r, BLOCK_C=next_pow2(c), BLOCK_R=next_pow2(r), HAS_NEW=has_new,
                  UPCAST=_INTERPRETED,  # fp32 .to(fp32) is a no-op; also skips PTX
                  FUSED=fused, BLOCK_S=next_pow2(splits), MERGE_C=merge_cols(next_pow2(splits), block_h, c),
                  SPLIT_TARGET=split_target, MIN_SPLITS=RUNTIME_MIN_SPLITS, MIN_KEYS=MIN_SPLIT_KEYS,
                  BLOCK_H=block_h, **VARIANT_FLAGS[variant])
    return args, kwargs


# The fused merge's per-device int32 counters, zero between launches (the kernel resets each one it
# completes): kernels/_common.py arrival_counters, the buffer the router's split gate kernel shares
# (one stream: its launches and these never overlap). Names kept for mla_attention's re-exports.
_counter_cache = _arrival_buffers
_split_counters = arrival_counters
