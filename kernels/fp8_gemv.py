"""FP8 GEMV for decode steps of a few rows: the activation quantized in registers, the weight read once.

Why a second fp8 GEMM: at batch 1 the 16b decode step is a chain of small launches, each a fraction of
a weight read. The tile kernels (fp8_gemm.py, moe.py) need act_quant launched before them (their
in-kernel quantization was 2-3.5x slower on the H200: it sits between the K loop's loads and its
dot), pad M to 16 rows for mma.sync, and at N=2048 a split-K sum after them; the MoE's also need
moe_align. A [1, K] x [K, N] product needs none of that: it is N*K fp8 bytes and N*K FMAs, so CUDA
cores do the arithmetic and the cost is how many bytes are in flight.

Algorithm: a program owns BLOCK_N rows of the weight (one 128-row scale block holds them: BLOCK_N
divides 128) and one activation row. Its K loop is unrolled (K is a constexpr) in CHUNK-wide steps,
so the loads of its whole [BLOCK_N, K] slice can be issued together. Each step quantizes CHUNK/128
blocks of the activation row with kernels/fp8_quant.py quantize_rows (act_quant's arithmetic: the
same fp8 values and scales), multiplies each block's values by its activation scale times the
weight's block scale, and accumulates w * x elementwise into a [BLOCK_N, CHUNK] fp32 tile that is
summed once at the end. Against act_quant + fp8_gemm the fp32 sums run in another order (the
output can differ in its last bf16 bit), never with a different operand.

Rows: one program per (weight tile, row); a program's rows of W are re-read by the other rows'
programs (from L2 at these sizes). The MoE form (moe_gemv) takes row p's weight from expert
topk_ids.flatten()[p] and its activation from row p // TOPK: no alignment. SWIGLU: the program
computes the gate rows n and the up rows n + UP_OFFSET and stores silu(gate) * up. MUL_WEIGHT:
the row is scaled by topk_weights.flatten()[p] before the store (the down GEMM's routing weight).

Gating (engines/torch_decode_gemv.py): the decode program serves every batch up to 64, and a GEMV is
right only for the smallest. The grid's first dimension is the tiles times the rows; the traced caller
multiplies it by gemv_gate(M) and the tile path's launches by the complement, and a zero first
dimension launches nothing (Triton's launcher, and AOTInductor's C++ wrapper: `if (grid_0 == 0)
return;`), so one CUDA graph at batch 1 holds only the GEMV launches and one at batch 64 only the tile
kernels, from one compiled program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels._common import (FP8_DTYPE, QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv, check_tensor,
                                         is_interpreted, launch, next_pow2)
from dsv3_export.kernels.l2_prefetch import prefetch_l2
from dsv3_export.kernels.fp8_quant import ACT_DTYPES, quantize_rows
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.rms_norm import ResidualNorm, add_rms_stats
from dsv3_export.kernels.topk import round_to

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Largest row count the traced decode lowerings send here (gemv_gate); the tile kernels take the rest.
# H200 (session 13, kernels.py gemv, CUDA graphs, against act_quant + the tile GEMM): faster at M=1 and 2
# on wq+wkv_a and wo, slower at M=4 (12 vs 8 us: one program per row re-reads the weight from L2).
GEMV_MAX_ROWS = 2
# Weights the decode program gives the GEMV (gemv_suits): at the 16b shapes wq+wkv_a (7.5 MB) and wo
# (4.2 MB) ran 1.6-1.8x faster at M=1; the dense MLP's w1+w3 (45 MB, 18 us vs 14) and w2 (K=10944:
# 12.2 us vs 11.5) slower, its x quantized once per 8-16 weight rows; so did the MoE's experts.
GEMV_MAX_WEIGHT_BYTES = 8 << 20
GEMV_MAX_K = 4096
# One config, not autotuned: the decode program is tuned at batch 64, where the GEMV launches nothing.
# The first is the one the packages use (through a one-config autotuner, so that Inductor compiles it with
# its warps and stages: a bare kernel gets Inductor's 4 warps / 3 stages, which the session-13 packages
# ran): the fastest at M=1 and 2 on wq+wkv_a and wo of the 12 timed on the H200 (session 13: 4.3 / 3.6
# us at M=1, L2-warm); the others are the next best there, kept for the tests.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "CHUNK": 1024}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 8, "CHUNK": 1024}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 16, "CHUNK": 512}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 8, "CHUNK": 512}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_N": 32, "CHUNK": 512}, num_warps=8, num_stages=1),
]


@triton.jit
def _scaled_weight_step(q_scaled, w_ptrs, mask_n, offs_k, K: tl.constexpr, acc):
    """acc [BN, CHUNK] += w[BN, CHUNK] * q_scaled[CHUNK] (fp32 FMAs; masked weight entries 0)."""
    w = tl.load(w_ptrs + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
    return acc + w.to(tl.float32) * q_scaled[None, :]


@waits_for_producer
@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_s_ptr, c_ptr, ids_ptr, topk_w_ptr,
    ROWS, N_OUT, UP_OFFSET, TOPK,
    stride_xm, stride_we, stride_wn, stride_wse, stride_wsn, stride_cs, stride_cm,
    r_ptr, d_ptr, nw_ptr, h_ptr, stride_rm, stride_dm, stride_hm, eps,
    K: tl.constexpr, EXPERTS: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    SCALE_RECIPROCAL: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ZERO_SPLITS: tl.constexpr, NORM: tl.constexpr, KP: tl.constexpr,
    PREFETCH_W: tl.constexpr, K_LINES: tl.constexpr,
):
    """Program pid: column tile pid // ROWS, row pid % ROWS (a tile's rows adjacent: they share its
    weight in L2). EXPERTS: the weight is w[topk_ids.flatten()[row]] and x's row is row // TOPK.
    ZERO_SPLITS > 0: c is the tile GEMM's [1 + ZERO_SPLITS, M, N] split-K workspace; the result goes to
    split 0 and zeros to the others, so the sum over splits that follows is this result exactly.
    NORM (dense only): x is not read; each program computes its row's x = rms_norm(r + d) * nw itself
    (kernels/rms_norm.py: the whole row's mean square in one load of r and d, then each chunk of x from
    r, d and nw again, L2 hits), and the first column tile's program writes the row's h = r + d.
    PREFETCH_W (dense only; never interpreted): the tile's weight rows (K_LINES 128-byte lines each) are prefetched
    into L2 before the wait, so that under a programmatic graph edge their DRAM reads overlap the producer's end
    (kernels/pdl.py PRE_WAIT_CALLS; DSV3_TORCH_GEMV_PREFETCH)."""
    if PREFETCH_W:
        pf_rows = tl.minimum((tl.program_id(0) // ROWS) * BLOCK_N + tl.arange(0, BLOCK_N), N_OUT - 1).to(tl.int64)
        pf_cols = tl.minimum(tl.arange(0, K_LINES) * 128, K - 1)[None, :]
        prefetch_l2(w_ptr + pf_rows[:, None] * stride_wn + pf_cols)
        if SWIGLU:
            prefetch_l2(w_ptr + (pf_rows + UP_OFFSET)[:, None] * stride_wn + pf_cols)
    wait_for_producer()  # before any memory access: kernels/pdl.py
    tl.static_assert(SCALE_BLOCK % BLOCK_N == 0, "a column tile lies in one 128-row scale block")
    tl.static_assert(CHUNK % SCALE_BLOCK == 0, "a K step holds whole 1x128 activation blocks")
    pid = tl.program_id(0)
    row = pid % ROWS
    pid_n = pid // ROWS
    if EXPERTS:
        expert = tl.load(ids_ptr + row).to(tl.int64)
        x_row = x_ptr + (row // TOPK).to(tl.int64) * stride_xm
    else:
        expert = 0
        x_row = x_ptr + row.to(tl.int64) * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    w_gate = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    w_up = w_ptr + expert * stride_we + (offs_n + UP_OFFSET)[:, None].to(tl.int64) * stride_wn
    nb = pid_n * BLOCK_N // SCALE_BLOCK  # the tile's scale-block row
    s_gate = w_s_ptr + expert * stride_wse + nb * stride_wsn
    s_up = w_s_ptr + expert * stride_wse + ((pid_n * BLOCK_N + UP_OFFSET) // SCALE_BLOCK) * stride_wsn
    SUB: tl.constexpr = CHUNK // SCALE_BLOCK
    K_BLOCKS: tl.constexpr = (K + SCALE_BLOCK - 1) // SCALE_BLOCK

    if NORM:
        tl.static_assert(not EXPERTS, "the norm prologue is for dense rows")
        r_row = r_ptr + row.to(tl.int64) * stride_rm
        d_row = d_ptr + row.to(tl.int64) * stride_dm
        h, inv = add_rms_stats(r_row, d_row, K, eps, KP)
        if pid_n == 0:
            cols = tl.arange(0, KP)
            tl.store(h_ptr + row.to(tl.int64) * stride_hm + cols, h, mask=cols < K)
    acc_g = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    for c in tl.static_range(0, (K + CHUNK - 1) // CHUNK):
        offs_k = c * CHUNK + tl.arange(0, CHUNK)
        if NORM:
            mask_k = offs_k < K
            r = tl.load(r_row + offs_k, mask=mask_k, other=0.0)
            hk = round_to(r.to(tl.float32) + tl.load(d_row + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                          r.dtype).to(tl.float32)
            nwk = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = round_to(hk * inv * nwk, r.dtype).to(tl.float32)
        else:
            x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        q, s = quantize_rows(tl.reshape(x, (SUB, SCALE_BLOCK)), SCALE_RECIPROCAL)  # [SUB, 128], [SUB]
        kb = c * SUB + tl.arange(0, SUB)
        ws = tl.load(s_gate + kb, mask=kb < K_BLOCKS, other=0.0)
        acc_g = _scaled_weight_step(tl.reshape(q * (s * ws)[:, None], (CHUNK,)), w_gate, mask_n, offs_k, K, acc_g)
        if SWIGLU:
            ws_u = tl.load(s_up + kb, mask=kb < K_BLOCKS, other=0.0)
            acc_u = _scaled_weight_step(tl.reshape(q * (s * ws_u)[:, None], (CHUNK,)), w_up, mask_n, offs_k, K,
                                        acc_u)
    out = tl.sum(acc_g, axis=1)  # [BLOCK_N]
    if SWIGLU:
        up = tl.sum(acc_u, axis=1)
        out = out * tl.sigmoid(out) * up
    if MUL_WEIGHT:
        out = out * tl.load(topk_w_ptr + row).to(tl.float32)
    c_row = c_ptr + row.to(tl.int64) * stride_cm + offs_n
    tl.store(c_row, out.to(c_ptr.dtype.element_ty), mask=mask_n)
    for split in tl.static_range(1, ZERO_SPLITS + 1):
        tl.store(c_row + split * stride_cs, tl.zeros((BLOCK_N,), dtype=c_ptr.dtype.element_ty), mask=mask_n)


# GEMV_CONFIGS[0] as a one-config autotuner (None under the interpreter): Triton times nothing, and
# Inductor compiles the kernel with the config's warps and stages.
_fp8_gemv_single = autotune_or_single(_fp8_gemv_kernel, GEMV_CONFIGS[:1], key=[])


def gemv_suits(n: int, k: int) -> bool:
    """Whether a [N, K] fp8 weight goes to the GEMV at small batch (GEMV_MAX_WEIGHT_BYTES, GEMV_MAX_K)."""
    return n * k <= GEMV_MAX_WEIGHT_BYTES and k <= GEMV_MAX_K


def gemv_gate(m):
    """1 when a decode step of m rows (symbolic or not) runs the GEMV, else 0: floor divisions only
    (1 // ceil(m / GEMV_MAX_ROWS)), so no guard on m and a plain C++ expression in the AOTInductor
    wrapper. The tile path's launches use 1 - gemv_gate(m). m = 0 (a Python int; a traced batch is
    at least 1): 0, the tile path, which handles empty inputs."""
    if isinstance(m, int) and m == 0:
        return 0
    return 1 // ((m + GEMV_MAX_ROWS - 1) // GEMV_MAX_ROWS)


def gemv_spec(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out: torch.Tensor, *,
              topk_ids: torch.Tensor | None = None, topk: int = 1, topk_weights: torch.Tensor | None = None,
              swiglu: bool = False, scale_reciprocal: bool = True, norm: ResidualNorm | None = None,
              prefetch_w: bool = False) -> LaunchSpec:
    """The launch into out [rows, N_OUT], rows = M (dense) or T*topk (experts); inputs checked by the
    caller, no rows: nothing runs.
    Dense: x [M, K], w [N, K], w_s [ceil(N/128), ceil(K/128)]. Experts (topk_ids [T, topk] given):
    w [E, N, K], w_s [E, ceil(N/128), ceil(K/128)], out row p from x row p // topk and expert
    topk_ids.flatten()[p]. swiglu: w rows are [gate; up], out has N/2 columns, a multiple of the config's
    BLOCK_N (the caller checks: each up tile reads one 128-row scale block, as its gate tile does).
    out may also be a split-K workspace [S, M, N] (dense): the result in split 0, zeros in the rest.
    norm (dense): x is computed from it (the kernel's NORM; x is then only a shape and dtype, never read).
    prefetch_w (dense, compiled kernels only: ignored otherwise): the kernel's PREFETCH_W."""
    experts = topk_ids is not None
    rows = topk_ids.numel() if experts else x.shape[0]
    k = x.shape[1]
    n_rows = w.shape[-2]
    n_out = n_rows // 2 if swiglu else n_rows
    w_s3 = w_s if experts else w_s[None]
    w3 = w if experts else w[None]
    ids = topk_ids if experts else w_s  # never read without EXPERTS
    rw = topk_weights if topk_weights is not None else w_s  # never read without MUL_WEIGHT
    workspace = out.dim() == 3  # [S, M, N]
    r, d, nw, eps, h = norm if norm is not None else (x, x, x, 0.0, x)  # never read or written without NORM
    args = (x, w3, w_s3, out, ids, rw, rows, n_out, n_out if swiglu else 0, topk,
            x.stride(0), w3.stride(0), w3.stride(1), w_s3.stride(0), w_s3.stride(1),
            out.stride(0) if workspace else 0, out.stride(-2),
            r, d, nw, h, r.stride(0), d.stride(0), h.stride(0), float(eps))
    kwargs = dict(K=k, EXPERTS=experts, SWIGLU=swiglu, MUL_WEIGHT=topk_weights is not None,
                  SCALE_RECIPROCAL=scale_reciprocal, SCALE_BLOCK=QUANT_BLOCK,
                  ZERO_SPLITS=out.shape[0] - 1 if workspace else 0, NORM=norm is not None,
                  KP=next_pow2(k) if norm is not None else 1,
                  PREFETCH_W=prefetch_w and not experts and not is_interpreted(_fp8_gemv_kernel),
                  K_LINES=next_pow2(cdiv(k, 128)))
    grid = lambda meta: (cdiv(n_out, meta["BLOCK_N"]) * rows,)  # noqa: E731
    return LaunchSpec(_fp8_gemv_kernel, _fp8_gemv_single, GEMV_CONFIGS, grid, args, kwargs)


def _check_common(fn: str, x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out_dtype: torch.dtype, ndim: int):
    check_tensor(f"{fn}: x", x, dtypes=ACT_DTYPES, ndim=2)
    check_tensor(f"{fn}: w", w, dtypes=(FP8_DTYPE,), ndim=ndim, device=x.device)
    check_tensor(f"{fn}: w_s", w_s, dtypes=(torch.float32,), ndim=ndim, device=x.device)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{fn}: out_dtype {out_dtype} not supported; expected one of {OUT_DTYPES}")
    k = x.shape[1]
    if w.shape[-1] != k:
        raise ValueError(f"{fn}: x is [M, K={k}] but w is {tuple(w.shape)}; K must match")
    expected = (*w.shape[:-2], cdiv(w.shape[-2], QUANT_BLOCK), cdiv(k, QUANT_BLOCK))
    if tuple(w_s.shape) != expected:
        raise ValueError(f"{fn}: w_s must be {expected} (128x128 blocks of w {tuple(w.shape)}), got {tuple(w_s.shape)}")
    for name, t in (("x", x), ("w", w), ("w_s", w_s)):
        if t.stride(-1) != 1:
            raise ValueError(f"{fn}: {name} needs unit stride along its last dim, got strides {t.stride()}")


def _reciprocal(x: torch.Tensor, scale_reciprocal: bool | None) -> bool:
    """act_quant's scale form as torch computes it on x's device (kernels/fp8_quant.py)."""
    return x.is_cuda if scale_reciprocal is None else scale_reciprocal


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out_dtype: torch.dtype | None = None, *,
             config: triton.Config | None = None, scale_reciprocal: bool | None = None) -> torch.Tensor:
    """act_quant(x) 1x128 times the fp8 weight w [N, K] (128x128 scales w_s) -> [M, N], one launch:
    fp8_linear's W8A8 result for a few rows x [M, K] (bf16/fp16/fp32). Any M works; it is meant for
    M <= GEMV_MAX_ROWS (the weight is read once per row, from L2 after the first)."""
    out_dtype = out_dtype or x.dtype
    _check_common("fp8_gemv", x, w, w_s, out_dtype, 2)
    m, n = x.shape[0], w.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    launch(*gemv_spec(x, w, w_s, out, scale_reciprocal=_reciprocal(x, scale_reciprocal)), config)
    return out


def fp8_gemv_normed(r: torch.Tensor, d: torch.Tensor, nw: torch.Tensor, eps: float, w: torch.Tensor, w_s: torch.Tensor,
                    out_dtype: torch.dtype | None = None, *, config: triton.Config | None = None,
                    scale_reciprocal: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_gemv(x, w, w_s) with x = rms_norm(r + d) * nw computed in the kernel's prologue (NORM) -> (y [M, N],
    h = r + d [M, K]); r, d [M, K] bf16/fp16, nw [K] (kernels/rms_norm.py's numerics)."""
    from dsv3_export.kernels.rms_norm import check_norm

    check_norm(r, d, nw)
    out_dtype = out_dtype or r.dtype
    _check_common("fp8_gemv_normed", r, w, w_s, out_dtype, 2)
    m, n = r.shape[0], w.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=r.device)
    h = torch.empty_like(r)
    if n == 0:  # no program would run to write h
        return out, torch.add(r, d, out=h)
    if m == 0:
        return out, h
    norm = ResidualNorm(r, d, nw, eps, h)
    launch(*gemv_spec(r, w, w_s, out, scale_reciprocal=_reciprocal(r, scale_reciprocal), norm=norm), config)
    return out, h


def moe_gemv(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, topk_ids: torch.Tensor, *,
             topk_weights: torch.Tensor | None = None, fuse_swiglu: bool = False,
             out_dtype: torch.dtype | None = None, config: triton.Config | None = None,
             scale_reciprocal: bool | None = None) -> torch.Tensor:
    """The W8A8 grouped GEMM of a few tokens without alignment: x [T, K], w fp8 [E, N, K] with
    [E, ceil(N/128), ceil(K/128)] scales, topk_ids [T, k] -> [T*k, N] (N/2 with fuse_swiglu), row p
    = act_quant(x[p // k]) @ w[topk_ids.flatten()[p]]^T, times topk_weights.flatten()[p] if given
    (kernels/moe.py grouped_gemm's rows and epilogues)."""
    out_dtype = out_dtype or x.dtype
    _check_common("moe_gemv", x, w, w_s, out_dtype, 3)
    check_tensor("moe_gemv: topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2, device=x.device)
    t, topk = topk_ids.shape
    if t != x.shape[0]:
        raise ValueError(f"moe_gemv: topk_ids {tuple(topk_ids.shape)} must be [T={x.shape[0]}, k]")
    if topk_weights is not None:
        check_tensor("moe_gemv: topk_weights", topk_weights, ndim=2, device=x.device)
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(f"moe_gemv: topk_weights {tuple(topk_weights.shape)} must match topk_ids "
                             f"{tuple(topk_ids.shape)}")
    if fuse_swiglu and w.shape[1] % 2:
        raise ValueError(f"moe_gemv: fuse_swiglu needs w's rows [gate; up], an even count; got {w.shape[1]}")
    n_out = w.shape[1] // 2 if fuse_swiglu else w.shape[1]
    block_n = (config or GEMV_CONFIGS[0]).kwargs["BLOCK_N"]
    if fuse_swiglu and n_out % block_n:
        raise ValueError(f"moe_gemv: fuse_swiglu needs I = {n_out} to be a multiple of BLOCK_N = {block_n} "
                         "(an up tile must lie in one 128-row scale block, as its gate tile does)")
    out = torch.empty((t * topk, n_out), dtype=out_dtype, device=x.device)
    if t * topk == 0 or n_out == 0:
        return out
    weights = topk_weights.contiguous() if topk_weights is not None else None
    launch(*gemv_spec(x, w, w_s, out, topk_ids=topk_ids.contiguous(), topk=topk, topk_weights=weights,
                      swiglu=fuse_swiglu, scale_reciprocal=_reciprocal(x, scale_reciprocal)), config)
    return out

