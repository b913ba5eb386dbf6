"""FP8 blockwise GEMM for Hopper prefill in Gluon: each K block's promotion overlaps a wgmma.

A variant of fp8_gemm (fp8_gemm(..., variant="gluon")) with the same layouts and math:
  a fp8 e4m3fn [M, K], a_s fp32 [M, ceil(K/128)]; b fp8 e4m3fn [N, K], b_s fp32 [ceil(N/128), ceil(K/128)]
  c [M, N] bf16 / fp16 / fp32. Each 128-wide K block's wgmma partial starts from zero and is promoted into the fp32
  accumulator as partial * a_s[m, kb] * b_s[n // 128, kb] (never accumulated across K blocks in the tensor core).

Why Gluon (Triton's lower-level dialect, same compiler): in the Triton kernels (kernels/fp8_gemm_persistent.py) a
dot whose fp32 partial is read in the same step is never left in flight, so the tensor core idles through every
step's wait and promotion, and only another CTA on the SM fills the gap (0.77x / 0.62x of blockwise
torch._scaled_mm at the 16b prefill shapes on the H200). Triton's automatic warp specialization, the usual way out,
gave wrong results there (triton 3.6). Gluon states the asynchrony and the partitions itself.

Two forms, both persistent (grid = SMs x CTAs per SM; program p takes tiles p, p + P, ... in GROUP_M order), both
with 128-wide K blocks in a ring of STAGES TMA buffers ordered by mbarriers:
- warp-specialized (the default; kernels/fp8_gemm_gluon_ws.py): 128 x 128 tiles, one CTA per SM holding a 1-warp TMA
  producer and two 4-warp consumer partitions, rows 0-63 and 64-127 of each tile. The producer refills a stage once
  both consumers have arrived on its `empty` barrier; the consumers never wait for each other, so one's promotion
  runs while the other's wgmma holds the tensor core (setmaxnreg: 232 registers per consumer thread, 40 for the
  producer). 5 stages, the K loop unrolled by 4 blocks, a tile's K blocks padded to pairs only (a last pair on its
  own, _ws_pair). Each stage also brings the tile's activation scales of its K block by TMA (outer-dim-major a_s;
  the consumers read them from shared memory). H200, session 34, from CUDA graphs alternating with blockwise
  _scaled_mm: 1.025-1.04x / 0.995-1.02x at w1/w3 / w2 (M=4096), 1.05x / 1.03x at wq+wkv_a / wo; 1.00x / 0.985x in
  session 29, when the consumers loaded row-major scales from global memory.
- single partition (_fp8_gemm_gluon_kernel, warp_specialized=False): all warps compute, the loads are issued from
  the same code (Gluon puts a CTA-wide barrier around each TMA issue, so two warpgroups run in lockstep). 0.90x /
  0.82x with 128 x 128 tiles on two warpgroups; 64 x 128 on one warpgroup, two CTAs per SM: 0.84x / 0.67x.
Inside a consumer, block kb + 1's wgmma is issued before block kb's is waited for (warpgroup_mma_wait(1)), so block
kb's promotion FFMAs run while the tensor core works; the two partials alternate between two register sets, the K
loop unrolled by UNROLL blocks. What ptxas needs for that (sm_90 SASS, checked by tests/kernels/test_fp8_gemm_gluon.py):
- No wgmma in flight across the loop's back edge: otherwise every wgmma is serialized (ptxas C7514, "non wgmma
  instructions reading accumulator registers"), so each iteration ends with a wait(0) and one promotion not
  overlapped. UNROLL = 4 overlaps three of four; the single-partition form needs 253-255 registers for it (slower at
  K = 10944); the warp-specialized consumer fits it in 232 (session 28's 0.40x asked for 248 per consumer, which
  two consumers and the producer cannot hold: 2 x 128 x 248 + 128 x 40 > 65536 registers).
- A wgmma issued mid-iteration takes `acc * 0.0` as its (ignored, use_acc=False) input: that orders it after the
  FFMAs that read the old partial, so the new partial takes the old one's registers with no copies of registers
  still being written (254 -> 178 registers). At an iteration's start the old partial was promoted in the previous
  iteration, so the warp-specialized consumer passes it as is (64 FMULs fewer per iteration: w2 0.1587 against
  0.1600-0.1608 ms, session 28 call 15).
The next tile's offsets are computed once per tile: computed per load (integer divisions by runtime values, twice
per block) the single-partition kernel was 20% slower at w1/w3. The promotion is what is left to pay:
benchmarks/fp8_gluon_probe.py runs the same data path with one chained accumulator and no scales at 1.10x / 1.04x.
K blocks are padded to whole iterations (the warp-specialized form: to pairs) with re-reads of the last block whose
scale is zero. M, N and K edges are zero-filled by TMA; c is clipped at M and N by the TMA store. TMA needs 16-byte
aligned bases and rows (K % 16 == 0, N * itemsize % 16 == 0).
Tried on the H200 and not kept (benchmarks/RESULTS.md): stream-K for the last, partial wave (w2 is 512 tiles on 132
SMs; slower), 6 stages (as 5), ptxas 12.9's interleaved FFMA yield bits (no change; session 29); 2-CTA clusters
sharing b by TMA multicast, as cuBLAS's kernel here (triton 3.9: a higher clock, more cycles; session 33);
outer-dim-major scales read by the consumers from global memory (an L1 miss every block; session 34).

No CPU interpreter runs Gluon: CI compiles both forms for sm_90 (tests/kernels/test_fp8_gemm_gluon.py), and the
numerical checks run on the GPU (that test on a Hopper machine; benchmarks/kernels.py sections fp8_prefill and fp8
against fp8_gemm_ref). It is eager-only (host-side tensor descriptors): the exported packages keep variant "default".
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from dsv3_export.kernels._common import QUANT_BLOCK, cdiv, num_sms, tracing
from dsv3_export.kernels.fp8_gemm_persistent import tma_unsupported
from dsv3_export.kernels.pdl import eager_only

_EAGER = "eager-only: host-side TMA descriptors, refused while tracing (fp8_gemm_gluon)"

BLOCK_M = 128
BLOCK_N = 128  # one 128-row block of b_s per tile: one weight scale per K block
STAGES = 4
GROUP_M = 8
UNROLL = 2  # K blocks per loop iteration: all but the last one's promotion overlap the next block's wgmma
# TMA copies: triton 3.6 (the H200's) names them async_copy_global_to_shared / async_copy_shared_to_global, later
# releases (3.9 here, for the sm_90 compile test) async_load / async_store, same arguments.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@gluon.jit
def _tile_offsets(tile, num_pid_m, num_pid_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """(row, column) of output tile `tile`, the tiles grouped along M for L2 reuse of b (as the Triton kernels)."""
    group_size = GROUP_M * num_pid_n
    first_m = (tile // group_size) * GROUP_M
    group_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group_size) % group_m
    pid_n = (tile % group_size) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _schedule(M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, UNROLL: gl.constexpr,
              MIN_BLOCKS: gl.constexpr):
    """This program's share of the persistent schedule, computed alike wherever a kernel's partitions must agree:
    (num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks). Program p takes tiles p, p + P, ... (P programs); each
    tile's K blocks are padded to whole loop iterations of UNROLL blocks (the warp-specialized partitions pass 2: to
    pairs), and to at least MIN_BLOCKS."""
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    my_tiles = gl.cdiv(num_pid_m * num_pid_n - gl.program_id(0), gl.num_programs(0))
    k_blocks = gl.cdiv(K, BLOCK_K)
    if MIN_BLOCKS > 0:
        padded_blocks = gl.maximum(gl.cdiv(k_blocks, UNROLL), gl.cdiv(MIN_BLOCKS, UNROLL)) * UNROLL
    else:
        padded_blocks = gl.cdiv(k_blocks, UNROLL) * UNROLL
    return num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks


@gluon.jit
def _load_block(a_desc, b_desc, a_bufs, b_bufs, ready, step, total_steps, kb, off_m, off_n, k_blocks,
                STAGES: gl.constexpr):
    """TMA of this program's `step`-th K block (K block kb of the tile at off_m, off_n) into stage step % STAGES;
    past the program's last step nothing is issued. A pad block (kb >= k_blocks) re-reads the last real block: its
    scale is zero."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    stage = step % STAGES
    bar = ready.index(stage)
    issue = step < total_steps
    k_off = gl.minimum(kb, k_blocks - 1) * BLOCK_K
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=issue)
    _tma_load(a_desc, [off_m, k_off], bar, a_bufs.index(stage), pred=issue)
    _tma_load(b_desc, [off_n, k_off], bar, b_bufs.index(stage), pred=issue)


@gluon.jit
def _start(a_desc, b_desc, c_desc, M, N, K, UNROLL: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """The single-partition kernels' start: their schedule (_schedule, each tile's K blocks padded to at least STAGES:
    the loads run at most one tile ahead), their shared memory (STAGES a and b tiles, the epilogue's c tile, one
    initialized mbarrier per stage) and the loads of the first STAGES steps. Returns (num_pid_m, num_pid_n, my_tiles,
    k_blocks, padded_blocks, total_steps, a_bufs, b_bufs, c_smem, ready, off_m, off_n), off_* the first tile's."""
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks = _schedule(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, UNROLL,
                                                                        STAGES)
    total_steps = my_tiles * padded_blocks
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [BLOCK_M, BLOCK_N], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
    off_m, off_n = _tile_offsets(gl.program_id(0), num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
    for stage in gl.static_range(STAGES):
        _load_block(a_desc, b_desc, a_bufs, b_bufs, ready, stage, total_steps, stage, off_m, off_n, k_blocks, STAGES)
    return (num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks, total_steps, a_bufs, b_bufs, c_smem, ready,
            off_m, off_n)


@gluon.jit
def _load_ahead(a_desc, b_desc, a_bufs, b_bufs, ready, first_step, total_steps, kb, padded_blocks, k_blocks, off_m,
                off_n, next_m, next_n, STAGES: gl.constexpr):
    """The load STAGES blocks ahead of block kb of this tile: in this tile, or (past its padded K blocks) in the next
    one, which padded_blocks >= STAGES makes the furthest it can reach. No division: the next tile's offsets come
    from the caller."""
    ahead = kb + STAGES
    wrap = ahead >= padded_blocks
    _load_block(a_desc, b_desc, a_bufs, b_bufs, ready, first_step + ahead, total_steps,
                gl.where(wrap, ahead - padded_blocks, ahead), gl.where(wrap, next_m, off_m),
                gl.where(wrap, next_n, off_n), k_blocks, STAGES)


@gluon.jit
def _mma_block(a_bufs, b_bufs, ready, step, partial, STAGES: gl.constexpr):
    """Wait for step `step`'s tiles, then issue its wgmma asynchronously into `partial`'s registers (from zero)."""
    stage = step % STAGES
    mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(stage), b_bufs.index(stage).permute((1, 0)), partial, use_acc=False,
                         is_async=True)


@gluon.jit
def _block_scale(a_s_rows, stride_ask, mask_m, b_s_row, block, k_blocks):
    """a_s[rows, block] * b_s[tile's scale row, block]: [BLOCK_M] fp32, zero for the pad block. a_s is read through
    both its strides: row-major, or outer-dim-major (strides (1, M), as cuBLAS's blockwise mode takes it), where a
    warp's rows of one K block lie in one 32-byte sector instead of eight lines."""
    real = block < k_blocks
    return (gl.load(a_s_rows + block * stride_ask, mask=mask_m & real, other=0.0)
            * gl.load(b_s_row + block, mask=real, other=0.0))


@eager_only(_EAGER)
@gluon.jit
def _fp8_gemm_gluon_kernel(a_desc, b_desc, c_desc, a_s_ptr, b_s_ptr, M, N, K, stride_asm, stride_ask, stride_bsn,
                           GROUP_M: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
                           num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    gl.static_assert(BLOCK_N == BLOCK_K, "a tile must lie in one 128-row block of b_s")
    gl.static_assert(STAGES >= 3, "blocks kb and kb + 1 are read while kb + 2 loads")
    gl.static_assert(UNROLL >= 2 and UNROLL % 2 == 0, "the partials alternate in pairs")

    # Persistent (_schedule); the program's K blocks form one sequence of `steps` (stage step % STAGES, mbarrier
    # phase (step // STAGES) & 1), each tile's padded to at least STAGES (the loads run at most one tile ahead).
    (num_pid_m, num_pid_n, my_tiles, k_blocks, padded_blocks, total_steps, a_bufs, b_bufs, c_smem, ready, off_m,
     off_n) = _start(a_desc, b_desc, c_desc, M, N, K, UNROLL, STAGES, GROUP_M)
    INSTR_K: gl.constexpr = 256 // a_desc.dtype.primitive_bitwidth  # 32 for fp8
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, INSTR_K])

    part_b = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
    for local_tile in range(my_tiles):
        # the next tile's offsets (clamped past this program's last tile, whose loads are not issued)
        next_tile = gl.minimum(gl.program_id(0) + (local_tile + 1) * gl.num_programs(0), num_pid_m * num_pid_n - 1)
        next_m, next_n = _tile_offsets(next_tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        mask_m = rows < M
        a_s_rows = a_s_ptr + rows * stride_asm
        b_s_row = b_s_ptr + (off_n // BLOCK_N) * stride_bsn
        first_step = local_tile * padded_blocks
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        for group in range(padded_blocks // UNROLL):
            # UNROLL blocks, the partials alternating between part_a (even blocks) and part_b (odd): each partial
            # is promoted after a wait that leaves the next block's wgmma in flight, except the group's last one
            # (wait 0): no wgmma is in flight across the loop's back edge, where ptxas would serialize every wgmma
            # (C7514: registers of an in-flight wgmma read by the promotion).
            kb0 = group * UNROLL
            part_a = _mma_block(a_bufs, b_bufs, ready, first_step + kb0, acc * 0.0, STAGES)
            part_b = _mma_block(a_bufs, b_bufs, ready, first_step + kb0 + 1, part_b, STAGES)
            for pair in gl.static_range(UNROLL // 2):
                kb = kb0 + 2 * pair
                scale_a = _block_scale(a_s_rows, stride_ask, mask_m, b_s_row, kb, k_blocks)
                scale_b = _block_scale(a_s_rows, stride_ask, mask_m, b_s_row, kb + 1, k_blocks)
                part_a = warpgroup_mma_wait(num_outstanding=1, deps=(part_a,))  # block kb done, kb + 1 in flight
                _load_ahead(a_desc, b_desc, a_bufs, b_bufs, ready, first_step, total_steps, kb, padded_blocks,
                            k_blocks, off_m, off_n, next_m, next_n, STAGES)
                # acc * 0.0 below is the next wgmma's (ignored) input: it orders that wgmma after these FFMAs, so
                # the old partial is dead when the new one takes its registers (no register copies)
                acc += part_a * scale_a[:, None]
                if pair < UNROLL // 2 - 1:
                    part_a = _mma_block(a_bufs, b_bufs, ready, first_step + kb + 2, acc * 0.0, STAGES)
                    part_b = warpgroup_mma_wait(num_outstanding=1, deps=(part_b,))  # kb + 2 in flight
                else:
                    part_b = warpgroup_mma_wait(num_outstanding=0, deps=(part_b,))
                _load_ahead(a_desc, b_desc, a_bufs, b_bufs, ready, first_step, total_steps, kb + 1, padded_blocks,
                            k_blocks, off_m, off_n, next_m, next_n, STAGES)
                acc += part_b * scale_b[:, None]
                if pair < UNROLL // 2 - 1:
                    part_b = _mma_block(a_bufs, b_bufs, ready, first_step + kb + 3, acc * 0.0, STAGES)
        # the epilogue: the previous tile's TMA store has read c_smem by now (waited here, not right after it)
        tma.store_wait(pendings=0)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m, off_n], c_smem)  # clipped at M and N
        off_m = next_m
        off_n = next_n
    tma.store_wait(pendings=0)
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(stage))


def gluon_unsupported(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    """Why this kernel cannot take these operands, or None: a Hopper GPU, fp8 a, an output dtype it stores, and
    what TMA needs (fp8_gemm_persistent.tma_unsupported, the Triton TMA kernel's same rule)."""
    if a.device.type != "cuda" or torch.cuda.get_device_capability(a.device)[0] != 9:
        return f"needs a Hopper (sm_90) GPU; a is on {a.device}"
    if a.dtype != torch.float8_e4m3fn:
        return f"needs fp8 a (W8A8); got {a.dtype}"
    if out_dtype not in _GL_DTYPES:
        return f"out_dtype {out_dtype} not supported; expected one of {tuple(_GL_DTYPES)}"
    for name, t in (("a", a), ("b", b)):
        if t.stride(1) != 1:
            return f"{name} needs a unit last stride for TMA; got strides {t.stride()}"
    return tma_unsupported(a, b, out_dtype, b.shape[0])


@functools.lru_cache(maxsize=None)
def _shared_layout(block: tuple[int, ...], dtype) -> object:
    """The TMA tile's swizzled shared layout, built once per (block, dtype): get_default_for costs ~13 us of Python per
    call on the H200's host, three per launch (whose eager timing was host-bound without it; session 29)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def _descriptor(t: torch.Tensor, block: list[int], dtype) -> object:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block, _shared_layout(tuple(block), dtype))


def fp8_gemm_gluon(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, *, warp_specialized: bool = True,
                   ws_consumer_regs: int = 232, block_m: int = BLOCK_M, unroll: int = UNROLL, stages: int = STAGES,
                   group_m: int = GROUP_M, ctas_per_sm: int | None = None,
                   programs: int | None = None) -> torch.Tensor:
    """Launch on operands fp8_gemm has already checked (shapes, dtypes). warp_specialized (the default): the
    producer / two-consumer form, 128 x 128 tiles with fp8_gemm_gluon_ws's WS_* constants, ws_consumer_regs registers
    per consumer thread; it reads a_s through TMA, outer-dim-major (fp8_gemm_gluon_ws.scales_for_tma: row-major a_s
    is copied so first). Else the single-partition form, which reads a_s of any strides and alone takes block_m 128
    (two warpgroups, one CTA per SM by default) or 64 (one warpgroup, two), unroll, stages, group_m and ctas_per_sm.
    programs caps the persistent grid (tests: several tiles per program on small shapes)."""
    if block_m not in (64, 128) or unroll < 2 or unroll % 2 or stages < 3:
        raise ValueError(f"fp8_gemm_gluon: block_m must be 64 or 128, unroll even and >= 2, stages >= 3; got "
                         f"block_m={block_m}, unroll={unroll}, stages={stages}")
    if warp_specialized and (block_m, unroll, stages, group_m, ctas_per_sm) != (BLOCK_M, UNROLL, STAGES, GROUP_M, None):
        raise ValueError("fp8_gemm_gluon: block_m / unroll / stages / group_m / ctas_per_sm are the single-partition "
                         "form's (warp_specialized=False); the warp-specialized form's are WS_* (DSV3_GLUON_WS_TILE)")
    if tracing():
        raise NotImplementedError("fp8_gemm(variant='gluon') is eager-only (host-side TMA descriptors); "
                                  "trace variant='default'")
    reason = gluon_unsupported(a, b, out_dtype)
    if reason:
        raise ValueError(f"fp8_gemm(variant='gluon'): {reason}")
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    b_desc = _descriptor(b, [BLOCK_N, QUANT_BLOCK], gl.float8e4nv)
    if warp_specialized:  # 128 x 128 tiles, one CTA per SM, a and c in 64-row halves (one per consumer)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        from dsv3_export.kernels import fp8_gemm_gluon_ws as W  # imports this module's helpers

        a_desc = _descriptor(a, [64, QUANT_BLOCK], gl.float8e4nv)
        c_desc = _descriptor(c, [64, BLOCK_N], _GL_DTYPES[out_dtype])
        s_desc = TensorDescriptor.from_tensor(W.scales_for_tma(a_s).t(), W.SCALE_BLOCK, W.SCALE_LAYOUT)
        tiles = cdiv(m, 128) * cdiv(n, BLOCK_N)
        grid = (min(tiles, num_sms(a.device), programs or tiles),)
        W._fp8_gemm_gluon_ws_kernel[grid](a_desc, b_desc, c_desc, s_desc, b_s, m, n, k, b_s.stride(0),
                                          CONSUMER_REGS=ws_consumer_regs, PRODUCER_REGS=40, num_warps=4)
        return c
    a_desc = _descriptor(a, [block_m, QUANT_BLOCK], gl.float8e4nv)
    c_desc = _descriptor(c, [block_m, BLOCK_N], _GL_DTYPES[out_dtype])
    tiles = cdiv(m, block_m) * cdiv(n, BLOCK_N)
    grid = (min(tiles, num_sms(a.device) * (ctas_per_sm or (2 if block_m == 64 else 1)), programs or tiles),)
    _fp8_gemm_gluon_kernel[grid](a_desc, b_desc, c_desc, a_s, b_s, m, n, k, *a_s.stride(), b_s.stride(0),
                                 GROUP_M=group_m, STAGES=stages, UNROLL=unroll, num_warps=block_m // 16)
    return c
