"""The warp-specialized form of the Gluon fp8 prefill GEMM (fp8_gemm_gluon(warp_specialized=True), the default).

One CTA per SM holds a 1-warp TMA producer and two 4-warp consumer warpgroups, rows 0-63 and 64-127 of each 128 x 128
tile, which never wait for each other: one's promotion runs while the other's wgmma holds the tensor core. The design,
the math and the measurements are in kernels/fp8_gemm_gluon.py's docstring, whose schedule, tile order and wgmma
helpers both forms share; this module holds the partitions and the kernel.

The activation scales travel with the tiles: each stage's TMA loads also bring the tile's 128 scales of its K block
(a [1, 128] box of outer-dim-major a_s), and each consumer reads its 64 from shared memory after the stage's ready
wait, before releasing it. Read instead by the consumers from global memory, row-major a_s put a warp's 8 rows in 8
cache lines, two loads per thread per K block: a third again of the L1 wavefronts the wgmmas' own shared-memory
reads make, which at w2 cost the kernel ~5% of its clock under the H200's power cap (the same cycles as cuBLAS at a
lower clock, session 33); outer-dim-major global loads saved that energy but missed L1 every block (4% more
cycles). Staged, w2 runs 0.94-0.96 of cuBLAS's cycles (session 34). So the kernel takes a_s outer-dim-major with
16-byte aligned rows (scales_for_tma; act_quant(..., outer_scales=True) writes them so), and pad blocks read past
its last row, which TMA fills with zeros: their promotion adds nothing.
"""

from __future__ import annotations

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma_wait

from dsv3_export.kernels.fp8_quant import outer_scale_storage
from dsv3_export.kernels.fp8_gemm_gluon import _EAGER, _mma_block, _schedule, _tile_offsets, _tma_load, _tma_store
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


# The scales' TMA box: one K block's 128 scales of a tile, unswizzled fp32.
SCALE_BLOCK = [1, 128]
SCALE_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def scales_for_tma(a_s: torch.Tensor) -> torch.Tensor:
    """a_s [M, K'] fp32 as the kernel's scale descriptor needs it: outer-dim-major (strides (1, M')) with rows
    starting 16-byte aligned (M' a multiple of 4: fp8_quant.outer_scale_storage). Returned as is when it already
    is; else copied by one small kernel, which cost 3.7% at w2 and 7-12% at wo and wkv_a (session 34):
    act_quant(..., outer_scales=True) writes them so."""
    m, blocks = a_s.shape
    if a_s.stride(0) == 1 and a_s.stride(1) % 4 == 0 and a_s.stride(1) >= m and a_s.data_ptr() % 16 == 0:
        return a_s
    return outer_scale_storage(m, blocks, a_s.device).copy_(a_s)


@gluon.jit
def _ws_producer(a_desc, b_desc, s_desc, a_lo, a_hi, b_bufs, s_bufs, ready, empty, M, N, K):
    """Loads every step's tiles (both 64-row halves of a, b, and the tile's scales of that K block) once the two
    consumers have released its stage. A pad block re-reads the last real block of a and b, and reads scales past
    a_s's last row: zeros."""
    HALF_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks = _schedule(M, N, K, 2 * HALF_M, BLOCK_N, BLOCK_K, 2, 0)
    nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes + s_desc.block_type.nbytes
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
            _tma_load(s_desc, [kb, off_m], bar, s_bufs.index(slot))


@gluon.jit
def _block(a_bufs, b_bufs, s_bufs, ready, step, partial, HALF: gl.constexpr, rows: gl.constexpr):
    """Step `step`'s wgmma issued into `partial`'s registers (_mma_block, which waits for the stage), and this
    consumer's 64 activation scales of its K block read from the stage while the stage is still held."""
    HALF_M: gl.constexpr = a_bufs.shape[1]
    BLOCK_M: gl.constexpr = s_bufs.shape[2]
    partial = _mma_block(a_bufs, b_bufs, ready, step, partial, WS_STAGES)
    scales = s_bufs.index(step % WS_STAGES).reshape([BLOCK_M]).slice(HALF * HALF_M, HALF_M).load(rows)
    return partial, scales


@gluon.jit
def _weight_scale(b_s_row, block, k_blocks):
    """b_s[tile's scale row, block], zero for a pad block."""
    return gl.load(b_s_row + block, mask=block < k_blocks, other=0.0)


@gluon.jit
def _release(empty, step):
    """Stage step's buffers are read: hand them back to the producer. One thread of the warpgroup arrives (count 1),
    after the partition-wide bar.sync Triton puts before every arrive, so all four warps' shared-memory reads of the
    stage (the scales, and the wgmma operands their wait covered) are done (checked in the PTX, triton 3.6 and 3.9)."""
    mbarrier.arrive(empty.index(step % WS_STAGES), count=1)


@gluon.jit
def _ws_pair(a_bufs, b_bufs, s_bufs, ready, empty, step, block, k_blocks, b_s_row, acc, part_a, part_b,
             HALF: gl.constexpr, rows: gl.constexpr):
    """Two K blocks (ring steps step, step + 1; K blocks block, block + 1) after the groups of WS_UNROLL: a tile's K
    blocks are padded to pairs, not to WS_UNROLL (w2's 86 blocks would take 88 at WS_UNROLL 4: 2.3% more wgmma
    work)."""
    part_a, rows_a = _block(a_bufs, b_bufs, s_bufs, ready, step, part_a, HALF, rows)
    part_b, rows_b = _block(a_bufs, b_bufs, s_bufs, ready, step + 1, part_b, HALF, rows)
    w_a = _weight_scale(b_s_row, block, k_blocks)
    w_b = _weight_scale(b_s_row, block + 1, k_blocks)
    part_a = warpgroup_mma_wait(num_outstanding=1, deps=(part_a,))
    _release(empty, step)
    acc += part_a * (rows_a * w_a)[:, None]
    part_b = warpgroup_mma_wait(num_outstanding=0, deps=(part_b,))
    _release(empty, step + 1)
    acc += part_b * (rows_b * w_b)[:, None]
    return acc, part_a, part_b


@gluon.jit
def _ws_consumer(a_bufs, b_bufs, s_bufs, ready, empty, c_desc, c_smem, b_s_ptr, M, N, K, stride_bsn,
                 HALF: gl.constexpr):
    """One warpgroup: rows [HALF * 64, HALF * 64 + 64) of every tile, the promotion overlapping its next wgmma."""
    HALF_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.shape[2]  # the producer's a_desc block: both sides count the same K blocks
    num_warps: gl.constexpr = gl.num_warps()
    INSTR_K: gl.constexpr = 256 // a_bufs.dtype.primitive_bitwidth
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, INSTR_K])
    rows: gl.constexpr = gl.SliceLayout(1, mma_layout)
    # K blocks padded to pairs only: groups of WS_UNROLL, then (WS_UNROLL 4) a last pair on its own (_ws_pair)
    num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks = _schedule(M, N, K, 2 * HALF_M, BLOCK_N, BLOCK_K, 2, 0)
    part_a = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma_layout)
    part_b = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma_layout)
    for local_tile in range(my_tiles):
        off_m, off_n = _tile_offsets(gl.program_id(0) + local_tile * gl.num_programs(0), num_pid_m, num_pid_n,
                                     2 * HALF_M, BLOCK_N, WS_GROUP_M)
        b_s_row = b_s_ptr + (off_n // BLOCK_N) * stride_bsn
        first_step = local_tile * padded_blocks
        acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma_layout)
        for group in range(padded_blocks // WS_UNROLL):
            kb0 = group * WS_UNROLL
            part_a, rows_a = _block(a_bufs, b_bufs, s_bufs, ready, first_step + kb0, part_a, HALF, rows)
            part_b, rows_b = _block(a_bufs, b_bufs, s_bufs, ready, first_step + kb0 + 1, part_b, HALF, rows)
            for pair in gl.static_range(WS_UNROLL // 2):
                kb = kb0 + 2 * pair
                w_a = _weight_scale(b_s_row, kb, k_blocks)
                w_b = _weight_scale(b_s_row, kb + 1, k_blocks)
                part_a = warpgroup_mma_wait(num_outstanding=1, deps=(part_a,))
                _release(empty, first_step + kb)
                acc += part_a * (rows_a * w_a)[:, None]
                if pair < WS_UNROLL // 2 - 1:
                    part_a, rows_a = _block(a_bufs, b_bufs, s_bufs, ready, first_step + kb + 2, acc * 0.0, HALF,
                                            rows)
                    part_b = warpgroup_mma_wait(num_outstanding=1, deps=(part_b,))
                else:
                    part_b = warpgroup_mma_wait(num_outstanding=0, deps=(part_b,))
                _release(empty, first_step + kb + 1)
                acc += part_b * (rows_b * w_b)[:, None]
                if pair < WS_UNROLL // 2 - 1:
                    part_b, rows_b = _block(a_bufs, b_bufs, s_bufs, ready, first_step + kb + 3, acc * 0.0, HALF,
                                            rows)
        if WS_UNROLL > 2:
            if padded_blocks % WS_UNROLL != 0:
                acc, part_a, part_b = _ws_pair(a_bufs, b_bufs, s_bufs, ready, empty, first_step + padded_blocks - 2,
                                               padded_blocks - 2, k_blocks, b_s_row, acc, part_a, part_b, HALF, rows)
        tma.store_wait(pendings=0)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m + HALF * HALF_M, off_n], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _ws_consumer_lo(a_lo, a_hi, b_bufs, s_bufs, ready, empty, c_desc, c_lo, c_hi, b_s_ptr, M, N, K, stride_bsn):
    _ws_consumer(a_lo, b_bufs, s_bufs, ready, empty, c_desc, c_lo, b_s_ptr, M, N, K, stride_bsn, 0)


@gluon.jit
def _ws_consumer_hi(a_lo, a_hi, b_bufs, s_bufs, ready, empty, c_desc, c_lo, c_hi, b_s_ptr, M, N, K, stride_bsn):
    _ws_consumer(a_hi, b_bufs, s_bufs, ready, empty, c_desc, c_hi, b_s_ptr, M, N, K, stride_bsn, 1)


@gluon.jit
def _ws_producer_entry(a_lo, a_hi, b_bufs, s_bufs, ready, empty, c_desc, c_lo, c_hi, b_s_ptr, M, N, K, stride_bsn,
                       a_desc, b_desc, s_desc):
    _ws_producer(a_desc, b_desc, s_desc, a_lo, a_hi, b_bufs, s_bufs, ready, empty, M, N, K)


@eager_only(_EAGER)
@gluon.jit
def _fp8_gemm_gluon_ws_kernel(a_desc, b_desc, c_desc, s_desc, b_s_ptr, M, N, K, stride_bsn,
                              CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """128 x 128 tiles: the default partition (4 warps) and a 4-warp worker take rows 0-63 and 64-127, a 1-warp
    worker issues the TMA loads. a_desc / c_desc have 64-row blocks, s_desc (outer-dim-major a_s) [1, 128]."""
    HALF_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    gl.static_assert(BLOCK_N == BLOCK_K, "a tile must lie in one 128-row block of b_s")
    gl.static_assert(s_desc.block_type.shape[1] == 2 * HALF_M, "one activation scale per row of the tile")
    gl.static_assert(WS_UNROLL == 2 or WS_UNROLL == 4, "the partials alternate in pairs; K padded to pairs leaves at "
                     "most one pair after the groups (_ws_pair)")
    gl.static_assert(WS_STAGES >= 2, "a consumer holds two stages at once")
    a_lo = gl.allocate_shared_memory(a_desc.dtype, [WS_STAGES, HALF_M, BLOCK_K], a_desc.layout)
    a_hi = gl.allocate_shared_memory(a_desc.dtype, [WS_STAGES, HALF_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [WS_STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    s_bufs = gl.allocate_shared_memory(s_desc.dtype, [WS_STAGES, 1, 2 * HALF_M], s_desc.layout)
    c_lo = gl.allocate_shared_memory(c_desc.dtype, [HALF_M, BLOCK_N], c_desc.layout)
    c_hi = gl.allocate_shared_memory(c_desc.dtype, [HALF_M, BLOCK_N], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [WS_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [WS_STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(WS_STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=2)  # one arrival per consumer warpgroup
    args = (a_lo, a_hi, b_bufs, s_bufs, ready, empty, c_desc, c_lo, c_hi, b_s_ptr, M, N, K, stride_bsn)
    gl.warp_specialize([(_ws_consumer_lo, args), (_ws_consumer_hi, args),
                        (_ws_producer_entry, args + (a_desc, b_desc, s_desc))],
                       [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    for stage in gl.static_range(WS_STAGES):
        mbarrier.invalidate(ready.index(stage))
        mbarrier.invalidate(empty.index(stage))
