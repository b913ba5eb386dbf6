"""mla_decode's kernel variants: constexpr paths of the one split kernel (kernels/mla_decode_kernels.py).

Why they exist (the measurements that motivated them are in mla_decode's docstring): each variant is
a different answer to what bounds the split kernel, and only the H200 can tell which is right, so
benchmarks/kernels.py mla_sweep times them side by side, pinned, before any becomes the default.
"""

from __future__ import annotations

# Kernel variants, selected per call (variant=...; mla_decode.DECODE_VARIANT is the default). "pointer":
# the cp.async loads of mla_decode.DECODE_CONFIGS. "early": q and the new token are loaded before the
# program waits for its row's cache length (in the runtime split rule, the row check that returns surplus
# programs stalls on it), and the new token's scores come from q already in registers, where the default
# reloads q ([C, BLOCK_H], an L2 round trip) after the loop. Latency, not bytes: for B=1 at context 1024
# (16 programs, one or two tiles each). "early" takes a pinned config (no autotuner). The "tma" variants
# were removed in session 14 (mla_decode's docstring).
# Every flag in every variant, defaults included: torch's triton_op tracing (identify_mutated_tensors)
# needs the whole argument list; a launch that leaves a constexpr out makes it assume every input is
# mutated, and AOTInductor then copies the KV cache around the kernel (seen on the H200).
# "lazy" (session 27; on the H200, session 28, no faster: 57.0 against 56.4 us at B=32 ctx 4096): the running max
# moves only when a tile's exceeds it by more than LAZY_LOG2 (kernels/mla_decode_kernels.py), so most tiles skip the
# accumulator's rescale: fewer instructions between a tile's arrival and the next tile's load, which waits for the
# tile's value dot (mla_decode's docstring).
VARIANT_FLAGS = {"pointer": {"EARLY": False, "LAZY": False}, "early": {"EARLY": True, "LAZY": False},
                 "lazy": {"EARLY": False, "LAZY": True}}
DECODE_VARIANTS = tuple(VARIANT_FLAGS)
