"""The warp-specialized form of the Gluon fp8 prefill GEMM (fp8_gemm_gluon(warp_specialized=True), the default).

One CTA per SM holds a 1-warp TMA producer and two 4-warp consumer warpgroups, rows 0-63 and 64-127 of each 128 x 128
tile, which never wait for each other: one's promotion runs while the other's wgmma holds the tensor core. The design,
the math and the measurements are in kernels/fp8_gemm_gluon.py's docstring, whose schedule, tile order and wgmma
helpers both forms share; this module holds the partitions and the kernel.
"""

from __future__ import annotations

import os

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma_wait

from dsv3_export.kernels.fp8_gemm_gluon import (_EAGER, _block_scale, _mma_block, _schedule, _tile_offsets, _tma_load,
                                                _tma_store)
from dsv3_export.kernels.pdl import eager_only

# Its partitions' arguments reach them as runtime values (warp_specialize flattens them), so its tile constants are
# module constexprs, not kernel parameters.
# DSV3_GLUON_WS_TILE="stages,unroll,group_m" overrides them at import (benchmarks/fp8_gluon_probe.py's sweep).
def _ws_tile(spec: str) -> list[int]:
    """DSV3_GLUON_WS_TILE's "stages,unroll,group_m", checked: the kernel's static asserts would otherwise name it only
    at the first launch, as a compile error."""
    try:
        stages, unroll, group_m = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"DSV3_GLUON_WS_TILE={spec!r}: expected 'stages,unroll,group_m', e.g. '5,4,8'") from None
    if stages < 2 or unroll not in (2, 4) or group_m < 1:
        raise ValueError(f"DSV3_GLUON_WS_TILE={spec!r}: needs stages >= 2, unroll 2 or 4 (K is padded to pairs, one "
                         f"pair at most after the groups), group_m >= 1")
    return [stages, unroll, group_m]


# 5,4,8 since session 29 (4,2,8 before: 0.93x against 0.985x at w2); 6 stages with an fp32 c do not fit.
_WS_TILE = _ws_tile(os.environ.get("DSV3_GLUON_WS_TILE", "5,4,8"))
WS_STAGES = gl.constexpr(_WS_TILE[0])
WS_UNROLL = gl.constexpr(_WS_TILE[1])
WS_GROUP_M = gl.constexpr(_WS_TILE[2])


@gluon.jit
def _ws_producer(a_desc, b_desc, a_lo, a_hi, b_bufs, ready, empty, M, N, K):
    """Loads every step's tiles (both 64-row halves of a, and b) once the two consumers have released its stage."""
    HALF_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks = _schedule(M, N, K, 2 * HALF_M, BLOCK_N, BLOCK_K, 2, 0)
    nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes
    for local_tile in range(my_tiles):
        off_m, off_n = _tile_offsets(gl.program_id(0) + local_tile * gl.num_programs(0), num_pid_m, num_pid_n,
                                     2 * HALF_M, BLOCK_N, WS_GROUP_M)
        first_step = local_tile * padded_blocks
        for kb in range(padded_blocks):
            step = first_step + kb
            slot = step % WS_STAGES
            # the first pass over the ring waits on the phase before the barrier's first: it returns at once
            mbarrier.wait(empty.index(slot), ((step // WS_STAGES) & 1) ^ 1)
            k_off = gl.minimum(kb, k_blocks - 1) * BLOCK_K
            bar = ready.index(slot)
            mbarrier.expect(bar, nbytes)
            _tma_load(a_desc, [off_m, k_off], bar, a_lo.index(slot))
            _tma_load(a_desc, [off_m + HALF_M, k_off], bar, a_hi.index(slot))
            _tma_load(b_desc, [off_n, k_off], bar, b_bufs.index(slot))


@gluon.jit
def _release(empties, step):
    """Stage step's buffers are read: arrive on its barrier in each ring of `empties` (a tuple: this CTA's producer
    ring; the cluster experiment, benchmarks/fp8_cluster_kernel.py, adds its pair's)."""
    for ring in gl.static_range(len(empties)):
        mbarrier.arrive(empties[ring].index(step % WS_STAGES), count=1)


@gluon.jit
def _ws_pair(a_bufs, b_bufs, ready, empties, step, acc, part_a, part_b, scale_a, scale_b):
    """Two K blocks (ring steps step, step + 1) after the groups of WS_UNROLL: a tile's K blocks are padded to pairs,
    not to WS_UNROLL (w2's 86 blocks would take 88 at WS_UNROLL 4: 2.3% more wgmma work)."""
    part_a = _mma_block(a_bufs, b_bufs, ready, step, part_a, WS_STAGES)
    part_b = _mma_block(a_bufs, b_bufs, ready, step + 1, part_b, WS_STAGES)
    part_a = warpgroup_mma_wait(num_outstanding=1, deps=(part_a,))
    _release(empties, step)
    acc += part_a * scale_a[:, None]
    part_b = warpgroup_mma_wait(num_outstanding=0, deps=(part_b,))
    _release(empties, step + 1)
    acc += part_b * scale_b[:, None]
    return acc, part_a, part_b


@gluon.jit
def _ws_consumer(a_bufs, b_bufs, ready, empties, c_desc, c_smem, a_s_ptr, b_s_ptr, M, N, K, stride_asm, stride_bsn,
                 HALF: gl.constexpr):
    """One warpgroup: rows [HALF * 64, HALF * 64 + 64) of every tile, the promotion overlapping its next wgmma.
    empties: the rings each read stage is released to (_release). c_desc's layout may shard its rows over a
    cluster's CTAs (its cga_layout; empty for one CTA), and the accumulator's layout follows it."""
    HALF_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.shape[2]  # the producer's a_desc block: both sides count the same K blocks
    num_warps: gl.constexpr = gl.num_warps()
    INSTR_K: gl.constexpr = 256 // a_bufs.dtype.primitive_bitwidth
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, INSTR_K],
                                                         cga_layout=c_desc.layout.cga_layout)
    # K blocks padded to pairs only: groups of WS_UNROLL, then (WS_UNROLL 4) a last pair on its own (_ws_pair)
    num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks = _schedule(M, N, K, 2 * HALF_M, BLOCK_N, BLOCK_K, 2, 0)
    part_a = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma_layout)
    part_b = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma_layout)
    for local_tile in range(my_tiles):
        off_m, off_n = _tile_offsets(gl.program_id(0) + local_tile * gl.num_programs(0), num_pid_m, num_pid_n,
                                     2 * HALF_M, BLOCK_N, WS_GROUP_M)
        rows = off_m + HALF * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, mma_layout))
        mask_m = rows < M
        a_s_rows = a_s_ptr + rows * stride_asm
        b_s_row = b_s_ptr + (off_n // BLOCK_N) * stride_bsn
        first_step = local_tile * padded_blocks
        acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma_layout)
        # the scales of each group's first pair are loaded one group ahead (an L2 round trip per load otherwise
        # waits right before its promotion); the last group's are the last pair's (_ws_pair) or, past the last
        # block, zero and unused
        next_a = _block_scale(a_s_rows, mask_m, b_s_row, 0, k_blocks)
        next_b = _block_scale(a_s_rows, mask_m, b_s_row, 1, k_blocks)
        for group in range(padded_blocks // WS_UNROLL):
            kb0 = group * WS_UNROLL
            part_a = _mma_block(a_bufs, b_bufs, ready, first_step + kb0, part_a, WS_STAGES)
            part_b = _mma_block(a_bufs, b_bufs, ready, first_step + kb0 + 1, part_b, WS_STAGES)
            for pair in gl.static_range(WS_UNROLL // 2):
                kb = kb0 + 2 * pair
                if pair == 0:
                    scale_a = next_a
                    scale_b = next_b
                    next_a = _block_scale(a_s_rows, mask_m, b_s_row, kb0 + WS_UNROLL, k_blocks)
                    next_b = _block_scale(a_s_rows, mask_m, b_s_row, kb0 + WS_UNROLL + 1, k_blocks)
                else:
                    scale_a = _block_scale(a_s_rows, mask_m, b_s_row, kb, k_blocks)
                    scale_b = _block_scale(a_s_rows, mask_m, b_s_row, kb + 1, k_blocks)
                part_a = warpgroup_mma_wait(num_outstanding=1, deps=(part_a,))
                _release(empties, first_step + kb)
                acc += part_a * scale_a[:, None]
                if pair < WS_UNROLL // 2 - 1:
                    part_a = _mma_block(a_bufs, b_bufs, ready, first_step + kb + 2, acc * 0.0, WS_STAGES)
                    part_b = warpgroup_mma_wait(num_outstanding=1, deps=(part_b,))
                else:
                    part_b = warpgroup_mma_wait(num_outstanding=0, deps=(part_b,))
                _release(empties, first_step + kb + 1)
                acc += part_b * scale_b[:, None]
                if pair < WS_UNROLL // 2 - 1:
                    part_b = _mma_block(a_bufs, b_bufs, ready, first_step + kb + 3, acc * 0.0, WS_STAGES)
        if WS_UNROLL > 2:
            if padded_blocks % WS_UNROLL != 0:  # its scales were loaded ahead by the last group (or above)
                acc, part_a, part_b = _ws_pair(a_bufs, b_bufs, ready, empties, first_step + padded_blocks - 2, acc,
                                               part_a, part_b, next_a, next_b)
        tma.store_wait(pendings=0)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m + HALF * HALF_M, off_n], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _ws_consumer_lo(a_lo, a_hi, b_bufs, ready, empty, c_desc, c_lo, c_hi, a_s_ptr, b_s_ptr, M, N, K, stride_asm,
                    stride_bsn):
    _ws_consumer(a_lo, b_bufs, ready, (empty,), c_desc, c_lo, a_s_ptr, b_s_ptr, M, N, K, stride_asm, stride_bsn, 0)


@gluon.jit
def _ws_consumer_hi(a_lo, a_hi, b_bufs, ready, empty, c_desc, c_lo, c_hi, a_s_ptr, b_s_ptr, M, N, K, stride_asm,
                    stride_bsn):
    _ws_consumer(a_hi, b_bufs, ready, (empty,), c_desc, c_hi, a_s_ptr, b_s_ptr, M, N, K, stride_asm, stride_bsn, 1)


@gluon.jit
def _ws_producer_entry(a_lo, a_hi, b_bufs, ready, empty, c_desc, c_lo, c_hi, a_s_ptr, b_s_ptr, M, N, K, stride_asm,
                       stride_bsn, a_desc, b_desc):
    _ws_producer(a_desc, b_desc, a_lo, a_hi, b_bufs, ready, empty, M, N, K)


@eager_only(_EAGER)
@gluon.jit
def _fp8_gemm_gluon_ws_kernel(a_desc, b_desc, c_desc, a_s_ptr, b_s_ptr, M, N, K, stride_asm, stride_bsn,
                              CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """128 x 128 tiles: the default partition (4 warps) and a 4-warp worker take rows 0-63 and 64-127, a 1-warp
    worker issues the TMA loads. a_desc / c_desc have 64-row blocks."""
    HALF_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    gl.static_assert(BLOCK_N == BLOCK_K, "a tile must lie in one 128-row block of b_s")
    gl.static_assert(WS_UNROLL == 2 or WS_UNROLL == 4, "the partials alternate in pairs; K padded to pairs leaves at "
                     "most one pair after the groups (_ws_pair)")
    gl.static_assert(WS_STAGES >= 2, "a consumer holds two stages at once")
    a_lo = gl.allocate_shared_memory(a_desc.dtype, [WS_STAGES, HALF_M, BLOCK_K], a_desc.layout)
    a_hi = gl.allocate_shared_memory(a_desc.dtype, [WS_STAGES, HALF_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [WS_STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_lo = gl.allocate_shared_memory(c_desc.dtype, [HALF_M, BLOCK_N], c_desc.layout)
    c_hi = gl.allocate_shared_memory(c_desc.dtype, [HALF_M, BLOCK_N], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [WS_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [WS_STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(WS_STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=2)  # one arrival per consumer warpgroup
    args = (a_lo, a_hi, b_bufs, ready, empty, c_desc, c_lo, c_hi, a_s_ptr, b_s_ptr, M, N, K, stride_asm, stride_bsn)
    gl.warp_specialize([(_ws_consumer_lo, args), (_ws_consumer_hi, args),
                        (_ws_producer_entry, args + (a_desc, b_desc))],
                       [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    for stage in gl.static_range(WS_STAGES):
        mbarrier.invalidate(ready.index(stage))
        mbarrier.invalidate(empty.index(stage))
