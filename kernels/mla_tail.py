"""MLA decode's tail in one kernel: merge of the split-KV partials, W_UV, and act_quant of wo's input.

Why: after kernels/mla_decode.py's split kernel, the fp8 decode step ran three small kernels per layer
that each read a few KB: `_mla_decode_reduce_kernel` (merge the splits into the latent lat [b, h, c]),
head_gemm with W_UV (lat [b, h, c] x W_UV[h] -> [b, h, dv]) and `_act_quant_kernel` of the flattened
[b, h * dv] (wo's fp8 input). At batch 1 the H200 profile had them at ~2.0 + 3.1 + 2.6 us per layer,
launch latency more than work. Here one program does all three for its rows and one head.

Layouts (what the split kernel writes, mla_decode's separate-merge layout):
  o_part  [B, H, S, C] fp32  each split's normalized partial latent; lse [B, H, S] fp32 (log2-sum-exp,
                             -inf for an empty split). A row's first `splits` partials were written:
                             S of them for a fixed split count, the runtime rule's count otherwise
                             (SPLIT_TARGET > 0: kernels/mla_splits.py, recomputed here as the reduce
                             kernel does, from B x HEAD_BLOCKS and the row's cache length)
  w_uv    [H, DV, C]         W_UV as the strided view wkv_b.view(h, dn + dv, c)[:, dn:] (C contiguous),
                             in the latent's dtype (bf16/fp16; fp32 only in the CPU interpreter)
  QUANT   q fp8 e4m3 [B, H * DV] and s fp32 [B, H]: act_quant of the [B, H * DV] output, one 1x128 block
          per head (needs DV == 128); otherwise out [B, H, DV] in the latent's dtype.

Arithmetic, matched to the separate kernels it replaces: lat = sum_s o_s 2^(lse_s - m) / sum_s 2^(lse_s - m)
in fp32 (the reduce kernel's form), rounded to the latent dtype (the reduce kernel stores lat so); the
W_UV product from those rounded operands with fp32 accumulation, rounded to the latent dtype (head_gemm
stores so); then kernels/fp8_quant.py quantize_rows on that, act_quant's exact arithmetic (the scale
as _act_quant picks it for the device: amax * fp32(1/448) on CUDA, IEEE amax / 448 on the CPU).
The sums run in another order than the separate kernels' (the merge per K chunk, the dot in other
tiles), so now and then a value lands one bf16 step away, and its fp8 code one e4m3 step away.

Algorithm: a program owns BLOCK_B rows and one head (grid (cdiv(B, BLOCK_B), H)) and walks C in
BLOCK_K chunks: it merges the chunk's partials ([BLOCK_B, BLOCK_S, BLOCK_K] fp32) and multiplies the
rounded chunk with W_UV[h]'s [DV, BLOCK_K] slice by tl.dot with the rows on N ("swap AB": M = DV = 128
fits the tensor cores). Triton's pipeliner streams both loads through cp.async over num_stages (sm_90
PTX: cp.async + wgmma m64n16k16; a hand-written prefetch of the next partials into registers instead
kept the loop from being pipelined at all: one W_UV buffer, no cp.async). BLOCK_B = 1 (DOT_N = 16: the
one row broadcast to the dot's minimum N) gives H programs per row, each streaming its head's 128 KB
of W_UV once per row: the batch-1 form. BLOCK_B = 16 reads W_UV once per 16 rows (at B = 64 the 1-row
form would read 2 MB x 64 from L2) with smaller K chunks to bound the merge tile's registers.
sm_90 (ptxas, tests/kernels/_sm90_compile.py, runtime split rule, C = 512): wgmma m64n16k16 bf16 fed by
cp.async in every config, no spills; BLOCK_B = 1: 176-249 registers per thread, 34-70 KB of shared
memory (one program per SM at most at batch 1 anyway: 16 programs); BLOCK_B = 16: 127-189 registers,
100-140 KB (the merge tile is pipelined too). Not measured on a GPU yet (benchmarks/kernels.py `tail`).
Autotune key: B_BUCKET (a runtime argument only to key the tuner, as head_gemm's M_BUCKET), never B.
The traced decode program passes a constant bucket, so AOTInductor tunes once, at its example batch.
Under TRITON_INTERPRET=1 the dot's operands are upcast to fp32 (UPCAST: the interpreter's bf16 dot is
wrong); the rounding to the latent dtype happens before, so the products are the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels import mla_decode as kd
from dsv3_export.kernels._common import (QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv, check_tensor,
                                         is_interpreted, launch, next_pow2)
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.fp8_quant import act_quant_outputs, quantize_rows
from dsv3_export.kernels.mla_attention import _check_caches, _check_new
from dsv3_export.kernels.mla_splits import (MIN_SPLIT_KEYS, RUNTIME_MIN_SPLITS, _batch_splits, _block_h, _row_splits,
                                           runtime_num_splits)
from dsv3_export.kernels.mla_splits import runtime_split_target  # noqa: F401  (callers' split_target, as kt.*)
from dsv3_export.reference import fp8 as fp8_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DECODE_MAX_B = 64  # B at or below: the autotune key's bucket is next_pow2(B); above: one bucket

# BLOCK_B 1: the batch-1 form (DOT_N 16: the row broadcast to the dot's minimum N), W_UV in 64/128-wide
# K chunks over 2-4 stages (16-32 KB each; 128 wide at 4 warps spilled 804 B on sm_90); BLOCK_B 16: W_UV read once per 16 rows, 16/32-wide chunks
# (the [16, BLOCK_S, BLOCK_K] fp32 merge tile, twice for the prefetch, at 8 warps). The first config
# is the interpreter's (one launch, no autotune).
MLA_TAIL_CONFIGS = [
    triton.Config({"BLOCK_B": 1, "DOT_N": 16, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 1, "DOT_N": 16, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 1, "DOT_N": 16, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_B": 1, "DOT_N": 16, "BLOCK_K": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_B": 16, "DOT_N": 16, "BLOCK_K": 16}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_B": 16, "DOT_N": 16, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]


@triton.jit
def _merge_chunk(o, w, denom, DTYPE: tl.constexpr):
    """[BB, BS, BK] partials, [BB, BS] weights, [BB] sums -> the merged chunk [BB, BK], rounded to DTYPE."""
    return (tl.sum(o * w[:, :, None], axis=1) / denom[:, None]).to(DTYPE)


@waits_for_producer
@triton.jit
def _mla_tail_kernel(
    o_part_ptr, lse_ptr, seqlens_ptr, w_ptr, out_ptr, s_ptr,
    B, NUM_SPLITS, HEAD_BLOCKS, B_BUCKET,  # B_BUCKET: unused in the body, a runtime arg only to key the autotuner
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_wh, stride_wd, stride_wc,
    stride_outb, stride_outh, stride_sb,
    C: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_TARGET: tl.constexpr, MIN_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr,  # > 0: the runtime split rule
    QUANT: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, DOT_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    pid_b = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows < B
    seqlen = tl.load(seqlens_ptr + rows, mask=mask_b, other=0)  # [BB] cached keys per row
    if SPLIT_TARGET > 0:  # the split kernel's runtime rule: only the row's first `splits` partials were written
        programs = (tl.num_programs(1) * 0 + B) * HEAD_BLOCKS  # (row, head block) pairs; a tensor when B == 1
        splits = _row_splits(_batch_splits(programs, NUM_SPLITS, SPLIT_TARGET, MIN_SPLITS), seqlen, MIN_KEYS)
    else:
        splits = tl.zeros((BLOCK_B,), dtype=tl.int32) + NUM_SPLITS
    offs_s = tl.arange(0, BLOCK_S)
    mask_bs = mask_b[:, None] & (offs_s[None, :] < splits[:, None])  # [BB, BS]
    rows64 = rows.to(tl.int64)
    lse = tl.load(lse_ptr + rows64[:, None] * stride_lb + head * stride_lh + offs_s[None, :], mask=mask_bs,
                  other=float("-inf"))  # [BB, BS]
    m = tl.max(lse, axis=1)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)[:, None])  # 0 for empty splits and rows with no key
    denom = tl.sum(w, axis=1)
    denom = tl.where(denom > 0, denom, 1.0)

    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < DV
    o_ptrs = o_part_ptr + rows64[:, None, None] * stride_ob + head * stride_oh + \
        offs_s[None, :, None] * stride_os + offs_k[None, None, :]  # [BB, BS, BK]
    mask_o = mask_bs[:, :, None]
    w_ptrs = w_ptr + head * stride_wh + offs_d[:, None] * stride_wd + offs_k[None, :] * stride_wc  # [BD, BK]
    o = tl.load(o_ptrs, mask=mask_o & (offs_k < C)[None, None, :], other=0.0)
    acc = tl.zeros((BLOCK_D, DOT_N), dtype=tl.float32)  # out^T: the rows on the dot's N
    for k0 in range(0, C, BLOCK_K):
        o = tl.load(o_ptrs + k0, mask=mask_o & (offs_k < C - k0)[None, None, :], other=0.0)
        lat_t = tl.trans(_merge_chunk(o, w, denom, w_ptr.dtype.element_ty))  # [BK, BB] the latent, rounded
        if BLOCK_B < DOT_N:  # one row: broadcast to the dot's minimum N (every column the same)
            lat_t = tl.broadcast_to(lat_t, (BLOCK_K, DOT_N))
        w_uv = tl.load(w_ptrs + k0 * stride_wc, mask=mask_d[:, None] & (offs_k < C - k0)[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong
            lat_t = lat_t.to(tl.float32)
            w_uv = w_uv.to(tl.float32)
        acc += tl.dot(w_uv, lat_t)  # [BD, BK] x [BK, DOT_N]

    y = tl.trans(acc).to(w_ptr.dtype.element_ty)  # [DOT_N, BD], rounded as head_gemm stores it
    cols = tl.arange(0, DOT_N)
    out_rows = (pid_b * BLOCK_B + cols).to(tl.int64)
    mask_row = (cols < BLOCK_B) & (out_rows < B)
    out_ptrs = out_ptr + out_rows[:, None] * stride_outb + head * stride_outh + offs_d[None, :]
    if QUANT:  # BLOCK_D == DV == 128: the head's outputs are one 1x128 block of wo's input
        q, s = quantize_rows(y.to(tl.float32), SCALE_RECIPROCAL)
        tl.store(out_ptrs, q.to(out_ptr.dtype.element_ty), mask=mask_row[:, None] & mask_d[None, :])
        tl.store(s_ptr + out_rows * stride_sb + head, s, mask=mask_row)
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_row[:, None] & mask_d[None, :])


_INTERPRETED = is_interpreted(_mla_tail_kernel)
_mla_tail_tuned = autotune_or_single(_mla_tail_kernel, MLA_TAIL_CONFIGS,
                                     key=["B_BUCKET", "C", "DV", "NUM_SPLITS", "SPLIT_TARGET", "QUANT"])


def b_bucket(b: int) -> int:
    """The autotune key's batch: next_pow2(B) up to DECODE_MAX_B, one bucket above."""
    return next_pow2(b) if b <= DECODE_MAX_B else 2 * DECODE_MAX_B


def tail_outputs(batch, heads: int, dv: int, dtype: torch.dtype, quant: bool, device: torch.device):
    """The kernel's outputs, allocated: (q fp8 [B, H * DV], s fp32 [B, H]) or (out [B, H, DV], None)."""
    if quant:
        return act_quant_outputs(batch, heads * dv, device)  # [B, H * DV], [B, H] (dv == 128)
    return torch.empty((batch, heads, dv), dtype=dtype, device=device), None


def mla_tail_spec(o_part: torch.Tensor, lse: torch.Tensor, cache_seqlens: torch.Tensor, w_uv: torch.Tensor,
                  out: torch.Tensor, s: torch.Tensor | None, split_target: int, scale_reciprocal: bool,
                  bucket: int) -> LaunchSpec:
    """The launch over the split kernel's o_part [B, H, S, C] / lse [B, H, S] (contiguous), w_uv [H, DV, C]
    (unit stride on C) into out (q [B, H * DV] with s [B, H] when s is given, else [B, H, DV]).
    split_target: the split kernel's SPLIT_TARGET (0: all S partials written). bucket: b_bucket(B) or a
    constant when B is traced. Nothing here branches on B."""
    b, h, splits, c = o_part.shape
    dv = w_uv.shape[1]
    quant = s is not None
    grid = lambda meta: (cdiv(b, meta["BLOCK_B"]), h)  # noqa: E731
    s_arg = s if quant else lse  # never touched without QUANT
    so = (h * splits * c, splits * c, c)  # o_part [B, H, S, C]
    sl = (h * splits, splits)  # lse [B, H, S]
    sw = w_uv.stride()
    args = (o_part, lse, cache_seqlens, w_uv, out, s_arg, b, splits, cdiv(h, _block_h(h)), bucket, *so, *sl, *sw,
            h * dv, dv, h)  # q [B, H * DV] (head h: columns h*DV..) and out [B, H, DV] alike; s [B, H]
    kwargs = dict(C=c, DV=dv, BLOCK_D=max(16, next_pow2(dv)), BLOCK_S=next_pow2(splits), SPLIT_TARGET=split_target,
                  MIN_SPLITS=RUNTIME_MIN_SPLITS, MIN_KEYS=MIN_SPLIT_KEYS, QUANT=quant,
                  SCALE_RECIPROCAL=scale_reciprocal, UPCAST=_INTERPRETED and w_uv.dtype != torch.float32)
    return LaunchSpec(_mla_tail_kernel, _mla_tail_tuned, MLA_TAIL_CONFIGS, grid, args, kwargs)


def decode_partials_spec(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                         kv_new: torch.Tensor | None, pe_new: torch.Tensor | None, cache_seqlens: torch.Tensor,
                         o_part: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
                         split_target: int) -> LaunchSpec:
    """kernels/mla_decode.py's split kernel alone (the separate-merge form, its autotuner), writing
    o_part [B, H, S, C] and lse [B, H, S] for mla_tail instead of the reduce kernel. Inputs as
    mla_decode takes them (checked by the caller); split_target as mla_decode(runtime_splits=True)
    passes it, or 0 for S fixed splits."""
    b, heads = q_latent.shape[:2]
    grid = (b, cdiv(heads, _block_h(heads)), o_part.shape[2])
    # out_ptr / cnt_ptr: only the fused merge touches them (o_part / cache_seqlens stand in)
    args, kwargs = kd.split_kernel_args(q_latent, q_pe, kv_cache, pe_cache, kv_new, pe_new, cache_seqlens, o_part, lse,
                                        o_part, cache_seqlens, softmax_scale, split_target)
    return LaunchSpec(kd._mla_decode_split_kernel, kd._decode_tuned, kd.DECODE_CONFIGS, lambda meta: grid, args,
                      kwargs)


def check_w_uv(op: str, w_uv: torch.Tensor, heads: int, c: int, dtype: torch.dtype, quant: bool) -> int:
    """Raise naming the problem when w_uv is not a [H, DV, C] view the kernel takes; returns DV."""
    check_tensor(f"{op}: w_uv", w_uv, dtypes=(dtype,), ndim=3)
    hw, dv, cw = w_uv.shape
    if (hw, cw) != (heads, c):
        raise ValueError(f"{op}: w_uv is [H={hw}, DV={dv}, C={cw}], expected H={heads}, C={c}")
    if w_uv.stride(2) != 1:
        raise ValueError(f"{op}: w_uv needs unit stride on C, got strides {w_uv.stride()}")
    if quant and dv != QUANT_BLOCK:
        raise ValueError(f"{op}: quant=True needs DV == {QUANT_BLOCK} (one 1x128 block per head), got DV={dv}")
    return dv


def mla_tail(o_part: torch.Tensor, lse: torch.Tensor, cache_seqlens: torch.Tensor, w_uv: torch.Tensor, *,
             split_target: int = 0, quant: bool = True, config: triton.Config | None = None):
    """Merge the split partials, apply W_UV and (quant) act_quant: -> (q fp8 [B, H * DV], s fp32 [B, H]),
    or [B, H, DV] in w_uv's dtype with quant=False.

    o_part [B, H, S, C] / lse [B, H, S] fp32 contiguous, as mla_decode's split kernel writes them;
    cache_seqlens int32 [B]; split_target: 0 when all S partials were written, runtime_split_target(device)
    for the runtime rule's partials. config: one of MLA_TAIL_CONFIGS (tests)."""
    check_tensor("mla_tail: o_part", o_part, dtypes=(torch.float32,), ndim=4, contiguous=True)
    b, h, splits, c = o_part.shape
    dev = o_part.device
    check_tensor("mla_tail: lse", lse, dtypes=(torch.float32,), ndim=3, device=dev, contiguous=True)
    check_tensor("mla_tail: cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=dev, contiguous=True)
    if tuple(lse.shape) != (b, h, splits) or tuple(cache_seqlens.shape) != (b,):
        raise ValueError(f"mla_tail: lse {tuple(lse.shape)} / cache_seqlens {tuple(cache_seqlens.shape)} do not match "
                         f"o_part [B={b}, H={h}, S={splits}, C={c}]")
    if not 1 <= splits <= 1024:
        raise ValueError(f"mla_tail: {splits} splits, must be in [1, 1024]")
    dv = check_w_uv("mla_tail", w_uv, h, c, w_uv.dtype, quant)
    if w_uv.dtype not in DTYPES or w_uv.device != dev:
        raise ValueError(f"mla_tail: w_uv must be bf16/fp16/fp32 on {dev}, got {w_uv.dtype} on {w_uv.device}")
    out, s = tail_outputs(b, h, dv, w_uv.dtype, quant, dev)
    if b and h:
        launch(*mla_tail_spec(o_part, lse, cache_seqlens, w_uv, out, s, split_target, dev.type == "cuda",
                              b_bucket(b)), config)
    return (out, s) if quant else out


def mla_decode_tail(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                    cache_seqlens: torch.Tensor, softmax_scale: float, w_uv: torch.Tensor, *,
                    kv_new: torch.Tensor | None = None, pe_new: torch.Tensor | None = None, quant: bool = True,
                    num_splits: int | None = None, runtime_splits: bool = False,
                    config: triton.Config | None = None, split_config: triton.Config | None = None):
    """mla_decode's split kernel, then mla_tail: the attention's output through W_UV per head, quantized
    for wo (quant: (q [B, H * DV], s [B, H])) or [B, H, DV]. Arguments as mla_decode's; w_uv [H, DV, C]."""
    check_tensor("mla_decode_tail: q_latent", q_latent, ndim=3)
    bsz, heads, _ = q_latent.shape
    c, _ = _check_caches("mla_decode_tail", q_latent, q_pe, kv_cache, pe_cache, bsz)
    dev = q_latent.device
    check_tensor("mla_decode_tail: cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=dev,
                 contiguous=True)
    if cache_seqlens.shape[0] != bsz:
        raise ValueError(f"mla_decode_tail: cache_seqlens has {cache_seqlens.shape[0]} entries for batch {bsz}")
    _check_new("mla_decode_tail", kv_new, pe_new, q_latent, (bsz, c), (bsz, q_pe.shape[-1]))
    dv = check_w_uv("mla_decode_tail", w_uv, heads, c, q_latent.dtype, quant)
    splits, split_target = kd.split_plan("mla_decode_tail", bsz, heads, kv_cache.shape[1], dev, runtime_splits,
                                         num_splits)
    if bsz * heads == 0:
        out, s = tail_outputs(bsz, heads, dv, q_latent.dtype, quant, dev)
        return (out, s) if quant else out
    o_part, lse = kd.split_partials(bsz, heads, splits, c, dev)
    launch(*decode_partials_spec(q_latent, q_pe, kv_cache, pe_cache, kv_new, pe_new, cache_seqlens, o_part, lse,
                                 softmax_scale, split_target), split_config)
    return mla_tail(o_part, lse, cache_seqlens, w_uv, split_target=split_target, quant=quant, config=config)


def used_splits(cache_seqlens: torch.Tensor, heads: int, splits: int, runtime_splits: bool) -> torch.Tensor:
    """Partials written per row (int64 [B]): all `splits`, or the runtime rule's count (runtime_num_splits)."""
    b = cache_seqlens.shape[0]
    if not runtime_splits:
        return torch.full((b,), splits, dtype=torch.int64)
    return torch.tensor([runtime_num_splits(b, heads, int(n), cache_seqlens.device) for n in cache_seqlens.tolist()],
                        dtype=torch.int64)


def mla_tail_ref(o_part: torch.Tensor, lse: torch.Tensor, used: torch.Tensor, w_uv: torch.Tensor, quant: bool = True):
    """ATen oracle: merge the first used[b] partials of each row (fp32, rounded to w_uv's dtype), W_UV in fp32
    (rounded likewise), then reference act_quant of [B, H * DV] (quant) -> (q, s) or [B, H, DV]."""
    b, h, splits, c = o_part.shape
    dtype = w_uv.dtype
    valid = torch.arange(splits, device=o_part.device)[None, None, :] < used.to(o_part.device)[:, None, None]  # [B,1,S]
    lse = torch.where(valid, lse, float("-inf"))  # [B, H, S]
    m = lse.amax(dim=-1, keepdim=True)
    w = torch.exp2(lse - torch.where(m == float("-inf"), 0.0, m))  # [B, H, S]
    denom = w.sum(dim=-1, keepdim=True)
    o = torch.where(valid[..., None], o_part, 0.0)  # [B, H, S, C]; unwritten partials may be anything
    lat = ((o * w[..., None]).sum(dim=2) / torch.where(denom > 0, denom, 1.0)).to(dtype)  # [B, H, C]
    y = torch.einsum("bhc,hdc->bhd", lat.float(), w_uv.float()).to(dtype)  # [B, H, DV]
    if not quant:
        return y
    return fp8_ref.act_quant(y.reshape(b, h * w_uv.shape[1]))  # q [B, H * DV], s [B, H]
