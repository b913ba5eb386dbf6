"""MLA's decode query in one launch: W_UK absorbed into q_nope (mla_absorb.py head_gemm) and q_pe rotated by RoPE.

Why: with the query's RoPE inside the MLA split kernel (engines/torch_q_rope.py, DSV3_TORCH_Q_ROPE=kernel) the
Inductor kernel that rotated q_pe before the attention went (27 launches per 27-layer 16b decode step), but the split
kernel got 20-24 us slower per batch-1 step on the H200 (session 21): every split program reads the position, then
the tables' row, before its first score. The head_gemm launch of W_UK runs just before the split kernel and reads
the same query; here it also writes the rotated q_pe, from programs of their own, so the split kernel reads a
ready q_pe again (DSV3_TORCH_Q_ROPE=absorb).

Layouts:
  x, w, out          as head_gemm's: x [M, H, K] (q_nope[:, 0]), w [H, K, N] (W_UK), out [M, H, N]
  q_pe               [M, H, R] before RoPE (any row / head strides, unit stride on R), R even
  cos, sin           the rope tables [P, R/2] fp32 (unit stride on the columns)
  pos                [M] int, each row's position (clamped to [0, P - 1] here, as the split kernel clamps it)
  q_pe_out           [M, H, R] q_pe's dtype (contiguous from the launcher)

Grid (H, N tiles + 1, M tiles): column 0 of each (head, row block) rotates the block's q_pe rows of that head, the
others compute head_gemm's tiles (column c - 1). The rotation is _q_pe_tile's (kernels/mla_decode_kernels.py) through
one helper, rotate_pairs: the same bits as the split kernel's ROPE_Q and as Inductor's apply_rotary_emb in the
CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels import mla_absorb as ka
from dsv3_export.kernels._common import LaunchSpec, autotune_or_single, cdiv, check_tensor, launch, next_pow2
from dsv3_export.kernels.mla_absorb import _head_gemm_column_tile
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer
from dsv3_export.kernels.topk import _round_bf16


@triton.jit
def rotate_pairs(x, partner, c, s, r, ROUND_BF16: tl.constexpr):
    """RoPE of interleaved pairs (2i, 2i + 1), elementwise: x at column r, partner at r ^ 1, c / s the tables' column
    r // 2, all broadcast alike -> fp32, rounded to bf16 (to nearest even, in integers) when ROUND_BF16. Even r:
    x0 * c - x1 * s with (x0, x1) = (x, partner); odd r: x0 * s + x1 * c with (x0, x1) = (partner, x) (reference/
    layers.py apply_rotary_emb)."""
    x32 = x.to(tl.float32)
    partner = partner.to(tl.float32)
    y = tl.where((r % 2) == 0, x32 * c - partner * s, partner * s + x32 * c)
    if ROUND_BF16:
        y = _round_bf16(y)
    return y


@triton.jit
def _rotate_rows(q_pe_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, head, offs_m, mask_m, ROPE_ROWS,
                 stride_qpm, stride_qph, stride_rope, stride_om, stride_oh, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """q_pe rows offs_m of `head` rotated at each row's position into out."""
    r = tl.arange(0, BLOCK_R)[None, :]
    mask_r = r < R
    mask = mask_m[:, None] & mask_r
    rows = offs_m.to(tl.int64)[:, None]
    src = q_pe_ptr + rows * stride_qpm + head * stride_qph
    x = tl.load(src + r, mask=mask, other=0.0)
    partner = tl.load(src + (r ^ 1), mask=mask, other=0.0)
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + offs_m, mask=mask_m, other=0), 0), ROPE_ROWS - 1)
    table = pos.to(tl.int64)[:, None] * stride_rope + r // 2
    c = tl.load(cos_ptr + table, mask=mask, other=0.0)
    s = tl.load(sin_ptr + table, mask=mask, other=0.0)
    y = rotate_pairs(x, partner, c, s, r, out_ptr.dtype.element_ty == tl.bfloat16)
    tl.store(out_ptr + rows * stride_om + head * stride_oh + r, y.to(out_ptr.dtype.element_ty), mask=mask)


@waits_for_producer
@triton.jit
def _head_gemm_rope_kernel(
    x_ptr, w_ptr, out_ptr, q_pe_ptr, cos_ptr, sin_ptr, pos_ptr, q_pe_out_ptr,
    M, K, N, M_BUCKET, ROPE_ROWS,  # M_BUCKET: unused in the body, a runtime arg only to key the autotuner
    stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn, stride_om, stride_oh, stride_on,
    stride_qpm, stride_qph, stride_rope, stride_qom, stride_qoh,
    R: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    wait_for_producer()  # before any memory access: kernels/pdl.py
    head = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    tile = tl.program_id(1)
    if tile == 0:  # the rotation's own programs, dispatched first: their dependent loads start early
        _rotate_rows(q_pe_ptr, cos_ptr, sin_ptr, pos_ptr, q_pe_out_ptr, head, offs_m, mask_m, ROPE_ROWS,
                     stride_qpm, stride_qph, stride_rope, stride_qom, stride_qoh, R, BLOCK_R)
    else:  # head_gemm's column tile - 1
        _head_gemm_column_tile(x_ptr, w_ptr, out_ptr, head, offs_m, mask_m, tile - 1, K, N,
                               stride_xm, stride_xh, stride_xk, stride_wh, stride_wk, stride_wn,
                               stride_om, stride_oh, stride_on, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)


# head_gemm's configs up to 32 rows (the decode program's; sm_90: 64-row tiles with the rotation spilled 336 bytes)
HEAD_GEMM_ROPE_CONFIGS = [cfg for cfg in ka.HEAD_GEMM_CONFIGS if cfg.kwargs["BLOCK_M"] <= 32]
_head_gemm_rope_tuned = autotune_or_single(_head_gemm_rope_kernel, HEAD_GEMM_ROPE_CONFIGS, key=["M_BUCKET", "K", "N"])


def head_gemm_rope_spec(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bucket: int, q_pe: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, q_pe_out: torch.Tensor) -> LaunchSpec:
    """The launch for head_gemm(x, w) into out and q_pe rotated into q_pe_out (the module docstring; checked by
    the caller). bucket: the autotune key's M, as head_gemm_spec's."""
    m, h, k = x.shape
    n, r = w.shape[2], q_pe.shape[2]
    grid = lambda meta: (h, cdiv(n, meta["BLOCK_N"]) + 1, cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    args = (x, w, out, q_pe, cos, sin, pos, q_pe_out, m, k, n, bucket, cos.shape[0], *x.stride(), *w.stride(),
            *out.stride(), q_pe.stride(0), q_pe.stride(1), cos.stride(0), q_pe_out.stride(0), q_pe_out.stride(1))
    kwargs = dict(R=r, BLOCK_R=next_pow2(r), UPCAST=ka._INTERPRETED and x.dtype != torch.float32)
    return LaunchSpec(_head_gemm_rope_kernel, _head_gemm_rope_tuned, HEAD_GEMM_ROPE_CONFIGS, grid, args, kwargs)


def check_rope_tables(op: str, q_rope, bsz, r: int, device: torch.device) -> None:
    """Raise naming the tensor when q_rope = (cos, sin, positions) are not fp32 [P, R/2] tables (P >= 1) with unit
    stride along R/2 and one row stride, and contiguous int positions [B]: the split kernel's ROPE_Q (kernels/
    mla_decode.py) and head_gemm_rope read them alike."""
    if len(q_rope) != 3:
        raise ValueError(f"{op}: q_rope is (cos, sin, positions), got {len(q_rope)} tensors")
    cos, sin, pos = q_rope
    if r % 2:
        raise ValueError(f"{op}: q_rope needs an even rope dim, got R={r}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(f"{op}: q_rope {name}", t, dtypes=(torch.float32,), ndim=2, device=device)
        if t.shape[1] != r // 2 or t.stride(1) != 1 or t.shape[0] < 1:
            raise ValueError(f"{op}: q_rope {name} {tuple(t.shape)} must be [P, R/2={r // 2}] with unit stride")
    if cos.shape != sin.shape or cos.stride(0) != sin.stride(0):
        raise ValueError(f"{op}: q_rope cos {tuple(cos.shape)} and sin {tuple(sin.shape)} need one shape and stride")
    check_tensor(f"{op}: q_rope positions", pos, dtypes=(torch.int32, torch.int64), ndim=1, device=device,
                 contiguous=True)
    if pos.shape[0] != bsz:
        raise ValueError(f"{op}: q_rope positions has {pos.shape[0]} entries for batch {bsz}")


def head_gemm_rope(x: torch.Tensor, w: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   pos: torch.Tensor, *, config: triton.Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(head_gemm(x, w) [M, H, N], q_pe rotated at each row's position [M, H, R]) in one launch."""
    ka.check_head_gemm(x, w)
    m, h, _ = x.shape
    check_tensor("head_gemm_rope: q_pe", q_pe, dtypes=ka.DTYPES, ndim=3, device=x.device)
    if q_pe.shape[:2] != (m, h) or q_pe.shape[2] % 2 or q_pe.stride(2) != 1:
        raise ValueError(f"head_gemm_rope: q_pe {tuple(q_pe.shape)} (strides {q_pe.stride()}) must be [M={m}, H={h}, "
                         f"R] with R even and unit stride on R")
    pos = pos.contiguous()
    check_rope_tables("head_gemm_rope", (cos, sin, pos), m, q_pe.shape[2], x.device)
    out = torch.empty((m, h, w.shape[2]), dtype=x.dtype, device=x.device)
    q_pe_out = torch.empty(q_pe.shape, dtype=q_pe.dtype, device=x.device)
    if m:
        launch(*head_gemm_rope_spec(x, w, out, ka.m_bucket(m), q_pe, cos, sin, pos, q_pe_out), config)
    return out, q_pe_out
