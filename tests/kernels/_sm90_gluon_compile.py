"""Compile kernels/fp8_gemm_gluon.py for sm_90 on a machine without a GPU and print what its design needs.

Run as `python -m tests.kernels._sm90_gluon_compile` WITHOUT TRITON_INTERPRET (tests/kernels/test_fp8_gemm_gluon.py
runs it in a subprocess). Gluon has no CPU interpreter, so this is what CI can check of the kernel: it builds through
Triton's NVIDIA backend and the bundled ptxas for every tile the launcher offers, fits in shared memory, spills
nothing, and ptxas kept the wgmma pipeline the kernel asks for: one WARPGROUP.DEPBAR in the SASS per
wgmma.wait_group in the PTX (a serialized pipeline, ptxas C7514, adds one after every wgmma). One JSON line per case.
"""

from __future__ import annotations

import json
import os
import re

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET to compile"

import triton  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from dsv3_export.kernels import fp8_gemm_gluon as G  # noqa: E402
from dsv3_export.kernels import fp8_gemm_gluon_ws as W  # noqa: E402
from tests.kernels._sm90_compile import SMEM_LIMIT, TARGET, _cuobjdump, _resource_usage  # noqa: E402

# The single-partition kernel's (block_m, unroll, stages, c dtype): the launcher's default, the one-warpgroup tile and
# an fp32 c (a 64 KB epilogue tile). Not offered: unroll 4 (253-255 registers; 64 B spilled at 6 stages with triton
# 3.9). The warp-specialized kernel is compiled at the module's WS_* tile (unroll 4 since session 29).
CASES = ((128, 2, 4, "bf16"), (64, 2, 4, "bf16"), (128, 2, 4, "fp32"))
_GL = {"bf16": gl.bfloat16, "fp32": gl.float32, "fp8e4nv": gl.float8e4nv}


def _descriptor_type(dtype: str, block: list[int], layout=None) -> str:
    """The signature string of a host-side Gluon tensor descriptor argument (what a launch would infer); layout:
    the descriptor's shared layout, by default the swizzled one its block and dtype get."""
    layout = layout or gl.NVMMASharedLayout.get_default_for(block, _GL[dtype])
    return f"tensordesc<{dtype}[{block[0]}, {block[1]}],{layout!r}>"


def _compile(kernel, signature: dict, constexprs: dict, num_warps: int, row: dict) -> dict:
    """row + what the build shows: shared memory, the wgmma forms, wait / DEPBAR / QGMMA counts, setmaxnreg values,
    registers and spills (or ok=False and the error)."""
    src = GluonASTSource(fn=kernel, signature=signature,
                         constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    try:
        compiled = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps))
    except Exception as e:  # noqa: BLE001 - a case that does not build is the result
        return row | dict(ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}")
    ptx = compiled.asm["ptx"]
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    setmaxnreg = re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)
    return row | dict(ok=True, shared=compiled.metadata.shared, fits=compiled.metadata.shared <= SMEM_LIMIT,
                      wgmma=sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx))),
                      ptx_waits=len(re.findall(r"wgmma\.wait_group", ptx)),
                      sass_depbars=len(re.findall(r"WARPGROUP\.DEPBAR", sass)),
                      sass_gmmas=len(re.findall(r"\bQGMMA\b", sass)),
                      sass_tma_loads=len(re.findall(r"\bUTMALDG\.", sass)),
                      setmaxnreg=sorted({int(v) for v in setmaxnreg}), **_resource_usage(compiled.asm["cubin"]))


def compile_case(block_m: int, unroll: int, stages: int, c_dtype: str) -> dict:
    """The single-partition kernel at one tile."""
    num_warps = block_m // 16
    signature = dict(a_desc=_descriptor_type("fp8e4nv", [block_m, 128]),
                     b_desc=_descriptor_type("fp8e4nv", [G.BLOCK_N, 128]),
                     c_desc=_descriptor_type(c_dtype, [block_m, G.BLOCK_N]), a_s_ptr="*fp32", b_s_ptr="*fp32",
                     M="i32", N="i32", K="i32", stride_asm="i32", stride_ask="constexpr", stride_bsn="i32",
                     GROUP_M="constexpr", STAGES="constexpr", UNROLL="constexpr", num_warps="constexpr")
    # row-major a_s: a launch makes its unit stride a constant (Triton's rule for ints equal to 1)
    constexprs = dict(stride_ask=1, GROUP_M=G.GROUP_M, STAGES=stages, UNROLL=unroll, num_warps=num_warps)
    row = dict(kernel="fp8_gemm_gluon", block_m=block_m, unroll=unroll, stages=stages, c=c_dtype)
    return _compile(G._fp8_gemm_gluon_kernel, signature, constexprs, num_warps, row)


def compile_warp_specialized(c_dtype: str, consumer_regs: int = 232, producer_regs: int = 40) -> dict:
    """The producer / two-consumer kernel (its tile constants are fp8_gemm_gluon_ws's WS_* constexprs)."""
    signature = dict(a_desc=_descriptor_type("fp8e4nv", [64, 128]),
                     b_desc=_descriptor_type("fp8e4nv", [G.BLOCK_N, 128]),
                     c_desc=_descriptor_type(c_dtype, [64, G.BLOCK_N]),
                     s_desc=_descriptor_type("fp32", W.SCALE_BLOCK, W.SCALE_LAYOUT), b_s_ptr="*fp32", M="i32",
                     N="i32", K="i32", stride_bsn="i32", CONSUMER_REGS="constexpr", PRODUCER_REGS="constexpr",
                     num_warps="constexpr")
    constexprs = dict(CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, num_warps=4)
    row = dict(kernel="fp8_gemm_gluon_ws", block_m=128, unroll=int(W.WS_UNROLL), stages=int(W.WS_STAGES), c=c_dtype,
               consumers=2)
    return _compile(W._fp8_gemm_gluon_ws_kernel, signature, constexprs, 4, row)


def main() -> None:
    print(json.dumps(dict(triton=triton.__version__)), flush=True)
    for case in CASES:
        print(json.dumps(compile_case(*case)), flush=True)
    for c_dtype in ("bf16", "fp32"):
        print(json.dumps(compile_warp_specialized(c_dtype)), flush=True)


if __name__ == "__main__":
    main()
