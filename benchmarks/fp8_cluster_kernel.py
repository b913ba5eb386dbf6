"""An experimental fp8 prefill GEMM on 2-CTA clusters that share the weight tile by TMA multicast (triton >= 3.9).

Not a product kernel: benchmarks/fp8_cluster_probe.py measures it against the warp-specialized kernel it extends
(kernels/fp8_gemm_gluon_ws.py) and blockwise torch._scaled_mm: no faster than the former at w2 and slower at the
other 16b prefill shapes (session 33, benchmarks/RESULTS.md). Kept as the probe's subject: it answers "is cuBLAS's
TMA multicast what the Gluon kernel lacks at w2?" (no), and it is where to start if a later triton makes clusters
cheaper. Its consumers are the warp-specialized kernel's own (_ws_consumer, releasing to two rings).

Why it was tried: at w2 (M=4096, N=2048, K=10944) the warp-specialized kernel reads 0.95-1.00x of blockwise
torch._scaled_mm, whose cuBLAS kernel runs the same 128 x 128 cooperative tile on 2-CTA clusters whose weight loads
are multicast (session 29). Per K block each CTA reads 16 KB of a and 16 KB of b from L2; with a pair sharing b, the
pair reads 48 KB instead of 64 KB. Triton 3.6 (the H200 image's) cannot build it: its TMA lowering stops at "NYI:
Support multicast"; triton 3.9's Gluon has multi-CTA layouts and `tma.async_load(..., multicast=True)`.

The schedule is the warp-specialized kernel's with one cluster where it had one CTA: a program is a cluster of two
CTAs (gl.program_id counts clusters), which takes 256 x 128 tiles. Layouts are written for the cluster and sharded by
their cga_layout: a's and c's 128-row descriptor blocks split [[1, 0]] (CTA r holds rows r * 64 ... r * 64 + 63 of
each), b's block is broadcast [[0, 0]] (both CTAs hold all of it). So CTA r's two consumers take rows
off_m + r * 64 + [0, 64) and off_m + 128 + r * 64 + [0, 64) of the tile, the a_s rows their arange gives them.
- `ready[s]` (one per CTA): the CTA's own a halves and the multicast b, 32 KB per CTA.
- `empty[s]` (one per CTA, 2 arrivals): this CTA's consumers are done with stage s, so its a halves may be reloaded.
- `pair_empty[s]` (one per pair, on the lead CTA, 2 x 2 arrivals): both CTAs' consumers are done with stage s; only
  the lead CTA waits on it, and only the lead issues b's multicast load (triton's lowering predicates it on CTA
  rank 0), which writes both CTAs' stage s.
The compiler orders the barriers' initialization before any cross-CTA use (a cluster barrier after the inits), and a
cluster barrier before exit keeps the lead's shared memory alive for its peer's last arrivals.
Eager-only (host-side descriptors). tests/benchmarks/test_fp8_cluster_kernel.py compiles it for sm_90.
"""

from __future__ import annotations

import functools
import inspect

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from dsv3_export.kernels._common import QUANT_BLOCK, cdiv, num_sms, tracing
from dsv3_export.kernels.fp8_gemm_gluon import (_GL_DTYPES, BLOCK_N, _schedule, _tile_offsets, _tma_load,
                                                gluon_unsupported)
from dsv3_export.kernels.fp8_gemm_gluon_ws import WS_GROUP_M, WS_STAGES, WS_UNROLL, _ws_consumer

CLUSTER_CTAS = 2
# the descriptors' cga layouts: a and c split their 128-row blocks over the two CTAs, b is broadcast to both
A_CGA = [[1, 0]]
B_CGA = [[0, 0]]
C_CGA = [[1, 0]]


def cluster_unsupported() -> str | None:
    """Why this triton cannot build the cluster kernel, or None."""
    import triton

    if "multicast" not in inspect.signature(_tma_load).parameters:
        return f"needs triton >= 3.9 (TMA multicast in Gluon); this is triton {triton.__version__}"
    return None


@gluon.jit
def _mc_producer(a_desc, b_desc, a_lo, a_hi, b_bufs, ready, empty, pair_empty, M, N, K):
    """Each CTA loads its halves of a; the lead CTA, once both CTAs released the stage, multicasts b to both."""
    HALF_M: gl.constexpr = a_desc.block_type.shape[0]  # cluster rows of one a block: 64 per CTA
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks = _schedule(M, N, K, 2 * HALF_M, BLOCK_N, BLOCK_K, 2, 0)
    nbytes: gl.constexpr = 2 * a_desc.nbytes_per_cta + b_desc.nbytes_per_cta
    for local_tile in range(my_tiles):
        off_m, off_n = _tile_offsets(gl.program_id(0) + local_tile * gl.num_programs(0), num_pid_m, num_pid_n,
                                     2 * HALF_M, BLOCK_N, WS_GROUP_M)
        first_step = local_tile * padded_blocks
        for kb in range(padded_blocks):
            step = first_step + kb
            slot = step % WS_STAGES
            phase = ((step // WS_STAGES) & 1) ^ 1  # the ring's first pass returns at once
            mbarrier.wait(empty.index(slot), phase)
            mbarrier.wait(pair_empty.index(slot), phase)  # the lead CTA only
            k_off = gl.minimum(kb, k_blocks - 1) * BLOCK_K
            bar = ready.index(slot)
            mbarrier.expect(bar, nbytes)
            _tma_load(a_desc, [off_m, k_off], bar, a_lo.index(slot))
            _tma_load(a_desc, [off_m + HALF_M, k_off], bar, a_hi.index(slot))
            _tma_load(b_desc, [off_n, k_off], bar, b_bufs.index(slot), multicast=True)


@gluon.jit
def _mc_consumer_lo(a_lo, a_hi, b_bufs, ready, empty, pair_empty, c_desc, c_lo, c_hi, a_s_ptr, b_s_ptr, M, N, K,
                    stride_asm, stride_bsn):
    """The warp-specialized consumer on the cluster's layouts (its accumulator follows c_desc's cga split), each
    read stage released to its CTA's producer ring and to the lead's pair ring."""
    _ws_consumer(a_lo, b_bufs, ready, (empty, pair_empty), c_desc, c_lo, a_s_ptr, b_s_ptr, M, N, K, stride_asm,
                 stride_bsn, 0)


@gluon.jit
def _mc_consumer_hi(a_lo, a_hi, b_bufs, ready, empty, pair_empty, c_desc, c_lo, c_hi, a_s_ptr, b_s_ptr, M, N, K,
                    stride_asm, stride_bsn):
    _ws_consumer(a_hi, b_bufs, ready, (empty, pair_empty), c_desc, c_hi, a_s_ptr, b_s_ptr, M, N, K, stride_asm,
                 stride_bsn, 1)


@gluon.jit
def _mc_producer_entry(a_lo, a_hi, b_bufs, ready, empty, pair_empty, c_desc, c_lo, c_hi, a_s_ptr, b_s_ptr, M, N, K,
                       stride_asm, stride_bsn, a_desc, b_desc):
    _mc_producer(a_desc, b_desc, a_lo, a_hi, b_bufs, ready, empty, pair_empty, M, N, K)


@gluon.jit
def _fp8_gemm_gluon_cluster_kernel(a_desc, b_desc, c_desc, a_s_ptr, b_s_ptr, M, N, K, stride_asm,
                                   stride_bsn, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                   num_warps: gl.constexpr):
    HALF_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    gl.static_assert(gl.num_ctas() == 2, "launch with num_ctas=2")
    gl.static_assert(BLOCK_N == BLOCK_K, "a tile must lie in one 128-row block of b_s")
    gl.static_assert(WS_UNROLL == 2 or WS_UNROLL == 4, "as the warp-specialized kernel")
    a_lo = gl.allocate_shared_memory(a_desc.dtype, [WS_STAGES, HALF_M, BLOCK_K], a_desc.layout)
    a_hi = gl.allocate_shared_memory(a_desc.dtype, [WS_STAGES, HALF_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [WS_STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_lo = gl.allocate_shared_memory(c_desc.dtype, [HALF_M, BLOCK_N], c_desc.layout)
    c_hi = gl.allocate_shared_memory(c_desc.dtype, [HALF_M, BLOCK_N], c_desc.layout)
    ready = mbarrier.allocate_mbarrier(batch=WS_STAGES)
    empty = mbarrier.allocate_mbarrier(batch=WS_STAGES)
    pair_empty = mbarrier.allocate_mbarrier(batch=WS_STAGES, two_ctas=True)
    for stage in gl.static_range(WS_STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=2)  # this CTA's two consumer warpgroups
        mbarrier.init(pair_empty.index(stage), count=2)  # times the pair's two CTAs, on the lead
    args = (a_lo, a_hi, b_bufs, ready, empty, pair_empty, c_desc, c_lo, c_hi, a_s_ptr, b_s_ptr, M, N, K, stride_asm,
            stride_bsn)
    gl.warp_specialize([(_mc_consumer_lo, args), (_mc_consumer_hi, args),
                        (_mc_producer_entry, args + (a_desc, b_desc))],
                       [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    gl.barrier(cluster=True)  # the peer's last arrivals on the lead's pair_empty are in before either CTA exits


@functools.lru_cache(maxsize=None)
def _cluster_layout(block: tuple[int, ...], dtype, cga: tuple[tuple[int, ...], ...]) -> object:
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype, cga_layout=[list(b) for b in cga])


def _cluster_descriptor(t: torch.Tensor, block: list[int], dtype, cga: list[list[int]]) -> object:
    """A host-side descriptor of the cluster's block: the CTAs' boxes are its shards (cga)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block, _cluster_layout(tuple(block), dtype, tuple(map(tuple, cga))))


def fp8_gemm_gluon_cluster(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                           out_dtype: torch.dtype = torch.bfloat16, *, consumer_regs: int = 232,
                           programs: int | None = None) -> torch.Tensor:
    """c = (a, a_s) @ (b, b_s)^T on 2-CTA clusters (256 x 128 tiles, b multicast), operands as fp8_gemm_gluon's.
    programs caps the persistent grid in clusters (tests: several tiles per cluster on small shapes)."""
    reason = cluster_unsupported() or gluon_unsupported(a, b, out_dtype)
    if reason:
        raise ValueError(f"fp8_gemm_gluon_cluster: {reason}")
    if tracing():
        raise NotImplementedError("fp8_gemm_gluon_cluster is eager-only (host-side TMA descriptors)")
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_desc = _cluster_descriptor(a, [128, QUANT_BLOCK], gl.float8e4nv, A_CGA)
    b_desc = _cluster_descriptor(b, [BLOCK_N, QUANT_BLOCK], gl.float8e4nv, B_CGA)
    c_desc = _cluster_descriptor(c, [128, BLOCK_N], _GL_DTYPES[out_dtype], C_CGA)
    tiles = cdiv(m, 2 * 128) * cdiv(n, BLOCK_N)
    grid = (min(tiles, num_sms(a.device) // CLUSTER_CTAS, programs or tiles),)
    _fp8_gemm_gluon_cluster_kernel[grid](a_desc, b_desc, c_desc, a_s, b_s, m, n, k, a_s.stride(0), b_s.stride(0),
                                         CONSUMER_REGS=consumer_regs, PRODUCER_REGS=40, num_warps=4,
                                         num_ctas=CLUSTER_CTAS)
    return c
