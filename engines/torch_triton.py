"""Our Triton kernels (kernels/) as `triton_op`s, so that AOTInductor embeds them in CUDA packages.

Why a second registration: the dsv3:: ops (dsv3_export/ops) are Python `custom_op`s whose CUDA
implementations are Python launchers; a package calling them needs Python at run time. A
`torch.library.triton_op` whose body launches kernels through `wrap_triton` is traced by
torch.export into the kernel calls themselves, and AOTInductor compiles those kernels into the
package (TOOLCHAIN.md: measured on the H200, loadable from C++ with no op registration).

The ops live by family: fp8_linear here, the MoE's in torch_triton_moe.py, MLA's in torch_triton_mla.py (all
launching through torch_launch.py); triton_lowerings below maps the dsv3:: ops to them. Lowered (engines/torch_lower.py
uses these on CUDA, ATen math for the rest):
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
                             x only, fp32 x keeps ATen). kernels/fp8_gemm.py. In the prefill program, W8A8
                             with bf16 x and a weight whose K is a multiple of 512 and N of 16: act_quant + blockwise
                             torch._scaled_mm (cuBLAS; engines/torch_scaled_mm.py, PREFILL_GEMM_ENV). In the
                             decode program, W8A8 GEMMs whose K is not split: kernels/fp8_gemm_decode.py
                             (DECODE_GEMM_ENV).

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
from torch.library import triton_op

from dsv3_export.engines import torch_launch
from dsv3_export.engines.torch_decode_gemv import decode_gemv, gated, gemv_prefetch_on
from dsv3_export.engines.torch_scaled_mm import blockwise_check, cublas_suits, fp8_linear_cublas
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.engines.torch_triton_mla import absorb_gemm_on, head_gemv_on, merge_uv_on, mla_attention
from dsv3_export.engines.torch_triton_moe import (MOE_ALIGN_DEFAULT, MOE_ALIGN_ENV, MOE_ALIGN_FORMS, moe_experts,
                                                  moe_experts_fp8)
from dsv3_export.kernels import fp8_gemm as kg
from dsv3_export.kernels import fp8_gemm_decode as kd
from dsv3_export.kernels import fp8_gemv as kv
from dsv3_export.kernels import moe as km
from dsv3_export.kernels._common import QUANT_BLOCK, cdiv
from dsv3_export.kernels.moe_align import takes_parallel_form
from dsv3_export.kernels.rms_norm import ResidualNorm

BLOCK_M = {"decode": 16, "prefill": 64}


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


# The prefill program's W8A8 fp8 Linears with bf16 x (engines/torch_scaled_mm.py): `cublas` blockwise
# torch._scaled_mm for weights whose K is a multiple of 512 and N of 16 (at the 16b shapes the fused wq+wkv_a, wo
# and the dense layer's w1 and w3; its w2, K=10944, keeps the Triton GEMM), `triton` kernels/fp8_gemm.py's GEMM for
# all; `auto` (default) cuBLAS when the GPU the program is lowered on computes a small blockwise product right
# (blockwise_check; the build records why not otherwise), else the Triton GEMM. The decode program keeps ours
# (decode rows: on par with cuBLAS for w1/w3, 1.2-1.9x faster for w2; fp8_gemv at batch <= 2). Why: the Triton GEMM
# reaches 0.46-0.66x of cuBLAS at prefill M, and the faster Gluon kernel cannot enter a package (Inductor compiles
# user kernels as @triton.jit). H200, session 30 (benchmarks/cublas_prefill_probe.py, act_quant included, CUDA
# graphs; AOTInductor packages checked at M = 1, 7, 300, 4096), over act_quant + the Triton GEMM: at M=4096 1.35x
# for wq alone, 0.99x for wkv_a alone (the fused 3648 x 2048 was not timed), 1.29x wo, 1.56x w1/w3; at M=1024 1.00x,
# 0.98x, 1.14x, 1.35x. The dense w2 with K zero-padded per call: 1.12x at 4096, 1.02x at 1024 (not taken). A 2-layer
# 16b prefill of 4096 tokens: 11.43 against 11.66 ms, one build each (within two builds' spread).
PREFILL_GEMM_ENV = "DSV3_TORCH_PREFILL_GEMM"


def prefill_cublas(kind: str) -> tuple[bool, str]:
    """(whether a program of `kind` runs its fp8 Linears that cublas_suits through blockwise torch._scaled_mm,
    why not when `auto` decided against it on this machine, else "")."""
    choice = env_choice(PREFILL_GEMM_ENV, "auto", {
        "auto": "cuBLAS's blockwise fp8 GEMM when this GPU computes it right, else the Triton GEMM",
        "cublas": "blockwise torch._scaled_mm for weights whose K is a multiple of 512 and N of 16",
        "triton": "kernels/fp8_gemm.py's GEMM for every fp8 Linear"})
    if kind != "prefill" or choice == "triton":
        return False, ""
    if choice == "cublas":
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device to check cuBLAS's blockwise fp8 GEMM on"
    why_not = blockwise_check(torch.cuda.current_device())
    return why_not is None, why_not or ""


# The decode program's W8A8 fp8 Linears whose K is not split (N tiles enough to fill the SMs: at the 16b shapes the
# dense MLP's w1 and w3): `decode` (default) kernels/fp8_gemm_decode.py, its swapped 64 x 16 tile at batch <= 16 and
# its direct 64 x 64 tile above, each launch gated off outside its batches; `tile` kernels/fp8_gemm.py's autotuned
# tile at every batch. H200, session 31 (benchmarks/fp8_decode_probe.py, w1/w3 N=10944 K=2048, CUDA graphs against
# blockwise _scaled_mm in alternation, call 8): 1.12x / 1.07x / 1.05x / 1.02x at M = 1 / 16 / 32 / 64 against the
# autotuned tile's 0.99x / 0.94x / 0.90x / 0.67x (its pinned 64 x 64 tile: 0.96x at M=64).
DECODE_GEMM_ENV = "DSV3_TORCH_DECODE_GEMM"


def decode_gemm_kernel(kind: str) -> bool:
    """Whether a program of `kind` runs kernels/fp8_gemm_decode.py for the fp8 Linears it takes."""
    choice = env_choice(DECODE_GEMM_ENV, "decode", {
        "decode": "kernels/fp8_gemm_decode.py for W8A8 Linears whose K is not split",
        "tile": "kernels/fp8_gemm.py's autotuned tile for every decode fp8 Linear"})
    return kind == "decode" and choice == "decode"


# M the fp8 GEMM's split-K is chosen for in the decode program (one 16-row tile: batch <= 16);
# and the autotune key's M bucket per program kind.
FP8_DECODE_M = 16
FP8_M_BUCKET = {"decode": kg.DECODE_MAX_M, "prefill": 4096}


def _fp8_gemm(a: torch.Tensor, a_s: torch.Tensor | None, w: torch.Tensor, w_s: torch.Tensor,
              out_dtype: torch.dtype, kind: str, small_batch=None, kernel_sum: bool = False,
              gemv_norm: ResidualNorm | None = None, decode_kernel: bool = False) -> torch.Tensor:
    """kernels/fp8_gemm.py fp8_gemm's launch with M symbolic: tiles and split-K from `kind` and the
    weight's static [N, K] (fp8_gemm itself buckets M with int(M), a guard on the traced size).
    a fp8 [M, K] + a_s [M, ceil(K/128)], or bf16/fp16 [M, K] with a_s None (weight-only).
    small_batch (x, gate), decode: kernels/fp8_gemv.py from the unquantized x [M, K] when gate is 1
    (kv.gemv_gate(M)); the tile GEMM launches nothing then. kernel_sum (SPLIT_K_SUM_ENV): split-K partials
    summed by the sum kernel, gated like the tile GEMM (the GEMV writes the output itself); else by
    Inductor's c.sum (the GEMV then writes split 0 and zeros the rest, which the sum adds). gemv_norm: the GEMV
    computes its rows from this norm (engines/torch_attn_norm.py; x is then not read by it). decode_kernel
    (DECODE_GEMM_ENV): a W8A8 decode GEMM whose K is not split runs kernels/fp8_gemm_decode.py, its swapped tile
    at M <= SWAP_MAX_M (less the GEMV's batches) and its direct tile above, instead of the autotuned tile."""
    m, k = a.shape
    n = w.shape[0]
    k_blocks = cdiv(k, QUANT_BLOCK)
    decode = kind == "decode"
    split, per_split = kg.rounded_split(kg._choose_split_k(FP8_DECODE_M, n, k_blocks, a.device) if decode else 1,
                                        k_blocks)
    if split == 1:
        c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    else:
        c = torch.empty((split, m, n), dtype=torch.float32, device=a.device)  # [S, M, N] partials
    kernel_sum = split > 1 and kernel_sum
    out = torch.empty((m, n), dtype=out_dtype, device=a.device) if kernel_sum else c
    tile_gate = 1
    if small_batch is not None:
        x, gate = small_batch
        torch_launch.launch_spec(gated(kv.gemv_spec(x, w, w_s, out, scale_reciprocal=a.is_cuda, norm=gemv_norm,
                                                    prefetch_w=gemv_prefetch_on()), gate))
        tile_gate = 1 - gate
    if decode_kernel and decode and kg.takes_decode_kernel(a_s is not None, split):
        swap = kd.swap_gate(m)  # 1 at M <= SWAP_MAX_M; with the GEMV's gate, exactly one of the three launches runs
        torch_launch.launch_spec(gated(kd.fp8_gemm_decode_spec(a, a_s, w, w_s, c, kd.SWAP_TILE), swap * tile_gate))
        torch_launch.launch_spec(gated(kd.fp8_gemm_decode_spec(a, a_s, w, w_s, c, kd.DIRECT_TILE),
                                       (1 - swap) * tile_gate))
        return c
    tile = kg.fp8_gemm_spec(a, a_s, w, w_s, c, FP8_M_BUCKET[kind], per_split, split, decode)
    torch_launch.launch_spec(gated(tile, tile_gate))
    if kernel_sum:  # the sum launches only with the tile GEMM; the GEMV wrote `out` itself
        torch_launch.launch_spec(gated(kg.split_k_sum_spec(c, out), tile_gate))
        return out
    return c.sum(dim=0).to(out_dtype) if split > 1 else c  # [M, N]


@triton_op("dsv3_aoti::fp8_linear", mutates_args={})
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
               decode: bool, gemv: bool = False, split_k_sum: bool = False, cublas: bool = False,
               decode_kernel: bool = False) -> torch.Tensor:
    """dsv3::fp8_linear: x [..., K] -> [..., N]; act_quant 1x128 + fp8 GEMM, or weight-only.
    gemv (decode, act_quant; DECODE_GEMV_ENV): batches of at most kv.GEMV_MAX_ROWS rows run
    kernels/fp8_gemv.py instead of act_quant + the GEMM, which then launch nothing. split_k_sum
    (SPLIT_K_SUM_ENV): split-K partials summed by the sum kernel instead of Inductor's c.sum. cublas
    (act_quant, bf16 x, a weight cublas_suits takes; PREFILL_GEMM_ENV): act_quant, then blockwise
    torch._scaled_mm (engines/torch_scaled_mm.py). decode_kernel (decode, act_quant; DECODE_GEMM_ENV): see
    _fp8_gemm."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    kind = "decode" if decode else "prefill"
    if act_quant and cublas:
        y = fp8_linear_cublas(x2, weight, scale)
    elif act_quant and gemv and decode:
        gate = kv.gemv_gate(x2.shape[0])  # 1 at M <= GEMV_MAX_ROWS, else 0 (symbolic: no guard)
        xq, xs = torch_launch.act_quant_launch(x2, 1 - gate)
        y = _fp8_gemm(xq, xs, weight, scale, x.dtype, kind, small_batch=(x2, gate), kernel_sum=split_k_sum,
                      decode_kernel=decode_kernel)
    elif act_quant:
        xq, xs = torch_launch.act_quant_launch(x2)
        y = _fp8_gemm(xq, xs, weight, scale, x.dtype, kind, kernel_sum=split_k_sum,
                      decode_kernel=decode_kernel)  # [M, N]
    else:
        y = _fp8_gemm(x2, None, weight, scale, x.dtype, kind, kernel_sum=split_k_sum)  # [M, N]
    return y.reshape(*x.shape[:-1], weight.shape[0])  # [..., N]


def triton_lowerings(kind: str, gemv: bool | None = None) -> dict[str, Callable]:
    """dsv3:: op name -> function with the op's signature calling a triton_op (for run_decompositions).
    gemv: the decode GEMV path (engines/torch_decode_gemv.py program_decode_gemv); None: decode_gemv(kind)."""
    from dsv3_export.engines.torch_lower import ATEN_LOWERINGS

    block_m = BLOCK_M[kind]
    gemv = decode_gemv(kind) if gemv is None else gemv
    absorb = absorb_gemm_on()
    head_gemv = gemv and head_gemv_on()  # with the decode GEMV: the same gate and the same tuning-batch rule
    merge_uv = head_gemv and merge_uv_on()
    kernel_sum = _split_k_sum_kernel(kind, gemv)
    cublas, no_cublas = prefill_cublas(kind)
    decode_kernel = decode_gemm_kernel(kind)
    align_form = env_choice(MOE_ALIGN_ENV, MOE_ALIGN_DEFAULT, MOE_ALIGN_FORMS)
    parallel_align = align_form == "kernel" and takes_parallel_form(block_m)
    routing = "moe_align " + ("in ATen ops" if align_form == "aten" else
                              "in three parallel kernels" if parallel_align else "one-program kernel")

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
        by_cublas = cublas and act_quant and x.dtype == torch.bfloat16 and cublas_suits(*weight.shape)
        return fp8_linear(x, weight, scale, act_quant, kind == "decode", small, kernel_sum, by_cublas,
                          decode_kernel and act_quant)

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
                            + ("; W8A8 GEMMs whose K is not split by kernels/fp8_gemm_decode.py (swapped tile at batch "
                               f"<= {kd.SWAP_MAX_M}, direct above)" if decode_kernel else "")
                            + ("; in prefill, W8A8 with bf16 x and a weight whose K is a multiple of 512 and N of 16 "
                               "by act_quant + blockwise torch._scaled_mm (cuBLAS, engines/torch_scaled_mm.py)"
                               if cublas else f"; prefill without cuBLAS: {no_cublas}" if no_cublas else "")
                            + "); ATen math for weight-only fp32 x")
    return {"dsv3::moe_experts": lower_moe, "dsv3::moe_experts_fp8": lower_moe_fp8,
            "dsv3::mla_attention": lower_mla, "dsv3::fp8_linear": lower_fp8_linear}
