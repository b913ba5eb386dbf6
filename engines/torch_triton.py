"""Our Triton kernels (kernels/) as `triton_op`s, so that AOTInductor embeds them in CUDA packages.

Why a second registration: the dsv3:: ops (dsv3_export/ops) are Python `custom_op`s whose CUDA
implementations are Python launchers; a package calling them needs Python at run time. A
`torch.library.triton_op` whose body launches kernels through `wrap_triton` is traced by
torch.export into the kernel calls themselves, and AOTInductor compiles those kernels into the
package (TOOLCHAIN.md: measured on the H200, loadable from C++ with no op registration).

Lowered here (engines/torch_lower.py uses these on CUDA, ATen math for the rest):
    dsv3::moe_experts      -> dsv3_aoti::moe_experts      moe_align + 2 grouped GEMMs (SwiGLU and
                                                          routing-weight epilogues), kernels/moe.py
                                                          (bf16/fp16; fp32 engines: ATen)
    dsv3::moe_experts_fp8  -> dsv3_aoti::moe_experts_fp8  the same with 1x128 act_quant (act_quant=True
                             only; weight-only fp8 lowers to ATen: the kernel has no bf16 x fp8 path)
    dsv3::mla_attention    -> dsv3_aoti::mla_attention    W_UK absorbed into the query, then
                             kernels/mla_attention.py over [cache | new keys] (split-KV mla_decode in
                             the decode program, causal mla_prefill in the prefill program; new keys
                             passed separately, the cache is only read), then W_UV. The decode program's
                             W_UK and W_UV are kernels/mla_absorb.py head_gemm (one launch each on the
                             strided views; DSV3_TORCH_ABSORB_GEMM=0: einsums), W_UV at batch <= 2 its
                             CUDA-core form head_gemv (DSV3_TORCH_HEAD_GEMV), there with mla_decode's
                             split merge in its launch (kernels/mla_merge_uv.py, DSV3_TORCH_MERGE_UV);
                             prefill's are einsums.
                             bf16/fp16; fp32 engines keep ATen (the kernel's fp32 dots are TF32).
    dsv3::fp8_linear       -> dsv3_aoti::fp8_linear       act_quant=True: act_quant + fp8 x fp8 GEMM;
                             act_quant=False: the weight-only GEMM (fp8 widened in registers; bf16/fp16
                             x only, fp32 x keeps ATen). kernels/fp8_gemm.py.

Shapes are symbolic when a package is traced, so nothing here is chosen from a token, batch or
cache count: block_m (rows per expert block) is 16 for decode and 64 for prefill; the fp8 GEMM's
tile set and split-K come from the program kind and the (static) weight shape; MLA decode launches
MAX_SPLITS split programs per row and its kernels pick the splits they use from the batch and each
row's cache length at run time (mla_decode runtime_splits). The kernels' own checks compare symbolic
sizes only with themselves.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.library import triton_op, wrap_triton

from dsv3_export.kernels import fp8_gemm as kg
from dsv3_export.kernels import fp8_gemv as kv
from dsv3_export.kernels import fp8_quant as kq
from dsv3_export.kernels import mla_absorb as ka
from dsv3_export.kernels import mla_decode as kd
from dsv3_export.kernels import mla_merge_uv as km_uv
from dsv3_export.kernels import mla_prefill as kp
from dsv3_export.kernels import moe as km
from dsv3_export.engines.torch_decode_gemv import decode_gemv, gated
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels._common import QUANT_BLOCK, LaunchSpec, cdiv, fake_values_only, is_interpreted

BLOCK_M = {"decode": 16, "prefill": 64}
# moe_align's traced form in the packages (kernels/moe.py TRACED_ALIGN_FORMS), read when a program is
# lowered: `kernel` (default: one launch per MoE layer) or `aten` (Inductor's kernels for the ATen
# form). Measured on the H200 (4-layer 16b fp8 decode program): CUDA-graph step 0.708 ms with the
# kernel vs 0.739 ms aten, 1.05 vs 1.84 ms without a graph; per call 9.3 us vs 61 us (kernels.py).
MOE_ALIGN_ENV = "DSV3_TORCH_MOE_ALIGN"
MOE_ALIGN_DEFAULT = "kernel"
MOE_ALIGN_FORMS = {"kernel": "one Triton kernel per MoE layer", "aten": "Inductor's kernels for the ATen form"}
# The decode program's absorbed MLA projections (q_nope @ W_UK, lat @ W_UV per head): `1` (default)
# kernels/mla_absorb.py head_gemm, one launch each reading the strided activation and weight views;
# `0` the einsums (Inductor: a permute copy + cuBLAS bmm + a copy each, ~9 us per layer for both in
# the 16b batch-1 decode profile). Read when a program is lowered; prefill keeps the einsums (cuBLAS
# wins at large M).
ABSORB_ENV = "DSV3_TORCH_ABSORB_GEMM"


# The MoE's one-token direct mode (kernels/moe.py grouped_gemm_spec): `1` (default) at T = 1 the grouped
# GEMMs take each assignment's expert from topk_ids and moe_align's launch has an empty grid
# (kernels/moe_align.py align_gate), from the same program that aligns at T >= 2; `0` aligns at every T.
# Read when a program is lowered. Measured on the H200 (session 15, 27-layer 16b fp8 decode): 26 launches
# and ~115 us of moe_align fewer per batch-1 step; step 2.542-2.673 ms (3 builds) against 2.718 (1 build),
# within the build-to-build spread; batch 8 unchanged (4.496-4.543 against 4.516).
MOE_DIRECT_ENV = "DSV3_TORCH_MOE_DIRECT"


# The decode fp8 GEMMs' split-K reduction (Linears whose N tiles leave SMs idle: at the 16b shapes wq+wkv_a,
# wo and the dense MLP's w2): `kernel` kernels/fp8_gemm.py's split-K sum kernel, gated like the tile GEMM, so
# a batch the GEMV serves (engines/torch_decode_gemv.py) writes its output directly and launches no sum;
# `inductor` c.sum(dim=0), Inductor's reduction, fused with its consumer and launched at every batch (with the
# GEMV it summed the GEMV's result with zero partials); `auto` (default) the kernel in a decode program with the
# GEMV, Inductor's otherwise (the only pairings measured). Read when a program is lowered. The kernel with the
# GEMV is the default since session 18, with DSV3_TORCH_HEAD_GEMV (27-layer 16b fp8 decode on the H200, CUDA
# graph, ms per step; benchmarks/RESULTS.md): batch 1 2.226-2.417 with both (4 builds, mean 2.325) against
# 2.523 / 2.584 without (and session 16's 2.470-2.529), 639 -> 531 kernels per step (Inductor re-fused the
# glue around the GEMV outputs: ~4 kernels per layer fewer); batch 8 and 64 within the builds' spread.
SPLIT_K_SUM_ENV = "DSV3_TORCH_SPLIT_K_SUM"


def _split_k_sum_kernel(kind: str, gemv: bool) -> bool:
    """Whether a program of `kind` (with the decode GEMV or not) sums split-K partials with the kernel."""
    choice = env_choice(SPLIT_K_SUM_ENV, "auto", {
        "auto": "the sum kernel in a decode program with the GEMV, Inductor's sum otherwise",
        "kernel": "kernels/fp8_gemm.py's sum kernel, not launched where the GEMV runs",
        "inductor": "c.sum(dim=0) in Inductor, at every batch"})
    return kind == "decode" and (choice == "kernel" or (choice == "auto" and gemv))


# The decode program's W_UV projection at batch <= 2 (with DSV3_TORCH_DECODE_GEMV on): `1` (default)
# kernels/mla_absorb.py head_gemv (CUDA-core FMAs, one row per program), head_gemm above, each launch gated by
# the batch; `0` head_gemm at every batch. Read when a program is lowered. Session 18 (H200, 27-layer batch-1
# profile): 2.3 us per call (62 us per step), where head_gemm took 3.1-4.2 us per call on average over W_UK
# and W_UV in the builds without it.
HEAD_GEMV_ENV = "DSV3_TORCH_HEAD_GEMV"


def _head_gemv() -> bool:
    return env_choice(HEAD_GEMV_ENV, "1", {"1": "W_UV by head_gemv at batch <= 2", "0": "head_gemm"}) == "1"


# With head_gemv (DSV3_TORCH_HEAD_GEMV on): `1` (default) at batch <= 2 the decode attention's split merge and
# W_UV in one launch (kernels/mla_merge_uv.py; the same bits as the reduce kernel then head_gemv), above it the
# reduce kernel and head_gemm, each launch gated by the batch; `0` the reduce kernel at every batch, then
# head_gemv / head_gemm. Read when a program is lowered. One launch fewer per layer at batch 1, where the
# reduce kernel cost ~1.9 us + a 0.42 us gap per layer on the H200 (16b profile); not yet measured on the GPU.
MERGE_UV_ENV = "DSV3_TORCH_MERGE_UV"


def _merge_uv() -> bool:
    return env_choice(MERGE_UV_ENV, "1", {"1": "split merge + W_UV in one launch at batch <= 2",
                                          "0": "the reduce kernel, then head_gemv"}) == "1"


def _moe_direct() -> bool:
    return env_choice(MOE_DIRECT_ENV, "1", {"1": "one token: no moe_align, experts from topk_ids",
                                            "0": "moe_align at every batch"}) == "1"


def _absorb_gemm() -> bool:
    return env_choice(ABSORB_ENV, "1", {"1": "head_gemm kernel, decode program", "0": "einsums"}) == "1"


# M the fp8 GEMM's split-K is chosen for in the decode program (one 16-row tile: batch <= 16);
# and the autotune key's M bucket per program kind.
FP8_DECODE_M = 16
FP8_M_BUCKET = {"decode": kg.DECODE_MAX_M, "prefill": 4096}


def _launch(spec: LaunchSpec | None) -> None:
    """A kernel family's launch (its *_spec) through wrap_triton: the autotuned kernel on the GPU,
    the first config under the CPU interpreter. The interpreter runs a kernel even on fake tensors
    (wrap_triton defers only compiled kernels), so there a launch whose outputs are only fake
    metadata is skipped: their shapes are set (kernels/_common.py fake_values_only). None: no launch
    (engines/torch_decode_gemv.py gated)."""
    if spec is None:
        return
    if spec.tuned is not None:
        wrap_triton(spec.tuned)[spec.grid](*spec.args, **spec.kwargs)
        return
    if is_interpreted(spec.kernel) and fake_values_only():
        return
    cfg = spec.configs[0]
    meta = {**spec.kwargs, **cfg.kwargs}
    wrap_triton(spec.kernel)[spec.grid(meta)](*spec.args, **spec.kwargs, **cfg.kwargs)


def _moe_routing(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """moe_align's (sorted_ids, expert_ids, npp) in the MOE_ALIGN_ENV form, and the grouped GEMMs'
    direct_ids: with MOE_DIRECT_ENV on, the contiguous topk_ids, and the alignment launches nothing
    at one token."""
    return km.moe_routing(topk_ids, n_experts, block_m, _moe_direct(),
                          traced_form=env_choice(MOE_ALIGN_ENV, MOE_ALIGN_DEFAULT, MOE_ALIGN_FORMS))


def _act_quant(x: torch.Tensor, gate=1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> fp8 [M, K], fp32 scales [M, ceil(K/128)] (kernels/fp8_quant.py); gate 0: no launch
    (engines/torch_decode_gemv.py gated)."""
    q, s = kq.act_quant_outputs(*x.shape, x.device)
    _launch(gated(kq.act_quant_spec(x, q, s, x.is_cuda), gate))  # the scale's rounding as torch's on x's device
    return q, s


def _grouped_gemm(a, w, routing, topk: int, out_dtype: torch.dtype, *, a_scale=None,
                  w_scale=None, topk_weights=None, swiglu: bool = False):
    """kernels/moe.py grouped_gemm's launch (checks done once by the caller's shapes); routing is
    _moe_routing's."""
    t = a.shape[0]
    n_out = w.shape[1] // 2 if swiglu else w.shape[1]
    out = torch.empty((t * topk, n_out), dtype=out_dtype, device=a.device)
    (sorted_ids, expert_ids, npp), direct_ids = routing
    _launch(km.grouped_gemm_spec(a, a_scale, w, w_scale, out, topk_weights, sorted_ids, expert_ids, npp, topk,
                                 swiglu, direct_ids))
    return out


# The MoE's combine (the k routed + shared slots of each token summed), read when a program is lowered: `adds`
# (default since session 19) the fp32 sum as k - 1 unrolled adds in slot order, pointwise in D, which Inductor
# fuses into the next residual add + RMSNorm kernel; `sum` one fp32 reduction over the slots, which Inductor
# emits as its own kernel (1.15 us per MoE layer in the 16b batch-1 profile). On the H200 (27-layer 16b fp8
# decode, with DSV3_TORCH_GATE_SPLIT and DSV3_TORCH_MERGE_UV: benchmarks/RESULTS.md session 19) the three took
# 79 launches off the batch-1 step. Prefill programs take the same form (not timed there).
MOE_COMBINE_ENV = "DSV3_TORCH_MOE_COMBINE"


def _combine(y: torch.Tensor, t: int, topk: int, dtype: torch.dtype) -> torch.Tensor:
    """y [T*k, D] in (token, slot) order -> [T, D]: the slots summed in fp32, cast to dtype."""
    y3 = y.view(t, topk, -1)
    form = env_choice(MOE_COMBINE_ENV, "adds", {"sum": "one fp32 reduction over the slots (its own kernel)",
                                               "adds": "unrolled fp32 adds in slot order (pointwise: fusable)"})
    if form == "sum":
        return y3.sum(dim=1, dtype=torch.float32).to(dtype)  # [T, D]
    acc = y3[:, 0].float()
    for slot in range(1, topk):  # topk: static (the op's top-k plus the shared experts' slots)
        acc = acc + y3[:, slot].float()
    return acc.to(dtype)  # [T, D]


@triton_op("dsv3_aoti::moe_experts", mutates_args={})
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, block_m: int) -> torch.Tensor:
    """The bf16/fp16 experts: moe_align, up GEMM with SwiGLU, down GEMM with the routing weights, sum
    over k -> [T, D]."""
    t, topk = topk_ids.shape
    routing = _moe_routing(topk_ids, w13.shape[0], block_m)
    x = x.contiguous()
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    h = _grouped_gemm(x, w13, routing, topk, x.dtype, swiglu=True)  # [T*k, I]
    y = _grouped_gemm(h, w2, routing, 1, x.dtype,
                      topk_weights=topk_weights.contiguous())  # [T*k, D]
    return _combine(y, t, topk, x.dtype)


@triton_op("dsv3_aoti::moe_experts_fp8", mutates_args={})
def moe_experts_fp8(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, block_m: int) -> torch.Tensor:
    """The W8A8 experts: moe_align, act_quant of x (1x128), up GEMM with SwiGLU, act_quant of h, down
    GEMM with the routing weights, sum over k -> [T, D]."""
    xq, xs = _act_quant(x.contiguous())
    return _moe_fp8(x, xq, xs, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, block_m)


@triton_op("dsv3_aoti::moe_experts_fp8_quantized", mutates_args={})
def moe_experts_fp8_quantized(x: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, topk_weights: torch.Tensor,
                              topk_ids: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                              w2_scale: torch.Tensor, block_m: int) -> torch.Tensor:
    """moe_experts_fp8 with act_quant(x) = (xq, xs) already computed (engines/torch_router.py: by the split
    gate kernel, from the same x); x gives the output dtype."""
    return _moe_fp8(x, xq, xs, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, block_m)


def _moe_fp8(x, xq, xs, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, block_m: int) -> torch.Tensor:
    """The W8A8 experts from act_quant(x): up GEMM with SwiGLU, act_quant of h, down GEMM, combine."""
    t, topk = topk_ids.shape
    routing = _moe_routing(topk_ids, w13.shape[0], block_m)
    h = _grouped_gemm(xq, w13, routing, topk, x.dtype, a_scale=xs, w_scale=w13_scale,
                      swiglu=True)  # [T*k, I]
    hq, hs = _act_quant(h)
    y = _grouped_gemm(hq, w2, routing, 1, x.dtype, a_scale=hs, w_scale=w2_scale,
                      topk_weights=topk_weights.contiguous())  # [T*k, D]
    return _combine(y, t, topk, x.dtype)


def _fp8_gemm(a: torch.Tensor, a_s: torch.Tensor | None, w: torch.Tensor, w_s: torch.Tensor,
              out_dtype: torch.dtype, kind: str, small_batch=None, kernel_sum: bool = False) -> torch.Tensor:
    """kernels/fp8_gemm.py fp8_gemm's launch with M symbolic: tiles and split-K from `kind` and the
    weight's static [N, K] (fp8_gemm itself buckets M with int(M), a guard on the traced size).
    a fp8 [M, K] + a_s [M, ceil(K/128)], or bf16/fp16 [M, K] with a_s None (weight-only).
    small_batch (x, gate), decode: kernels/fp8_gemv.py from the unquantized x [M, K] when gate is 1
    (kv.gemv_gate(M)); the tile GEMM launches nothing then. kernel_sum (SPLIT_K_SUM_ENV): split-K partials
    summed by the sum kernel, gated like the tile GEMM (the GEMV writes the output itself); else by
    Inductor's c.sum (the GEMV then writes split 0 and zeros the rest, which the sum adds)."""
    m, k = a.shape
    n = w.shape[0]
    k_blocks = cdiv(k, QUANT_BLOCK)
    decode = kind == "decode"
    split = kg._choose_split_k(FP8_DECODE_M, n, k_blocks, a.device) if decode else 1
    per_split = cdiv(k_blocks, split)
    split = cdiv(k_blocks, per_split)  # no empty splits
    if split == 1:
        c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    else:
        c = torch.empty((split, m, n), dtype=torch.float32, device=a.device)  # [S, M, N] partials
    kernel_sum = split > 1 and kernel_sum
    out = torch.empty((m, n), dtype=out_dtype, device=a.device) if kernel_sum else c
    tile_gate = 1
    if small_batch is not None:
        x, gate = small_batch
        _launch(gated(kv.gemv_spec(x, w, w_s, out, scale_reciprocal=a.is_cuda), gate))
        tile_gate = 1 - gate
    _launch(gated(kg.fp8_gemm_spec(a, a_s, w, w_s, c, FP8_M_BUCKET[kind], per_split, split, decode), tile_gate))
    if kernel_sum:  # the sum launches only with the tile GEMM; the GEMV wrote `out` itself
        _launch(gated(kg.split_k_sum_spec(c, out), tile_gate))
        return out
    return c.sum(dim=0).to(out_dtype) if split > 1 else c  # [M, N]


@triton_op("dsv3_aoti::fp8_linear", mutates_args={})
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
               decode: bool, gemv: bool = False, split_k_sum: bool = False) -> torch.Tensor:
    """dsv3::fp8_linear: x [..., K] -> [..., N]; act_quant 1x128 + fp8 GEMM, or weight-only.
    gemv (decode, act_quant; DECODE_GEMV_ENV): batches of at most kv.GEMV_MAX_ROWS rows run
    kernels/fp8_gemv.py instead of act_quant + the GEMM, which then launch nothing. split_k_sum
    (SPLIT_K_SUM_ENV): split-K partials summed by the sum kernel instead of Inductor's c.sum."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    kind = "decode" if decode else "prefill"
    if act_quant and gemv and decode:
        gate = kv.gemv_gate(x2.shape[0])  # 1 at M <= GEMV_MAX_ROWS, else 0 (symbolic: no guard)
        xq, xs = _act_quant(x2, 1 - gate)
        y = _fp8_gemm(xq, xs, weight, scale, x.dtype, kind, small_batch=(x2, gate), kernel_sum=split_k_sum)
    elif act_quant:
        xq, xs = _act_quant(x2)
        y = _fp8_gemm(xq, xs, weight, scale, x.dtype, kind, kernel_sum=split_k_sum)  # [M, N]
    else:
        y = _fp8_gemm(x2, None, weight, scale, x.dtype, kind, kernel_sum=split_k_sum)  # [M, N]
    return y.reshape(*x.shape[:-1], weight.shape[0])  # [..., N]


def _head_gemm(x: torch.Tensor, w: torch.Tensor, gemv: bool = False) -> torch.Tensor:
    """kernels/mla_absorb.py head_gemm's launch: x [b, h, k] @ w [h, k, n] per head -> [b, h, n]
    (strided views read as they are), tuned for the decode bucket (b is symbolic when traced).
    gemv (HEAD_GEMV_ENV): head_gemv at b <= kv.GEMV_MAX_ROWS, head_gemm above (each launch gated)."""
    out = torch.empty((x.shape[0], x.shape[1], w.shape[2]), dtype=x.dtype, device=x.device)  # [b, h, n]
    tile_gate = 1
    if gemv and ka.head_gemv_suits(w):
        gate = kv.gemv_gate(x.shape[0])
        _launch(gated(ka.head_gemv_spec(x, w, out), gate))
        tile_gate = 1 - gate
    _launch(gated(ka.head_gemm_spec(x, w, out, ka.DECODE_MAX_M), tile_gate))
    return out


def decode_query(q_nope: torch.Tensor, w_uk: torch.Tensor, absorb_gemm: bool) -> torch.Tensor:
    """W_UK absorbed into the decode query: q_nope [b, 1, h, dn] x w_uk [h, dn, c] -> [b, h, c], by
    head_gemm on the strided [b, h, dn] slice (absorb_gemm) or the einsum."""
    if absorb_gemm:
        return _head_gemm(q_nope[:, 0], w_uk)
    return torch.einsum("bshd,hdc->bshc", q_nope, w_uk).contiguous()[:, 0]


def decode_latent(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                  start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float, absorb_gemm: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode attention up to W_UV: decode_partials, then the reduce kernel -> (lat [b, h, c], w_uv [h, dv, c])."""
    parts, w_uv = decode_partials(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, absorb_gemm)
    return kd.mla_decode_reduce(parts, q_nope.dtype), w_uv


def decode_partials(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                    start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float, absorb_gemm: bool
                    ) -> tuple[kd.DecodePartials, torch.Tensor]:
    """W_UK into the query (decode_query), then mla_decode's split kernel over the cache rows
    t < min(start_pos, T) and the one new key, under the runtime split rule; the merge left to the caller
    -> (the split partials, w_uv [h, dv, c])."""
    _, s, h, dn = q_nope.shape
    c = wkv_b.shape[-1]
    torch._check(s == 1, lambda: f"dsv3_aoti::mla_attention: decode needs one new position, got {s}")
    w = wkv_b.view(h, -1, c)  # [h, dn + dv, c]
    w_uk, w_uv = w[:, :dn], w[:, dn:]  # [h, dn, c], [h, dv, c]
    seen = start_pos.clamp(0, kv_cache.shape[1]).to(torch.int32)  # [b] cached keys per row
    q_latent = decode_query(q_nope, w_uk, absorb_gemm)  # [b, h, c]
    parts = kd.mla_decode_partials(q_latent, q_pe.contiguous()[:, 0], kv_cache[..., :c], kv_cache[..., c:], seen,
                                   softmax_scale, kv_new=kv_new[:, 0, :c], pe_new=kv_new[:, 0, c:], runtime_splits=True)
    return parts, w_uv


def _merged_head_gemv(parts: kd.DecodePartials, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_UV after the split kernel: w [h, c, dv] (c contiguous, ka.head_gemv_suits) -> [b, h, dv] in dtype. At
    b <= kv.GEMV_MAX_ROWS kernels/mla_merge_uv.py (the merge and head_gemv in one launch), above it the reduce
    kernel into the latent, then head_gemm; each launch gated by the batch."""
    b, h, _, c = parts.o_part.shape
    out = torch.empty((b, h, w.shape[2]), dtype=dtype, device=w.device)  # [b, h, dv]
    gate = kv.gemv_gate(b)
    _launch(gated(km_uv.merge_uv_spec(parts, w, out), gate))
    lat = torch.empty((b, h, c), dtype=dtype, device=w.device)  # [b, h, c], written above batch 2 only
    _launch(gated(kd.reduce_spec(parts, lat), 1 - gate))
    _launch(gated(ka.head_gemm_spec(lat, w, out, ka.DECODE_MAX_M), 1 - gate))
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
        absorb_gemm = absorb_gemm and q_nope.dtype in ka.DOT_DTYPES  # fp32 dots would be TF32
        if absorb_gemm and head_gemv and merge_uv:
            parts, w_uv = decode_partials(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, True)
            w = w_uv.transpose(1, 2)  # [h, c, dv], c contiguous
            if ka.head_gemv_suits(w):  # static: the weight's shape and strides
                return _merged_head_gemv(parts, w, q_nope.dtype)[:, None]  # [b, 1, h, dv]
            return _head_gemm(kd.mla_decode_reduce(parts, q_nope.dtype), w)[:, None]
        lat, w_uv = decode_latent(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale,
                                  absorb_gemm)  # [b, h, c], [h, dv, c]
        if absorb_gemm:
            return _head_gemm(lat, w_uv.transpose(1, 2), head_gemv)[:, None]  # [b, 1, h, dv]
        return torch.einsum("bshc,hdc->bshd", lat[:, None], w_uv)  # [b, 1, h, dv]
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


def triton_lowerings(kind: str, gemv: bool | None = None) -> dict[str, Callable]:
    """dsv3:: op name -> function with the op's signature calling a triton_op (for run_decompositions).
    gemv: the decode GEMV path (engines/torch_decode_gemv.py program_decode_gemv); None: decode_gemv(kind)."""
    from dsv3_export.engines.torch_lower import ATEN_LOWERINGS

    block_m = BLOCK_M[kind]
    gemv = decode_gemv(kind) if gemv is None else gemv
    absorb = _absorb_gemm()
    head_gemv = gemv and _head_gemv()  # with the decode GEMV: the same gate and the same tuning-batch rule
    merge_uv = head_gemv and _merge_uv()
    kernel_sum = _split_k_sum_kernel(kind, gemv)
    align_form = env_choice(MOE_ALIGN_ENV, MOE_ALIGN_DEFAULT, MOE_ALIGN_FORMS)
    routing = "moe_align " + ("in ATen ops" if align_form == "aten" else "kernel")

    def lower_moe(x, topk_weights, topk_ids, w13, w2):
        if x.dtype not in km.DENSE_DTYPES:  # fp32 engines: the dense kernel takes bf16/fp16 only
            return ATEN_LOWERINGS["dsv3::moe_experts"](x, topk_weights, topk_ids, w13, w2)
        return moe_experts(x, topk_weights, topk_ids, w13, w2, block_m)

    def lower_moe_fp8(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, act_quant):
        if not act_quant:  # weight-only fp8: no kernel for bf16 activations x fp8 weights
            return ATEN_LOWERINGS["dsv3::moe_experts_fp8"](x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale,
                                                           act_quant)
        return moe_experts_fp8(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, block_m)

    def lower_mla(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale):
        if q_nope.dtype not in km.DENSE_DTYPES:  # fp32: the kernel's dots would be TF32
            return ATEN_LOWERINGS["dsv3::mla_attention"](q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b,
                                                         softmax_scale)
        s = q_nope.shape[1]
        decode = kind == "decode" and isinstance(s, int) and s == 1  # static, never a guard on a symbol
        # absorb applies to the decode form only; prefill passes the default, so that its program text does not
        # depend on the switch
        return mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, decode,
                             absorb if decode else True, decode and absorb and head_gemv,
                             decode and absorb and merge_uv)

    def lower_fp8_linear(x, weight, scale, act_quant):
        if not act_quant and x.dtype not in kg.DENSE_DTYPES:  # weight-only GEMM: bf16/fp16 activations
            return ATEN_LOWERINGS["dsv3::fp8_linear"](x, weight, scale, act_quant)
        small = gemv and act_quant and kv.gemv_suits(*weight.shape)
        return fp8_linear(x, weight, scale, act_quant, kind == "decode", small, kernel_sum)

    lower_moe.how = (f"triton_op dsv3_aoti::moe_experts (kernels/moe.py grouped GEMMs; {routing}) for bf16/fp16; "
                     "ATen math for fp32")
    lower_moe_fp8.how = (f"triton_op dsv3_aoti::moe_experts_fp8 ({routing}; act_quant + fp8 grouped GEMMs"
                         ") with act_quant; ATen math for weight-only")
    lower_mla.how = ("triton_op dsv3_aoti::mla_attention ("
                     + ("W_UK and W_UV by kernels/mla_absorb.py head_gemm in the decode program, einsums in "
                        "prefill" if absorb else "W_UK and W_UV by einsums")
                     + (f", W_UV by head_gemv at batch <= {kv.GEMV_MAX_ROWS}" if absorb and head_gemv else "")
                     + (", with mla_decode's split merge in its launch (kernels/mla_merge_uv.py)"
                        if absorb and merge_uv else "")
                     + "; kernels/mla_attention.py over [cache | new]: mla_decode in the decode program, "
                     "mla_prefill in prefill) for bf16/fp16; ATen math for fp32")
    lower_fp8_linear.how = ("triton_op dsv3_aoti::fp8_linear (kernels/fp8_gemm.py: act_quant + fp8 GEMM"
                            + (f"; at batch <= {kv.GEMV_MAX_ROWS} kernels/fp8_gemv.py instead, for weights "
                               "kernels/fp8_gemv.py gemv_suits takes" if gemv else
                               "; no fp8_gemv (DSV3_TORCH_DECODE_GEMV=0, or the decode program traced at batch "
                               f"<= {kv.GEMV_MAX_ROWS})" if kind == "decode" else "")
                            + ", or weight-only for bf16/fp16 x"
                            + ("; split-K sums by the sum kernel" if kernel_sum else "")
                            + "); ATen math for weight-only fp32 x")
    return {"dsv3::moe_experts": lower_moe, "dsv3::moe_experts_fp8": lower_moe_fp8,
            "dsv3::mla_attention": lower_mla, "dsv3::fp8_linear": lower_fp8_linear}
