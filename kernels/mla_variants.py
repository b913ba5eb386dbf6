"""mla_decode's kernel variants: constexpr paths of the one split kernel (kernels/mla_decode_kernels.py), and the
configs and input rules that go with them.

Why they exist (the measurements that motivated them are in mla_decode's docstring): each variant is
a different answer to what bounds the split kernel, and only the H200 can tell which is right, so
benchmarks/kernels.py mla_sweep times them side by side, pinned, before any becomes the default.
"""

from __future__ import annotations

import torch
import triton

from dsv3_export.kernels.fp8_gemm_persistent import TMA_ALIGN

# Kernel variants, selected per call (variant=...; mla_decode.DECODE_VARIANT is the default). "pointer":
# the cp.async loads of mla_decode.DECODE_CONFIGS. "tma": KV tiles through device-side tensor descriptors (Hopper's
# TMA unit: one thread issues the [BN, 512] copy, no per-thread addresses or masks in the loop, the
# loaded tile lands swizzled in shared memory where both dots read it). Not measured yet: the benchmark's
# mla_sweep times it against the default before it may become one.
# "early" (either load form): q and the new token are loaded before the program waits for its row's
# cache length (in the runtime split rule, the row check that returns surplus programs stalls on it),
# and the new token's scores come from q already in registers, where the default reloads q ([C,
# BLOCK_H], an L2 round trip) after the loop. Latency, not bytes: for B=1 at context 1024 (16 programs,
# one or two tiles each). "early" variants take a pinned config (no autotuner).
# Every flag in every variant, defaults included: torch's triton_op tracing (identify_mutated_tensors)
# needs the whole argument list; a launch that leaves a defaulted constexpr out makes it assume every
# input is mutated, and AOTInductor then copies the KV cache around the kernel (seen on the H200).
VARIANT_FLAGS = {"pointer": {"TMA": False, "EARLY": False}, "tma": {"TMA": True, "EARLY": False},
                 "early": {"TMA": False, "EARLY": True}, "tma_early": {"TMA": True, "EARLY": True}}
DECODE_VARIANTS = tuple(VARIANT_FLAGS)
# TMA tiles, sm_90 (python -m tests.kernels._sm90_compile --all-configs --ptxas-v, triton 3.9): the
# pipeliner keeps num_stages - 1 buffers of BN x 1152 B (BN=64: num_stages) plus q^T (18 KB); the loads
# need no registers (125 against the pointer form's 128 at BN=32 w4), so shared memory sets the programs
# per SM. No spills; the new-token epilogue takes 164-180.
#   BN=32 w4 s3: 93 KB, 2 per SM (the default's tile: 8 splits at B=32 = one wave)
#   BN=32 w8 s3: 93 KB, 2 per SM, the [C, BLOCK_H] accumulator over two warpgroups
#   BN=16 w4 s4: 74 KB, 3 per SM (12 splits at B=32 = 384 programs of 396 slots)
#   BN=64 w4 s2: 168 KB, 1 per SM, both dots wgmma (B=1: 16 programs, one 64-key tile each)
# (BN=64 s3 takes 242 KB: over the 227 KB limit.)
TMA_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "PREFETCH": 0}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 16, "PREFETCH": 0}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "PREFETCH": 0}, num_warps=4, num_stages=2),
]


def tma_unsupported(kv_cache: torch.Tensor, pe_cache: torch.Tensor) -> str | None:
    """Why variant="tma" cannot read these caches, or None: TMA wants 16-byte aligned base addresses
    (each batch row's too) and row strides."""
    for name, t in (("kv_cache", kv_cache), ("pe_cache", pe_cache)):
        item = t.element_size()
        if t.data_ptr() % TMA_ALIGN or (t.stride(0) * item) % TMA_ALIGN or (t.stride(1) * item) % TMA_ALIGN:
            return (f"{name} needs a 16-byte aligned base, batch stride and row stride for TMA; got address "
                    f"{t.data_ptr() % TMA_ALIGN} mod 16 and strides {tuple(x * item for x in t.stride())} B")
    return None
