"""L2 prefetch hints (PTX prefetch.global.L2) for kernels whose loads wait on one another.

Why: a program that must read one thing before it knows what to read next (a row's length, then its partials, then the
weight rows) pays one DRAM round trip per step; a prefetch issued at the start puts later bytes in flight at once
(kernels/mla_decode_kernels.py's tiles ahead, kernels/mla_merge_uv.py's weight rows). No data comes back and nothing is
written: the same bits with or without it.

The asm has side effects as far as torch's kernel mutation analysis can tell, so PREFETCH_ASM is registered with
kernels/mutation_analysis.py and reads False while that analysis looks at a kernel (and always, where it could not be
registered). The CPU interpreter has no PTX: callers launch prefetches only on compiled kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dsv3_export.kernels.mutation_analysis import hidden_from_mutation_analysis

PREFETCH_ASM = tl.constexpr(hidden_from_mutation_analysis(globals(), "PREFETCH_ASM"))


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line of each pointer in the block `ptrs`."""
    if PREFETCH_ASM:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs.to(tl.int64)], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def prefetch_l2_bulk(ptr, nbytes):
    """Ask L2 for the `nbytes` bytes from `ptr` on (16-byte aligned, a multiple of 16 bytes) with one
    cp.async.bulk.prefetch (sm_90+), issued by the program's first thread: a contiguous range for one instruction,
    where prefetch_l2 needs one per 128-byte line and thread."""
    if PREFETCH_ASM:
        start = tl.zeros([1], dtype=tl.int64) + ptr.to(tl.int64)
        size = tl.zeros([1], dtype=tl.int32) + nbytes
        tl.inline_asm_elementwise(
            "{ .reg .pred first; mov.u32 $0, %tid.x; setp.eq.u32 first, $0, 0; "
            "@first cp.async.bulk.prefetch.L2.global [$1], $2; }",
            "=r,l,r", [start, size], dtype=tl.int32, is_pure=False, pack=1)
