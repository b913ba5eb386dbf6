"""Compile every kernel x config for sm_90 (H100/H200) on a machine without a GPU.

Run as `python -m tests.kernels._sm90_compile [--all-configs] [--usage] [--census] [--only FAMILY[,FAMILY]]` WITHOUT
TRITON_INTERPRET (the test runs it in a subprocess, one kernel family per test so that xdist spreads
them). Triton's frontend, its NVIDIA backend and the bundled ptxas need no GPU, so this catches what the
interpreter cannot: non-constexpr globals, helpers AOTInductor's copy of a kernel cannot reach (each kernel is
compiled from the source Inductor writes into a package: inductor_form), dtype rules of the compiled tl.dot,
shared-memory overflows; --usage adds registers and stack-frame (spill) bytes per thread,
--census the main loop's SASS instruction census (loop_census; a cuobjdump -sass per case, seconds for the
large fp8 kernels). Prints one JSON object per line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET to compile"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dsv3_export.kernels import (fp8_gemm, fp8_gemm_decode, fp8_gemm_persistent, fp8_gemv, fp8_quant,  # noqa: E402
                                 mla_absorb, mla_decode, mla_merge_uv, mla_prefill, mla_query, moe, moe_align, rms_norm,
                                 router_gate, topk)

TARGET = GPUTarget("cuda", 90, 32)
# Opt-in shared memory per block on H100/H200 (227 KB).
SMEM_LIMIT = 232448
FLOAT_ARGS = {"scale_log2", "eps", "scale"}
# How Inductor types a Python float argument of a user-defined Triton kernel on CUDA
# (torch/_inductor/codegen/triton_utils.py, _use_fp64_for_unbacked_floats): fp64. A kernel that
# multiplies fp32 tiles by such a scalar inside a loop then fails to compile inside an AOTInductor
# package ("loop-carried variable m_i ... re-assigned to fp64"), as seen on the H200 with torch 2.11.
# The eager launch types it fp32; fp64 is the stricter of the two, so every kernel is compiled with it.
FLOAT_TYPE = "fp64"
# Tensor-core instructions in the PTX, with their operand types (e.g.
# wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3, mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32).
MMA_OP = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*")
DIV_OP = re.compile(r"\bdiv\.[\w.]+")
# fp32(1/448) as a PTX immediate: the act_quant GPU form multiplies by it (torch's CUDA oracle does).
RECIP_448 = "0f3B124925"
# Integer args that are multiples of 16 at the real 16b shapes (K=2048/1408/10944, N likewise);
# the launch-time specialization tells the compiler so, which enables vectorized masked loads.
DIVISIBLE_INTS = {"K", "N", "N_OUT", "D"}


# The kernel families, one test each (xdist spreads them): family -> the kernels a case's first word names.
FAMILY_RULES = {
    "fp8": ("act_quant", "weight_dequant", "fp8_gemm", "split_k_sum", "fp8_gemv", "add_rms_norm"),
    "moe": ("grouped_gemm", "moe_align"),
    "mla_decode": ("mla_decode_split",),
    "mla": ("mla_decode_reduce", "mla_prefill", "head_gemm", "head_gemm_rope", "head_gemv", "mla_merge_uv"),
    "routing": ("router", "gate_partials"),
}
FAMILIES = tuple(FAMILY_RULES)


def family_of(case_name: str) -> str:
    """The family a case belongs to; a case no rule names is an error (it would never be compiled)."""
    kernel = case_name.split()[0]
    for family, heads in FAMILY_RULES.items():
        if kernel in heads:
            return family
    raise KeyError(f"compile case {case_name!r}: its kernel {kernel!r} is in no family of FAMILY_RULES")


def _attrs(kernel, pointers: dict[str, str]) -> dict[tuple[int], list]:
    """tt.divisibility=16 on pointers, strides and DIVISIBLE_INTS, as a real launch would infer (never on a
    constexpr: fp8_gemv's K is one)."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if not kernel.params[i].is_constexpr
            and (name in pointers or name.startswith("stride") or name in DIVISIBLE_INTS)}


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    """The bundled cuobjdump's output for a cubin (it sits beside the ptxas triton uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = Path(get_ptxas(90).path).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(cuobjdump), *flags, str(path)], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and stack-frame bytes per thread of the cubin Triton built (spilled registers live in the
    stack frame, so its size bounds the spills), from the bundled cuobjdump: no second ptxas run, and
    the numbers hold with a warm Triton cache too."""
    report = _cuobjdump(cubin, "--dump-resource-usage")
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report[-500:]}")
    return dict(registers=int(usage.group(1)), spill_bytes=int(usage.group(2)))


# SASS opcode -> census category of the main loop (loop_census): what the session-16 studies of the MLA decode
# kernel read to find its duplicated score-dot MMAs (72 HMMA per warp and tile where 36 do the work).
SASS_CATEGORIES = (
    ("global", r"^(LDGSTS|LDG|STG|LDGDEPBAR|RED|ATOM)\b"),
    ("shared", r"^(LDS|LDSM|STS|STSM)\b"),
    ("spill", r"^(LDL|STL)\b"),
    ("hmma", r"^HMMA\b"),
    ("wgmma", r"^(HGMMA|QGMMA)\b"),
    ("barrier", r"^(BAR|WARPSYNC|DEPBAR|WARPGROUP|MEMBAR|FENCE)\b"),
    ("shuffle", r"^SHFL\b"),
    ("convert", r"^(F2F|F2FP|F2I|I2F|I2FP)\b"),
)
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);\s*/\* 0x")
SASS_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(?:0x)?([0-9a-f]+)")


def loop_census(cubin: bytes) -> dict[str, int]:
    """Instructions of the kernel's main loop (the backward branch's body with the most tensor-core
    instructions, then the longest) by category, from the bundled cuobjdump's SASS: per warp and trip."""
    sass = _cuobjdump(cubin, "-sass")
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in map(SASS_LINE.search, sass.splitlines()) if m]
    best = None
    for addr, op in code:
        jump = SASS_BRANCH.search(op)
        if jump and int(jump.group(1), 16) < addr:
            body = [o for a, o in code if int(jump.group(1), 16) <= a <= addr]
            key = (sum("MMA" in o for o in body), len(body))
            best = max(best, (key, body)) if best else (key, body)
    if best is None:
        return {"total": 0}
    census = {"total": len(best[1])}
    for op in best[1]:
        op = re.sub(r"^@!?U?P[T0-9]+\s+", "", op)
        name = next((n for n, rx in SASS_CATEGORIES if re.match(rx, op)), None)
        if name:
            census[name] = census.get(name, 0) + 1
    return census


REDUCE_INPUT = re.compile(r"^\s*\}\) : \(tensor<([^,>]+), (#\w+)>\)", re.M)
LAYOUT_DEF = re.compile(r"^(#\w+) = (#ttg\.\w+<.*>)$", re.M)


def reduce_layouts(ttgir: str) -> list[str]:
    """Each tt.reduce's input as `shape layout` (the layout spelled out), in program order: a reduction's fp32
    sum order follows its layout, so kernels meant to sum alike (kernels/mla_merge_uv.py) must list the same."""
    defs = dict(LAYOUT_DEF.findall(ttgir))
    return [f"{shape} {defs.get(name, name)}" for shape, name in REDUCE_INPUT.findall(ttgir)]


def _signature(kernel, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = FLOAT_TYPE if name in FLOAT_ARGS else "i32"
    return sig


def _cases(all_configs: bool):
    def pick(configs):
        return configs if all_configs else configs[:1]

    bf, f8, f32, i32 = "*bf16", "*fp8e4nv", "*fp32", "*i32"
    for cfg in pick(fp8_quant.ACT_QUANT_CONFIGS):
        for name, kernel in (("act_quant", fp8_quant._act_quant_kernel),
                             ("act_quant ieee", fp8_quant._act_quant_ieee_kernel)):
            yield (name, kernel, cfg, dict(x_ptr=bf, q_ptr=f8, s_ptr=f32), dict(BLOCK_K=128))
    for cfg in pick(fp8_quant.DEQUANT_CONFIGS):
        yield ("weight_dequant", fp8_quant._weight_dequant_kernel, cfg,
               dict(w_ptr=f8, s_ptr=f32, y_ptr=bf), dict(SCALE_BLOCK=128))
    # Both tile sets even without --all-configs: decode tiles use mma.sync, prefill tiles wgmma.
    gemm_configs = fp8_gemm.FP8_GEMM_CONFIGS if all_configs else fp8_gemm.DECODE_CONFIGS[:1] + \
        fp8_gemm.PREFILL_CONFIGS[:1]
    for cfg in gemm_configs:
        for split, c, a_fp8 in ((1, bf, True), (4, f32, True), (1, bf, False)):
            yield (f"fp8_gemm split_k={split} a_fp8={a_fp8}", fp8_gemm._fp8_gemm_kernel, cfg,
                   dict(a_ptr=f8 if a_fp8 else bf, a_s_ptr=f32, b_ptr=f8, b_s_ptr=f32, c_ptr=c),
                   dict(A_FP8=a_fp8, UPCAST=False, BLOCK_K=128))
    # The decode GEMM's two tiles as the 16b w1/w3 run them (no predicate on the weight), and ragged
    for tile, even in ((fp8_gemm_decode.SWAP_TILE, True), (fp8_gemm_decode.SWAP_TILE, False),
                       (fp8_gemm_decode.DIRECT_TILE, True), (fp8_gemm_decode.DIRECT_TILE, False)):
        orientation = "swap" if tile["SWAP_AB"] else "direct"
        yield (f"fp8_gemm decode {orientation} block_m={tile['BLOCK_M']} even={even} a_fp8=True",
               fp8_gemm_decode._fp8_gemm_decode_kernel,
               fp8_gemm_decode.CONFIG, dict(a_ptr=f8, a_s_ptr=f32, b_ptr=f8, b_s_ptr=f32, c_ptr=bf),
               dict(tile, BLOCK_K=128, EVEN_K=even, EVEN_N=even))
    # The Hopper prefill candidate (TMA descriptors, persistent): every config and prefill sweep candidate
    # with a bf16 C (what fp8_linear writes); an fp32 C (32 KB more epilogue tile) for the first config only.
    tma_configs = {str(c): c for c in [*fp8_gemm_persistent.TMA_PERSISTENT_CONFIGS,
                                       *fp8_gemm_persistent.PREFILL_CANDIDATES.values()]}.values()
    for i, cfg in enumerate(tma_configs):
        for c in (bf, f32) if i == 0 or all_configs else (bf,):
            yield (f"fp8_gemm tma_persistent c={c} a_fp8=True", fp8_gemm_persistent._fp8_gemm_tma_persistent_kernel,
                   cfg, dict(a_ptr=f8, a_s_ptr=f32, b_ptr=f8, b_s_ptr=f32, c_ptr=c),
                   dict(BLOCK_K=128))
    for c in (bf, f32):
        yield (f"split_k_sum c={c}", fp8_gemm._split_k_sum_kernel, triton.Config({}, num_warps=4),
               dict(ws_ptr=f32, c_ptr=c), dict(SPLIT_K=fp8_gemm.MAX_SPLIT_K, BLOCK=fp8_gemm.SPLIT_K_SUM_BLOCK))
    # the decode GEMV at the 16b attention's K (the lowering's gemv_suits), and the MoE's up (SwiGLU) and down forms
    for cfg in fp8_gemv.GEMV_CONFIGS if all_configs else fp8_gemv.GEMV_CONFIGS[:1]:
        for k, experts, swiglu, mul_weight, zero_splits in ((2048, False, False, False, 0),
                                                            (2048, False, False, False, 3),  # into split-K partials
                                                            (2048, True, True, False, 0), (1408, True, False, True, 0)):
            yield (f"fp8_gemv K={k} experts={experts} swiglu={swiglu} zero_splits={zero_splits}",
                   fp8_gemv._fp8_gemv_kernel, cfg,
                   dict(x_ptr=bf, w_ptr=f8, w_s_ptr=f32, c_ptr=f32 if zero_splits else bf, ids_ptr="*i64",
                        topk_w_ptr=f32, r_ptr=bf, d_ptr=bf, nw_ptr=bf, h_ptr=bf),
                   dict(K=k, EXPERTS=experts, SWIGLU=swiglu, MUL_WEIGHT=mul_weight, SCALE_RECIPROCAL=True,
                        SCALE_BLOCK=128, ZERO_SPLITS=zero_splits, NORM=False, KP=1, PREFETCH_W=False, K_LINES=16))
        # the weight rows prefetched into L2 before the wait (DSV3_TORCH_GEMV_PREFETCH): wq + wkv_a, wo
        yield ("fp8_gemv K=2048 prefetch_w zero_splits=0", fp8_gemv._fp8_gemv_kernel, cfg,
               dict(x_ptr=bf, w_ptr=f8, w_s_ptr=f32, c_ptr=bf, ids_ptr="*i64", topk_w_ptr=f32, r_ptr=bf, d_ptr=bf,
                    nw_ptr=bf, h_ptr=bf),
               dict(K=2048, EXPERTS=False, SWIGLU=False, MUL_WEIGHT=False, SCALE_RECIPROCAL=True, SCALE_BLOCK=128,
                    ZERO_SPLITS=0, NORM=False, KP=1, PREFETCH_W=True, K_LINES=16))
        # the attention norm in the prologue (engines/torch_attn_norm.py): wq + wkv_a at the 16b K, split-K workspace
        yield ("fp8_gemv K=2048 norm zero_splits=3", fp8_gemv._fp8_gemv_kernel, cfg,
               dict(x_ptr=bf, w_ptr=f8, w_s_ptr=f32, c_ptr=f32, ids_ptr="*i64", topk_w_ptr=f32, r_ptr=bf, d_ptr=bf,
                    nw_ptr=bf, h_ptr=bf),
               dict(K=2048, EXPERTS=False, SWIGLU=False, MUL_WEIGHT=False, SCALE_RECIPROCAL=True, SCALE_BLOCK=128,
                    ZERO_SPLITS=3, NORM=True, KP=2048, PREFETCH_W=False, K_LINES=16))
    for cfg in pick(rms_norm.NORM_CONFIGS):  # the attention norm at batches the tile GEMM serves (16b: K = 2048)
        yield ("add_rms_norm K=2048", rms_norm._add_rms_norm_kernel, cfg,
               dict(r_ptr=bf, d_ptr=bf, w_ptr=bf, x_ptr=bf, h_ptr=bf), dict(KP=2048))
    for cfg in pick(moe.GROUPED_GEMM_CONFIGS):
        # (True, True, True, 64): the fp8 prefill MoE's up GEMM (gate and up, each a partial and an accumulator; triton
        # 3.9's ptxas: 250-255 registers at BLOCK_N >= 64 with up to 64 B of spills, 150 at 32; bf16: 72-255, 0-8 B)
        for w_fp8, a_fp8, swiglu, block_m in ((True, True, True, 16), (True, True, False, 64), (True, True, True, 64),
                                              (True, False, True, 16), (False, False, True, 64),
                                              (False, False, False, 16)):
            yield (f"grouped_gemm w_fp8={w_fp8} a_fp8={a_fp8} swiglu={swiglu} block_m={block_m}",
                   moe._grouped_gemm_kernel, cfg,
                   dict(a_ptr=f8 if a_fp8 else bf, a_s_ptr=f32, w_ptr=f8 if w_fp8 else bf,
                        w_s_ptr=f32, c_ptr=bf, topk_w_ptr=f32, sorted_ids_ptr=i32, expert_ids_ptr=i32,
                        num_post_pad_ptr=i32, topk_ids_ptr="*i64"),
                   dict(W_FP8=w_fp8, A_FP8=a_fp8, SWIGLU=swiglu, MUL_WEIGHT=not swiglu, UPCAST=False,
                        SCALE_BLOCK=128, BLOCK_M=block_m, BLOCK_K=128 if w_fp8 else moe.DENSE_BLOCK_K))
    for e, ids in ((64, "*i64"), (256, "*i32")):  # the 16b preset's 64 experts; V3's 256
        yield (f"moe_align E={e}", moe_align._moe_align_kernel, triton.Config({}, num_warps=4),
               dict(ids_ptr=ids, sorted_ids_ptr=i32, expert_ids_ptr=i32, npp_ptr=i32),
               dict(E=e, BLOCK_E=e, BLOCK_M=16, CHUNK=moe_align.ALIGN_TILE // e, FILL=1024))
        # the parallel form (block_m >= 64): per-slice histograms, the offsets program, the scatter
        chunk = moe_align.ALIGN_TILE // e
        yield (f"moe_align count E={e}", moe_align._align_count_kernel, triton.Config({}, num_warps=4),
               dict(ids_ptr=ids, counts_ptr=i32, sorted_ids_ptr=i32), dict(BLOCK_E=e, CHUNK=chunk, FILL=1024))
        yield (f"moe_align offsets E={e}", moe_align._align_offsets_kernel, triton.Config({}, num_warps=4),
               dict(counts_ptr=i32, offsets_ptr=i32, expert_ids_ptr=i32, npp_ptr=i32),
               dict(E=e, BLOCK_E=e, BLOCK_M=64, SLICES=moe_align.PARALLEL_SLICES, CHUNK=chunk))
        yield (f"moe_align scatter E={e}", moe_align._align_scatter_kernel, triton.Config({}, num_warps=4),
               dict(ids_ptr=ids, offsets_ptr=i32, sorted_ids_ptr=i32), dict(BLOCK_E=e, CHUNK=chunk))
    mla_dims = dict(C=512, R=64, BLOCK_C=512, BLOCK_R=64, UPCAST=False)
    # Host-chosen splits (8), and the traced program's runtime split rule (MAX_SPLITS split programs, the
    # kernels pick how many run: early returns, a runtime `splits`); it always has the new token.
    eager = dict(SPLIT_TARGET=0, MIN_SPLITS=mla_decode.RUNTIME_MIN_SPLITS, MIN_KEYS=mla_decode.MIN_SPLIT_KEYS)
    runtime = dict(eager, SPLIT_TARGET=2 * 132)
    max_s = triton.next_power_of_2(mla_decode.MAX_SPLITS)
    # Every variant (mla_decode.VARIANT_FLAGS): the pointer form's configs, and for "early" and "lazy" the pointer
    # configs the benchmark's mla_sweep pins; without and with the new token, both split rules.
    early_ptr = [c for c in mla_decode.DECODE_CONFIGS if (c.kwargs["BLOCK_N"], c.kwargs["PREFETCH"], c.maxnreg) in
                 ((32, 0, None), (64, 2, None)) and c.num_warps == 4 and c.num_stages in (2, 3)]
    for variant, flags in mla_decode.VARIANT_FLAGS.items():
        for cfg in pick(mla_decode.DECODE_CONFIGS) if variant == "pointer" else early_ptr:
            # rope_q: the engine's DSV3_TORCH_Q_ROPE=kernel, the query's RoPE in the kernel
            for has_new, rt, rope_q in ((False, False, False), (True, False, False), (True, True, False),
                                        (True, True, True)):
                yield (f"mla_decode_split {variant} has_new={has_new} runtime_splits={rt} rope_q={rope_q}",
                       mla_decode._mla_decode_split_kernel, cfg,
                       dict(q_ptr=bf, q_pe_ptr=bf, kv_ptr=bf, pe_ptr=bf, kvn_ptr=bf, pen_ptr=bf,
                            seqlens_ptr="*i64" if rt else i32,  # the engine's: the step's start_pos as it is
                            o_part_ptr=f32, lse_ptr=f32, cos_ptr=f32, sin_ptr=f32, pos_ptr="*i64"),
                       dict(mla_dims, BLOCK_H=16, HAS_NEW=has_new, ROPE_Q=rope_q, **flags,
                            **(runtime if rt else eager)))
    for cfg in mla_decode.BULK_PREFETCH_CONFIGS:  # the sweep's bulk L2 prefetch (cp.async.bulk.prefetch)
        for has_new, rt, rope_q in ((False, False, False), (True, True, True)):
            yield (f"mla_decode_split pointer has_new={has_new} runtime_splits={rt} rope_q={rope_q}",
                   mla_decode._mla_decode_split_kernel, cfg,
                   dict(q_ptr=bf, q_pe_ptr=bf, kv_ptr=bf, pe_ptr=bf, kvn_ptr=bf, pen_ptr=bf,
                        seqlens_ptr="*i64" if rt else i32, o_part_ptr=f32, lse_ptr=f32, cos_ptr=f32, sin_ptr=f32,
                        pos_ptr="*i64"),
                   dict(mla_dims, BLOCK_H=16, HAS_NEW=has_new, ROPE_Q=rope_q, **mla_decode.VARIANT_FLAGS["pointer"],
                        **(runtime if rt else eager)))
    for rt in (False, True):
        yield (f"mla_decode_reduce runtime_splits={rt}", mla_decode._mla_decode_reduce_kernel,
               triton.Config({}, num_warps=4),
               dict(o_part_ptr=f32, lse_ptr=f32, out_ptr=bf, seqlens_ptr="*i64" if rt else i32),
               dict(C=512, BLOCK_C=512, BLOCK_S=max_s if rt else 8, **(runtime if rt else eager)))
    for cfg in pick(mla_prefill.PREFILL_CONFIGS):
        for has_new in (False, True):
            yield (f"mla_prefill has_new={has_new}", mla_prefill._mla_prefill_kernel, cfg,
                   dict(q_ptr=bf, q_pe_ptr=bf, kv_ptr=bf, pe_ptr=bf, kvn_ptr=bf, pen_ptr=bf, start_ptr=i32,
                        out_ptr=bf), dict(mla_dims, HAS_NEW=has_new))
    for cfg in pick(topk.ROUTER_CONFIGS):  # the 16b router: 64 routed + 2 shared experts, top-6
        yield ("router", topk._router_kernel, cfg, dict(logits_ptr=bf, w_ptr=bf, idx_ptr="*i64"),
               dict(TOPK=6, N_EXTRA=2, BLOCK_N=64, SPLITS=1, ROUND_BF16=False))
        # from the split gate's partials (K = 2048: 16 splits), rounded to bf16
        yield ("router splits=16", topk._router_kernel, cfg, dict(logits_ptr=f32, w_ptr=bf, idx_ptr="*i64"),
               dict(TOPK=6, N_EXTRA=2, BLOCK_N=64, SPLITS=16, ROUND_BF16=True))
    for cfg in pick(router_gate.GATE_CONFIGS):  # the 16b gate: x [T, 2048] . W [64, 2048]^T in 128-wide splits
        for quant_x, rows in ((False, 0), (True, 0), (True, router_gate.ROW_QUANT_MAX_ROWS)):  # and act_quant(x)
            yield (f"gate_partials quant_x={quant_x} row_quant_max_rows={rows}", router_gate._gate_partials_kernel,
                   cfg, dict(x_ptr=bf, w_ptr=bf, part_ptr=f32, q_ptr=f8 if quant_x else f32, s_ptr=f32),
                   dict(SPLIT=router_gate.SPLIT_K, UPCAST=False, IEEE=False, QUANT_X=quant_x, SCALE_RECIPROCAL=True,
                        ROW_QUANT_MAX_ROWS=rows))
    for cfg in pick(mla_absorb.HEAD_GEMM_CONFIGS):  # MLA's W_UK / W_UV per-head GEMM (bf16 x and weight views)
        yield ("head_gemm", mla_absorb._head_gemm_kernel, cfg, dict(x_ptr=bf, w_ptr=bf, out_ptr=bf), dict(UPCAST=False))
    for cfg in pick(mla_query.HEAD_GEMM_ROPE_CONFIGS):  # W_UK with the query's RoPE in its launch (16b R = 64)
        yield ("head_gemm_rope", mla_query._head_gemm_rope_kernel, cfg,
               dict(x_ptr=bf, w_ptr=bf, out_ptr=bf, q_pe_ptr=bf, cos_ptr=f32, sin_ptr=f32, pos_ptr="*i64",
                    q_pe_out_ptr=bf), dict(R=64, BLOCK_R=64, UPCAST=False))
    for cfg in mla_absorb.HEAD_GEMV_CONFIGS:  # W_UV at batch <= 2: K = c = 512; and the largest K it takes
        for k in (512, mla_absorb.HEAD_GEMV_MAX_K):
            yield (f"head_gemv K={k}", mla_absorb._head_gemv_kernel, cfg, dict(x_ptr=bf, w_ptr=bf, out_ptr=bf),
                   dict(K=k, BLOCK_K=k))
    for cfg in mla_merge_uv.MERGE_UV_CONFIGS:  # the split merge + W_UV at batch <= 2: 16b's C = 512, 32 splits
        for prefetch in (False, True):  # and W_UV's rows prefetched into L2 first (DSV3_TORCH_MERGE_UV_PREFETCH)
            yield (f"mla_merge_uv runtime_splits=True prefetch_w={prefetch}", mla_merge_uv._mla_merge_uv_kernel, cfg,
                   dict(o_part_ptr=f32, lse_ptr=f32, seqlens_ptr="*i64", w_ptr=bf, out_ptr=bf),
                   dict(C=512, BLOCK_C=512, BLOCK_S=max_s, PREFETCH_W=prefetch, **runtime))


PDL_OP = re.compile(r"\b(prefetch\.global\.L2|griddepcontrol\.wait|griddepcontrol\.launch_dependents)\b")


def pdl_order(ptx: str) -> list[str]:
    """The PTX's L2 prefetches and griddepcontrol instructions in program order, runs of one collapsed: e.g.
    ["prefetch", "wait", "launch_dependents"] for a kernel that prefetches, waits, then lets its dependents launch."""
    order: list[str] = []
    for op in PDL_OP.findall(ptx):
        name = op.split(".")[-1] if op.startswith("griddep") else "prefetch"
        if not order or order[-1] != name:
            order.append(name)
    return order


_INDUCTOR_FORMS: dict[str, object] = {}
_INDUCTOR_DIR = tempfile.TemporaryDirectory(prefix="dsv3_inductor_src_")  # removed at exit


def inductor_form(kernel):
    """The kernel as AOTInductor compiles it: rebuilt from the source Inductor writes into a package (its common
    Triton imports, then the kernel and every @triton.jit helper it reaches, with the int / constexpr globals they
    read), imported from a file of its own. Why: the session-23 builds with the gate norm died on the GPU with
    "NameError: topk is not defined": a helper called through a module attribute (topk._round_bf16) compiles from
    its own module, but Inductor copies no modules into the package, only JIT functions and constants."""
    import importlib.util

    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    key = f"{kernel.fn.__module__}.{kernel.__name__}"
    if key not in _INDUCTOR_FORMS:
        source = (TritonKernel.gen_common_triton_imports() + "\n@triton.jit\n"
                  + user_defined_triton_kernel_transitive_closure_source_code(kernel))
        path = Path(_INDUCTOR_DIR.name) / f"k{len(_INDUCTOR_FORMS)}_{kernel.__name__}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _INDUCTOR_FORMS[key] = getattr(module, kernel.__name__)
    return _INDUCTOR_FORMS[key]


def main(all_configs: bool, with_usage: bool = False, only: frozenset[str] | None = None,
         with_census: bool = False) -> int:
    print(json.dumps({"families": list(FAMILIES)}), flush=True)  # the test checks it has one test per family
    failures = 0
    for name, kernel, cfg, pointers, constexprs in _cases(all_configs):
        family = family_of(name)  # for every case: one in no family fails every run
        if only is not None and family not in only:
            continue
        # constexpr parameters with a default take it, as a real launch does
        defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
        consts = {**defaults, **constexprs, **cfg.kwargs}
        row = dict(kernel=name, config=str(cfg))
        try:
            kernel = inductor_form(kernel)
        except Exception as e:  # noqa: BLE001 - a kernel Inductor cannot copy fails its cases
            row.update(ok=False, error=f"Inductor's copy of the kernel: {type(e).__name__}: {str(e)[:800]}")
            failures += 1
            print(json.dumps(row), flush=True)
            continue
        src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, consts), constexprs=consts,
                        attrs=_attrs(kernel, pointers))
        t0 = time.time()
        try:
            compiled = triton.compile(src, target=TARGET,
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                                   **({'maxnreg': cfg.maxnreg} if cfg.maxnreg else {})))
            ptx = compiled.asm["ptx"]
            row.update(ok=True, shared=compiled.metadata.shared, wgmma="wgmma" in ptx,
                       mma="mma.sync" in ptx, fits=compiled.metadata.shared <= SMEM_LIMIT,
                       mma_ops=sorted(set(MMA_OP.findall(ptx))), div_ops=sorted(set(DIV_OP.findall(ptx))),
                       mul_recip_448=RECIP_448 in ptx, reduce_layouts=reduce_layouts(compiled.asm["ttgir"]),
                       pdl_order=pdl_order(ptx), warp_specialized="setmaxnreg" in ptx,
                       bulk_prefetches=ptx.count("cp.async.bulk.prefetch.L2"))
            if with_usage:
                row.update(_resource_usage(compiled.asm["cubin"]))
            if with_census:
                row.update(loop=loop_census(compiled.asm["cubin"]))
        except Exception as e:  # noqa: BLE001 - report every failure, keep compiling the rest
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:800]}")
        row["seconds"] = round(time.time() - t0, 2)
        failures += not (row["ok"] and row.get("fits", False))
        print(json.dumps(row), flush=True)
    return 1 if failures else 0


def _only(argv: list[str]) -> frozenset[str] | None:
    if "--only" not in argv:
        return None
    i = argv.index("--only")
    names = frozenset(argv[i + 1].split(",")) if i + 1 < len(argv) else frozenset()
    unknown = names - set(FAMILIES)
    if not names or unknown:
        sys.exit(f"--only: unknown kernel families {sorted(unknown)}; families: {', '.join(FAMILIES)}")
    return names


if __name__ == "__main__":
    sys.exit(main("--all-configs" in sys.argv, "--usage" in sys.argv, _only(sys.argv), "--census" in sys.argv))
