"""The MoE gate GEMM of a decode step, split over K into fp32 partials that the router kernel sums.

    partials = gate_partials(x [T, K], w [E, K])    # fp32 [S, T, E], S = ceil(K / 128)
    logits  == round(partials.sum(0) in split order) # kernels/topk.py router kernel (SPLITS = S)

Why: cuBLAS runs the batch-1 gate (x [1, 2048] . W [64, 2048]^T, 256 KB of bf16 weight) as one 64x8
tile: one CTA streams the whole weight, 4.96 us per MoE layer in the 16b batch-1 step on the H200
(session 18 profile), where the bytes take ~0.1 us at copy bandwidth. Putting the gate inside the
router kernel lost (one program: 13.2 us; the experts split over programs: no faster, sessions 7-8),
because the top-k needs every logit in one program. Here K is split instead: program (t, e, s)
computes x[t-block, 128 s : 128 s + 128] . W[e-block, same]^T into partials[s], so at batch 1 the
16 programs each read 16 KB, and the router kernel (which reads the [T, E] logits anyway) sums the S
partials in a fixed order before it routes: still two launches, the first spread over the SMs.

The MoE's act_quant of x (1x128 blocks) rides along (quant_x): a program's x tile is exactly one
quantization block, so the first expert block's programs also write q and s, and the fp8 MoE op no
longer launches its own act_quant for x (engines/torch_router.py, one launch fewer per MoE layer).

Numerics: the products and sums are fp32 (tl.dot, fp32 accumulation), and the router rounds the sum
to bf16 with round-to-nearest-even, as F.linear's bf16 output is rounded; against cuBLAS only the
summation order differs (the logits can differ in their last bf16 bit). fp32 models keep the fp32 sum.
Under TRITON_INTERPRET=1 bf16 operands are upcast before the dot (UPCAST: the interpreter's bf16 dot
is wrong); an fp32 dot asks for IEEE precision (on the GPU the default would be TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3_export.kernels import topk
from dsv3_export.kernels._common import (QUANT_BLOCK, LaunchSpec, autotune_or_single, cdiv, check_tensor,
                                         is_interpreted, launch)
from dsv3_export.kernels.fp8_quant import act_quant_outputs, quantize_rows
from dsv3_export.kernels.pdl import wait_for_producer, waits_for_producer

DTYPES = (torch.bfloat16, torch.float32)  # logits the router rounds back exactly (bf16) or keeps (fp32)
SPLIT_K = QUANT_BLOCK  # K per partial (and one act_quant block): S = ceil(K / SPLIT_K) partials
# BLOCK_T 16 is tl.dot's minimum M (batch <= 16 in one tile); BLOCK_E splits the experts (V3's 256) so
# that a program's [BLOCK_E, 128] weight tile stays small. The packages run the first config through a one-config
# autotuner (the tests run them all): the decode program is tuned at batch 64, where the 4-warp and 2-warp configs
# timed within 30% of each other and builds picked either; at batch 1 in the 27-layer H200 step (with act_quant(x))
# the 4-warp config took 4.8 us per call, the 2-warp ones 7.4 (session 19). With act_quant(x) every program of the
# whole-tile form quantizes its [16, 128] x tile (IEEE divisions, 16 values a thread at 4 warps), though at batch 1
# only one row is real: 2.8 us of the cold-L2 gate + router's 8.1 (session 19); hence ROW_QUANT_MAX_ROWS.
GATE_CONFIGS = [
    triton.Config({"BLOCK_T": 16, "BLOCK_E": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 16, "BLOCK_E": 64}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_T": 16, "BLOCK_E": 32}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_T": 64, "BLOCK_E": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 16, "BLOCK_E": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_T": 16, "BLOCK_E": 64}, num_warps=16, num_stages=1),
]
# quant_x: blocks of at most this many real rows quantized one row at a time, fuller ones as a tile (0: always
# the tile). The default since session 20: at batch 1 a sixteenth of the tile's arithmetic; on the H200 the gate
# kernel with act_quant(x) took 2.3 us per call in the 16b batch-1 step against 4.7 as tiles, and the cold-L2 gate +
# router 5.6 us against 7.9, as fast as without act_quant (benchmarks/RESULTS.md session 20).
ROW_QUANT_MAX_ROWS = 4


@triton.jit
def _quantize_tile(x, offs_t, offs_k, mask_t, mask_k, q_ptr, s_ptr, stride_qt, stride_st, split,
                   SCALE_RECIPROCAL: tl.constexpr):
    """act_quant of the program's whole [BLOCK_T, 128] x tile (rows past T masked)."""
    q, s = quantize_rows(x.to(tl.float32), SCALE_RECIPROCAL)
    rows64 = offs_t[:, None].to(tl.int64)
    tl.store(q_ptr + rows64 * stride_qt + offs_k[None, :], q.to(q_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_k[None, :])
    tl.store(s_ptr + offs_t.to(tl.int64) * stride_st + split, s, mask=mask_t)


@triton.jit
def _quantize_rows_one_by_one(x_ptr, first_row, n_rows, offs_k, mask_k, q_ptr, s_ptr, stride_xt, stride_qt,
                              stride_st, split, SCALE_RECIPROCAL: tl.constexpr):
    """act_quant of the block's n_rows real rows, one [1, 128] row at a time: at batch 1 a sixteenth of
    _quantize_tile's arithmetic (its 15 zero rows), each row re-read (from L1: the tile's load brought it)."""
    for r in range(n_rows):
        row = (first_row + r).to(tl.int64)
        x_row = tl.load(x_ptr + row * stride_xt + offs_k[None, :], mask=mask_k[None, :], other=0.0)
        q, s = quantize_rows(x_row.to(tl.float32), SCALE_RECIPROCAL)  # [1, SPLIT], [1]
        tl.store(q_ptr + row * stride_qt + offs_k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask_k[None, :])
        tl.store(s_ptr + row * stride_st + split + tl.zeros((1,), tl.int64), s)


@waits_for_producer
@triton.jit
def _gate_partials_kernel(
    x_ptr, w_ptr, part_ptr, q_ptr, s_ptr, T, E, K,
    stride_xt, stride_we, stride_ps, stride_pt, stride_qt, stride_st,
    SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, QUANT_X: tl.constexpr, SCALE_RECIPROCAL: tl.constexpr,
    ROW_QUANT_MAX_ROWS: tl.constexpr,
):
    """partials[s, t, e] = sum over k in split s of x[t, k] * w[e, k] (fp32), for one block of rows
    (axis 0), of experts (axis 1) and one split (axis 2); rows, experts and K masked with zeros.
    QUANT_X (SPLIT = 128): the programs of the first expert block also write act_quant(x)'s q and s for
    their [BLOCK_T, 128] block of x, with act_quant's arithmetic (kernels/fp8_quant.py quantize_rows): the whole
    tile at once, or, when the block holds at most ROW_QUANT_MAX_ROWS real rows, one real row at a time (the
    same values: quantize_rows works per row; 0: always the tile)."""
    wait_for_producer()  # before any memory access: kernels/pdl.py
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    offs_k = split * SPLIT + tl.arange(0, SPLIT)
    mask_t, mask_e, mask_k = offs_t < T, offs_e < E, offs_k < K
    rows64 = offs_t[:, None].to(tl.int64)
    # the weight's load is issued first, so its latency overlaps the quantization's arithmetic
    w = tl.load(w_ptr + offs_e[:, None].to(tl.int64) * stride_we + offs_k[None, :],
                mask=mask_e[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_E, SPLIT]
    x = tl.load(x_ptr + rows64 * stride_xt + offs_k[None, :],
                mask=mask_t[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_T, SPLIT]
    if QUANT_X:
        if tl.program_id(1) == 0:
            if ROW_QUANT_MAX_ROWS == 0:
                _quantize_tile(x, offs_t, offs_k, mask_t, mask_k, q_ptr, s_ptr, stride_qt, stride_st, split,
                               SCALE_RECIPROCAL)
            else:
                first_row = tl.program_id(0) * BLOCK_T
                n_rows = tl.minimum(T - first_row, BLOCK_T)
                if n_rows <= ROW_QUANT_MAX_ROWS:
                    _quantize_rows_one_by_one(x_ptr, first_row, n_rows, offs_k, mask_k, q_ptr, s_ptr, stride_xt,
                                              stride_qt, stride_st, split, SCALE_RECIPROCAL)
                else:
                    _quantize_tile(x, offs_t, offs_k, mask_t, mask_k, q_ptr, s_ptr, stride_qt, stride_st, split,
                                   SCALE_RECIPROCAL)
    if UPCAST:
        x, w = x.to(tl.float32), w.to(tl.float32)
    if IEEE:
        acc = tl.dot(x, tl.trans(w), input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w))  # [BLOCK_T, BLOCK_E] fp32
    tl.store(part_ptr + split * stride_ps + offs_t[:, None].to(tl.int64) * stride_pt + offs_e[None, :], acc,
             mask=mask_t[:, None] & mask_e[None, :])


_gate_tuned = autotune_or_single(_gate_partials_kernel, GATE_CONFIGS[:1], key=[])  # a one-config autotuner
# carries the config's warps into Inductor's launch (a bare kernel would get Inductor's 4 warps / 3 stages)
_INTERPRETED = is_interpreted(_gate_partials_kernel)


def num_splits(k: int) -> int:
    """Partials of a gate over K inputs."""
    return cdiv(k, SPLIT_K)


def gate_unfit(x_dtype: torch.dtype, w_dtype: torch.dtype, e: int, k) -> str | None:
    """Why a gate linear(x [T, K], w [E, K]) is not one the split form computes (None: it is)."""
    if x_dtype not in DTYPES or w_dtype != x_dtype:
        return f"x {x_dtype}, w {w_dtype}: needs one dtype of {[str(d) for d in DTYPES]}"
    if not isinstance(k, int) or not isinstance(e, int):
        return "the gate weight's shape is not static"
    return None


def partials_buffer(t, e: int, k: int, device: torch.device) -> torch.Tensor:
    """The kernel's output: fp32 [S, T, E] (T may be symbolic)."""
    return torch.empty((num_splits(k), t, e), dtype=torch.float32, device=device)


def gate_partials_spec(x: torch.Tensor, w: torch.Tensor, partials: torch.Tensor,
                       quant: tuple[torch.Tensor, torch.Tensor] | None = None,
                       row_quant_max_rows: int = ROW_QUANT_MAX_ROWS) -> LaunchSpec:
    """The launch for x [T, K], w [E, K] (unit stride along K) into partials [S, T, E] (contiguous);
    checked by the caller. T may be symbolic. quant: (q fp8 [T, K], s fp32 [T, ceil(K/128)]) to write
    act_quant(x) into as well, its scale rounded as torch's on x's device (kernels/fp8_quant.py)."""
    t, k = x.shape
    e = w.shape[0]
    splits = partials.shape[0]
    q, s = quant if quant is not None else (partials, partials)  # never written without QUANT_X
    grid = lambda meta: (cdiv(t, meta["BLOCK_T"]), cdiv(e, meta["BLOCK_E"]), splits)  # noqa: E731
    return LaunchSpec(_gate_partials_kernel, _gate_tuned, GATE_CONFIGS, grid,
                      (x, w, partials, q, s, t, e, k, x.stride(0), w.stride(0), partials.stride(0), partials.stride(1),
                       q.stride(0), s.stride(0)),
                      dict(SPLIT=SPLIT_K, UPCAST=_INTERPRETED, IEEE=x.dtype == torch.float32, QUANT_X=quant is not None,
                           SCALE_RECIPROCAL=x.is_cuda, ROW_QUANT_MAX_ROWS=row_quant_max_rows))


def check_gate(x: torch.Tensor, w: torch.Tensor) -> None:
    """Raise naming the tensor when (x, w) is not what the kernel takes."""
    check_tensor("gate_partials: x", x, dtypes=DTYPES, ndim=2)
    check_tensor("gate_partials: w", w, dtypes=(x.dtype,), ndim=2, device=x.device)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"gate_partials: w is [E, K={w.shape[1]}] but x is [T, K={x.shape[1]}]")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"gate_partials: x and w need unit stride along K, got {x.stride()} and {w.stride()}")


def gate_partials(x: torch.Tensor, w: torch.Tensor, *, quant_x: bool = False,
                  row_quant_max_rows: int = ROW_QUANT_MAX_ROWS, config: triton.Config | None = None):
    """x [T, K] . w [E, K]^T as fp32 partials [S, T, E] over K splits of SPLIT_K (summed in split order
    they are the logits: the router kernel's SPLITS form). quant_x: also act_quant(x) from the same loads,
    returned as (partials, (q, s)), bit-identical to kernels/fp8_quant.py act_quant(x)."""
    check_gate(x, w)
    partials = partials_buffer(x.shape[0], w.shape[0], x.shape[1], x.device)
    quant = act_quant_outputs(*x.shape, x.device) if quant_x else None
    if partials.numel():
        launch(*gate_partials_spec(x, w, partials, quant, row_quant_max_rows), config)
    return (partials, quant) if quant_x else partials


def round_bf16_ref(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest bf16 value (ties to even), as fp32: what the router kernel rounds the summed
    partials to (torch's .to(bfloat16))."""
    return x.to(torch.bfloat16).float()


def gate_logits_ref(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The router kernel's logits from the partials: fp32 sums in split order, rounded to dtype."""
    acc = partials[0].clone()
    for s in range(1, partials.shape[0]):
        acc = acc + partials[s]
    return round_bf16_ref(acc) if dtype == torch.bfloat16 else acc


def gate_router_topk(x: torch.Tensor, w: torch.Tensor, k: int, *, scale: float = 1.0, n_extra: int = 0,
                     first_extra: int = 0, out_dtype: torch.dtype = torch.float32, quant_x: bool = False,
                     row_quant_max_rows: int = ROW_QUANT_MAX_ROWS, config: triton.Config | None = None):
    """kernels/topk.py router_topk(F.linear(x, w), ...) in the split form, two launches: the partials,
    then the router summing them (rounded to bf16 for bf16 x) -> (weights, ids). quant_x: the gate kernel
    also writes act_quant(x), returned as (weights, ids, (q, s)). config: the gate kernel's."""
    check_gate(x, w)
    if (reason := topk.rows_unfit(w.shape[0], k)) is not None:
        raise ValueError(f"gate_router_topk: {reason}")
    topk.check_extra("gate_router_topk", n_extra, out_dtype)
    partials, quant = gate_partials(x, w, quant_x=True, row_quant_max_rows=row_quant_max_rows, config=config) \
        if quant_x else \
        (gate_partials(x, w, config=config), None)
    weights, ids = topk.router_outputs(x.shape[0], k, n_extra, out_dtype, x.device)
    if partials.shape[0] == 0:  # K = 0: no split, zero logits; the router kernel always reads a first split
        partials = torch.zeros((1, *partials.shape[1:]), dtype=partials.dtype, device=partials.device)
    if x.shape[0]:
        launch(*topk.router_spec(partials, k, scale, n_extra, first_extra, weights, ids,
                                 round_bf16=x.dtype == torch.bfloat16), None)
    return (weights, ids, quant) if quant_x else (weights, ids)
