"""mla_decode / mla_prefill vs the einsum math of MLA.attend_absorb (fp32)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv3_export.kernels import mla_attention as A  # noqa: E402
from dsv3_export.kernels import mla_decode as D  # noqa: E402
from dsv3_export.kernels import mla_decode_kernels as K  # noqa: E402
from dsv3_export.kernels import mla_prefill as P  # noqa: E402
from dsv3_export.kernels import mla_splits  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402

H, C, R, S = 5, 64, 16, 100  # H not a power of 2; the real model has C=512, R=64, H=16
SCALE = 0.173


def _caches(bmax: int, dtype):
    return torch.randn(bmax, S, C, dtype=dtype), torch.randn(bmax, S, R, dtype=dtype)


def _check(out, ref, dtype):
    assert_finite("mla", out)
    if dtype == torch.float32:
        assert (out - ref).abs().max().item() < TOL["mla_fp32_abs"]
    else:
        assert mean_rel(out, ref) < TOL["mla_bf16_mean_rel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 7])
def test_mla_decode_ragged(seed, dtype, num_splits):
    torch.manual_seed(seed)
    kv, pe = _caches(4, dtype)  # one more cache row than the batch
    q, qp = torch.randn(3, H, C, dtype=dtype), torch.randn(3, H, R, dtype=dtype)
    seqlens = torch.tensor([1, 37, S], dtype=torch.int32)
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, num_splits=num_splits)
    assert out.shape == (3, H, C) and out.dtype == dtype
    _check(out, A.mla_decode_ref(q, qp, kv, pe, seqlens, SCALE), dtype)


def test_mla_decode_empty_sequence_gives_zeros():
    kv, pe = _caches(2, torch.float32)
    q, qp = torch.randn(2, H, C), torch.randn(2, H, R)
    out = D.mla_decode(q, qp, kv, pe, torch.tensor([0, 5], dtype=torch.int32), SCALE, num_splits=4)
    assert_finite("mla_decode", out)
    assert (out[0] == 0).all()
    assert (out[1] - A.mla_decode_ref(q[1:], qp[1:], kv[1:], pe[1:], torch.tensor([5], dtype=torch.int32),
                                      SCALE)[0]).abs().max() < TOL["mla_fp32_abs"]


# The interpreter ignores num_warps / num_stages and skips the PTX-only L2 prefetch (PREFETCH): one run
# per BLOCK_N covers every decode config (test_compile_sm90 compiles each one for the GPU).
DECODE_TILES = list({c.kwargs["BLOCK_N"]: c for c in D.DECODE_CONFIGS}.values())


@pytest.mark.parametrize("config", DECODE_TILES, ids=str)
def test_mla_decode_every_config(seed, config):
    torch.manual_seed(seed)
    kv, pe = _caches(2, torch.float32)
    q, qp = torch.randn(2, H, C), torch.randn(2, H, R)
    seqlens = torch.tensor([70, 9], dtype=torch.int32)
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, num_splits=2, config=config)
    _check(out, A.mla_decode_ref(q, qp, kv, pe, seqlens, SCALE), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s_q,start_pos", [(7, 0), (7, 20), (1, 50), (30, 3)])
def test_mla_prefill_causal(seed, dtype, s_q, start_pos):
    torch.manual_seed(seed)
    kv, pe = _caches(3, dtype)
    q, qp = torch.randn(2, s_q, H, C, dtype=dtype), torch.randn(2, s_q, H, R, dtype=dtype)
    out = P.mla_prefill(q, qp, kv, pe, start_pos, SCALE)
    assert out.shape == (2, s_q, H, C) and out.dtype == dtype
    _check(out, A.mla_prefill_ref(q, qp, kv, pe, start_pos, SCALE), dtype)


def test_mla_prefill_single_query_equals_decode(seed):
    torch.manual_seed(seed)
    kv, pe = _caches(2, torch.float32)
    q, qp = torch.randn(2, 1, H, C), torch.randn(2, 1, H, R)
    pre = P.mla_prefill(q, qp, kv, pe, 41, SCALE)
    dec = D.mla_decode(q[:, 0], qp[:, 0], kv, pe, torch.tensor([42, 42], dtype=torch.int32), SCALE, num_splits=3)
    assert (pre[:, 0] - dec).abs().max() < TOL["mla_fp32_abs"]


@pytest.mark.parametrize("config", P.PREFILL_CONFIGS, ids=str)
def test_mla_prefill_every_config(seed, config):
    torch.manual_seed(seed)
    kv, pe = _caches(1, torch.float32)
    q, qp = torch.randn(1, 9, H, C), torch.randn(1, 9, H, R)
    out = P.mla_prefill(q, qp, kv, pe, 11, SCALE, config=config)
    _check(out, A.mla_prefill_ref(q, qp, kv, pe, 11, SCALE), torch.float32)


def test_non_power_of_two_latent_width(seed):
    torch.manual_seed(seed)
    kv, pe = torch.randn(1, 40, 48), torch.randn(1, 40, 8)
    q, qp = torch.randn(1, 3, 48), torch.randn(1, 3, 8)
    seqlens = torch.tensor([33], dtype=torch.int32)
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, num_splits=2)
    _check(out, A.mla_decode_ref(q, qp, kv, pe, seqlens, SCALE), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_mla_decode_with_new_token_outside_the_cache(seed, dtype, num_splits):
    torch.manual_seed(seed)
    cache = torch.randn(4, S, C + R, dtype=dtype)  # one FlashMLA-style [latent | rope] cache; views below
    new = torch.randn(3, C + R, dtype=dtype)
    q, qp = torch.randn(3, H, C, dtype=dtype), torch.randn(3, H, R, dtype=dtype)
    seqlens = torch.tensor([0, 37, S - 1], dtype=torch.int32)  # row 0: only the new token
    kw = dict(kv_new=new[:, :C], pe_new=new[:, C:])
    out = D.mla_decode(q, qp, cache[..., :C], cache[..., C:], seqlens, SCALE, num_splits=num_splits, **kw)
    ref = A.mla_decode_ref(q, qp, cache[..., :C], cache[..., C:], seqlens, SCALE, **kw)
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_prefill_ragged_starts_with_new_tokens(seed, dtype):
    torch.manual_seed(seed)
    s_q = 6
    cache = torch.randn(3, S, C + R, dtype=dtype)
    new = torch.randn(3, s_q, C + R, dtype=dtype)
    q, qp = torch.randn(3, s_q, H, C, dtype=dtype), torch.randn(3, s_q, H, R, dtype=dtype)
    starts = torch.tensor([0, 17, 90], dtype=torch.int32)
    kw = dict(kv_new=new[..., :C], pe_new=new[..., C:])
    out = P.mla_prefill(q, qp, cache[..., :C], cache[..., C:], starts, SCALE, **kw)
    _check(out, A.mla_prefill_ref(q, qp, cache[..., :C], cache[..., C:], starts, SCALE, **kw), dtype)


def test_mla_prefill_ragged_starts_in_cache(seed):
    torch.manual_seed(seed)
    kv, pe = _caches(2, torch.float32)
    q, qp = torch.randn(2, 5, H, C), torch.randn(2, 5, H, R)
    starts = torch.tensor([3, 60], dtype=torch.int32)
    out = P.mla_prefill(q, qp, kv, pe, starts, SCALE)
    _check(out, A.mla_prefill_ref(q, qp, kv, pe, starts, SCALE), torch.float32)


@pytest.mark.parametrize("s", [1, 4])
def test_kernels_compose_to_the_mla_attention_op_math(seed, s):
    """W_UK -> mla_decode / mla_prefill (cache + new tokens) -> W_UV == dsv3_export.step.absorbed_attention."""
    step = pytest.importorskip("dsv3_export.step", reason="dsv3_export.step (the op's reference math) not present")
    torch.manual_seed(seed)
    b, t_len, dn, dv = 3, 40, 24, 20
    q_nope, q_pe = torch.randn(b, s, H, dn), torch.randn(b, s, H, R)
    kv_new, kv_cache = torch.randn(b, s, C + R), torch.randn(b, t_len, C + R)
    start_pos = torch.tensor([0, 9, t_len], dtype=torch.int64)
    wkv_b = torch.randn(H * (dn + dv), C) / C**0.5
    ref = step.absorbed_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, SCALE)  # [b, s, h, dv]

    w = wkv_b.view(H, dn + dv, C)  # [h, dn + dv, c]
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w[:, :dn])  # [b, s, h, c]
    caches = (kv_cache[..., :C], kv_cache[..., C:])
    if s == 1:
        lat = D.mla_decode(q_latent[:, 0], q_pe[:, 0], *caches, start_pos.to(torch.int32), SCALE,
                           kv_new=kv_new[:, 0, :C], pe_new=kv_new[:, 0, C:], num_splits=3)[:, None]
    else:
        lat = P.mla_prefill(q_latent, q_pe, *caches, start_pos.to(torch.int32), SCALE,
                            kv_new=kv_new[..., :C], pe_new=kv_new[..., C:])
    out = torch.einsum("bshc,hdc->bshd", lat, w[:, dn:])  # [b, s, h, dv]
    assert (out - ref).abs().max().item() < 1e-4


def test_bad_inputs_name_the_problem():
    kv, pe = _caches(2, torch.float32)
    q, qp = torch.randn(2, H, C), torch.randn(2, H, R)
    seqlens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_seqlens: dtype torch.float32"):
        D.mla_decode(q, qp, kv, pe, seqlens.float(), SCALE)
    with pytest.raises(ValueError, match="exceeds the cache's 2 rows"):
        D.mla_decode(torch.randn(3, H, C), torch.randn(3, H, R), kv, pe, torch.ones(3, dtype=torch.int32), SCALE)
    with pytest.raises(ValueError, match=r"kv_cache .* must be \[Bmax, S, C=64\]"):
        D.mla_decode(q, qp, kv[..., :32], pe, seqlens, SCALE)
    with pytest.raises(ValueError, match="pass both kv_new and pe_new"):
        D.mla_decode(q, qp, kv, pe, seqlens, SCALE, kv_new=torch.randn(2, C))
    with pytest.raises(ValueError, match=r"kv_new must be \(2, 64\)"):
        D.mla_decode(q, qp, kv, pe, seqlens, SCALE, kv_new=torch.randn(2, 32), pe_new=torch.randn(2, R))
    with pytest.raises(TypeError, match="start_pos: dtype torch.int64"):
        P.mla_prefill(q[:, None], qp[:, None], kv, pe, torch.zeros(2, dtype=torch.int64), SCALE)
    with pytest.raises(TypeError, match="kv_cache: dtype torch.bfloat16"):
        D.mla_decode(q, qp, kv.bfloat16(), pe, seqlens, SCALE)
    with pytest.raises(ValueError, match=r"cached positions \[0, 105\) outside"):
        P.mla_prefill(torch.randn(2, 10, H, C), torch.randn(2, 10, H, R), kv, pe, 95, SCALE)
    with pytest.raises(ValueError, match=r"config_set='fast' must be one of \['all', 'best'\]"):
        D.mla_decode_partials(q, qp, kv, pe, seqlens, SCALE, config_set="fast")


def test_best_config_set_is_two_of_the_configs_and_decodes_alike(seed):
    """config_set="best": two of DECODE_CONFIGS (the fastest pinned on the H200); under the interpreter both sets
    launch the first config of theirs, the same one, so the merged outputs are equal."""
    assert len(D.BEST_DECODE_CONFIGS) == 2 and all(c in D.DECODE_CONFIGS for c in D.BEST_DECODE_CONFIGS)
    torch.manual_seed(seed)
    kv, pe = _caches(2, torch.float32)
    q, qp, seqlens = torch.randn(2, H, C), torch.randn(2, H, R), torch.tensor([3, 2], dtype=torch.int32)
    parts = [D.mla_decode_partials(q, qp, kv, pe, seqlens, SCALE, config_set=s) for s in ("all", "best")]
    assert D.BEST_DECODE_CONFIGS[0] is D.DECODE_CONFIGS[0]
    merged = [D.mla_decode_reduce(p, torch.float32) for p in parts]
    assert torch.isfinite(merged[0]).all() and torch.equal(merged[0], merged[1])


@pytest.mark.parametrize("batch,ctx", [(32, 4096), (1, 1024), (8, 1024), (64, 1024), (128, 4096), (3, 70), (1, 33)])
def test_choose_num_splits_fills_whole_waves(batch, ctx):
    """On 132 SMs (2 decode programs each): one wave where it can, never splits under 64 keys."""
    splits = D.choose_num_splits(batch, 16, ctx, torch.device("cpu"))  # CPU: the nominal 132 SMs
    assert 1 <= splits <= D.MAX_SPLITS
    assert splits == 1 or -(-ctx // splits) >= D.MIN_SPLIT_KEYS
    slots = D.DECODE_PROGRAMS_PER_SM * 132
    programs = batch * splits
    if batch <= slots:
        assert programs <= slots, f"{programs} programs spill into a second wave of {slots}"
    assert (batch, ctx) != (32, 4096) or splits == 8  # the old rule's 9 splits = 1.09 waves


# Runtime split rule (runtime_splits=True, the traced decode program): MAX_SPLITS split programs per
# (row, head block); the kernels use runtime_num_splits of them, from the launch's batch and each row's
# cache length. SMS = 20 (SPLIT_TARGET 40) gives each batch below its own count before the key cap:
# B=1 -> 32, B=2 -> 20, B=5 -> 8; the contexts then cap some rows (one split per 64 keys, rounded up:
# 37 keys -> 1 split, 130 -> 3) and leave others at the batch count; 0 is an empty cache.
RUNTIME_SMS = 20
RUNTIME_CASES = {1: [2100], 2: [0, 1400], 5: [0, 37, 130, 600, 1000]}


@pytest.fixture
def runtime_sms(monkeypatch):
    monkeypatch.setattr(mla_splits, "num_sms", lambda device: RUNTIME_SMS)  # where the split rules read it
    return RUNTIME_SMS


def _runtime_inputs(bsz: int, dtype):
    lens = RUNTIME_CASES[bsz]
    cache = torch.randn(bsz + 1, max(lens) + 3, C + R, dtype=dtype)  # one more cache row, 3 spare positions
    q, qp = torch.randn(bsz, H, C, dtype=dtype), torch.randn(bsz, H, R, dtype=dtype)
    new = torch.randn(bsz, C + R, dtype=dtype)
    return cache[..., :C], cache[..., C:], q, qp, new, torch.tensor(lens, dtype=torch.int32)


def test_runtime_split_rule(runtime_sms):
    """runtime_num_splits: the batch count, its clamp to [RUNTIME_MIN_SPLITS, MAX_SPLITS], the key cap."""
    cpu = torch.device("cpu")
    got = {b: [D.runtime_num_splits(b, H, n, cpu) for n in lens] for b, lens in RUNTIME_CASES.items()}
    assert got == {1: [32], 2: [1, 20], 5: [1, 1, 3, 8, 8]}
    assert D.runtime_num_splits(64, H, 4096, cpu) == D.RUNTIME_MIN_SPLITS  # 40 // 64 = 0: the floor


@pytest.mark.parametrize("batch,ctx,heads,want", [
    (32, 4096, 16, 8),  # the count measured best at B=32 (session 4); one wave of 256 programs
    (1, 1024, 16, 16), (1, 1023, 16, 16), (1, 960, 16, 15),  # B=1: the key cap (one split per 64 keys)
    (1, 4096, 16, 32), (8, 4096, 16, 32), (16, 4096, 16, 16), (64, 4096, 16, 8),
    (16, 4096, 128, 8),  # V3's 128 heads: 2 head blocks of 64
    (1, 100, 16, 2), (1, 64, 16, 1), (1, 0, 16, 1)])
def test_runtime_split_rule_on_132_sms(batch, ctx, heads, want):
    assert D.runtime_num_splits(batch, heads, ctx, torch.device("cpu")) == want  # CPU: the nominal 132 SMs


@triton.jit
def _rule_probe_kernel(programs_ptr, seqlens_ptr, out_ptr, NUM_SPLITS, SPLIT_TARGET: tl.constexpr,
                       MIN_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr):
    i = tl.program_id(0)
    splits = mla_splits._batch_splits(tl.load(programs_ptr + i), NUM_SPLITS, SPLIT_TARGET, MIN_SPLITS)
    tl.store(out_ptr + i, mla_splits._row_splits(splits, tl.load(seqlens_ptr + i), MIN_KEYS))


def test_kernel_split_rule_is_runtime_num_splits():
    """The jit helpers both kernels call compute what runtime_num_splits says (132 SMs, H=16)."""
    batches, lens = (1, 2, 3, 8, 9, 16, 17, 32, 33, 64, 300), (0, 1, 63, 64, 65, 200, 1023, 1024, 5000)
    cases = [(b, n) for b in batches for n in lens]
    programs = torch.tensor([b for b, _ in cases], dtype=torch.int32)  # one head block at H=16
    seqlens = torch.tensor([n for _, n in cases], dtype=torch.int32)
    out = torch.empty(len(cases), dtype=torch.int32)
    _rule_probe_kernel[(len(cases),)](programs, seqlens, out, D.MAX_SPLITS,
                                      SPLIT_TARGET=D.runtime_split_target(torch.device("cpu")),
                                      MIN_SPLITS=D.RUNTIME_MIN_SPLITS, MIN_KEYS=D.MIN_SPLIT_KEYS)
    assert out.tolist() == [D.runtime_num_splits(b, 16, n, torch.device("cpu")) for b, n in cases]


@pytest.mark.parametrize("bsz", sorted(RUNTIME_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_runtime_splits_writes_the_rules_partials(seed, runtime_sms, monkeypatch, bsz, dtype):
    """Each row's split programs write exactly runtime_num_splits partials (the rest of
    the MAX_SPLITS slots keep torch.empty's NaN poison) and the reduce kernel merges just those."""
    torch.manual_seed(seed)
    kv, pe, q, qp, _, seqlens = _runtime_inputs(bsz, dtype)
    made = []
    empty = torch.empty  # conftest's NaN-poisoned allocator

    def recording_empty(*args, **kwargs):
        made.append(empty(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch, "empty", recording_empty)
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, runtime_splits=True)
    _check(out, A.mla_decode_ref(q, qp, kv, pe, seqlens, SCALE), dtype)
    (lse,) = [t for t in made if t.shape == (bsz, H, D.MAX_SPLITS)]
    written = (~lse.isnan()).sum(dim=-1)  # [B, H] partials each (row, head) got
    want = [D.runtime_num_splits(bsz, H, n, kv.device) for n in seqlens.tolist()]
    assert written.tolist() == [[w] * H for w in want]


@pytest.mark.parametrize("bsz", sorted(RUNTIME_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_runtime_splits_with_new_token(seed, runtime_sms, bsz, dtype):
    """The traced program's form (cache + new token, runtime splits) vs the reference."""
    torch.manual_seed(seed)
    kv, pe, q, qp, new, seqlens = _runtime_inputs(bsz, dtype)
    kw = dict(kv_new=new[:, :C], pe_new=new[:, C:])
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, runtime_splits=True, **kw)
    assert out.shape == (bsz, H, C) and out.dtype == dtype
    _check(out, A.mla_decode_ref(q, qp, kv, pe, seqlens, SCALE, **kw), dtype)


@pytest.mark.parametrize("config", DECODE_TILES, ids=str)
def test_mla_decode_runtime_splits_every_tile(seed, runtime_sms, config):
    """Runtime chunks are not rounded to BLOCK_N (the reduce kernel recomputes the split count without
    it): every tile size over chunks that start and end inside its tiles."""
    torch.manual_seed(seed)
    kv, pe, q, qp, _, seqlens = _runtime_inputs(5, torch.float32)
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, runtime_splits=True, config=config)
    _check(out, A.mla_decode_ref(q, qp, kv, pe, seqlens, SCALE), torch.float32)


def test_mla_decode_runtime_splits_excludes_num_splits():
    kv, pe = _caches(1, torch.float32)
    with pytest.raises(ValueError, match="num_splits=4 with runtime_splits=True"):
        D.mla_decode(torch.randn(1, H, C), torch.randn(1, H, R), kv, pe, torch.ones(1, dtype=torch.int32), SCALE,
                     num_splits=4, runtime_splits=True)


def test_launch_passes_the_register_cap_of_an_explicit_config(monkeypatch):
    """mla_decode relaunches the autotuner's choice as an explicit config: a maxnreg config (4 decode
    programs per SM) must keep its register cap, or it runs at the occupancy it was not timed at."""
    import triton

    from dsv3_export.kernels import _common

    seen = {}

    class FakeKernel:  # a compiled kernel's launch surface: kernel[grid](*args, **meta)
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.update(kw)

    monkeypatch.setattr(_common, "is_interpreted", lambda kernel: False)
    monkeypatch.setattr(_common, "tracing", lambda: False)
    cfg = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=3, maxnreg=128)
    _common.launch(FakeKernel(), None, [cfg], lambda meta: (1,), (), {"C": 8}, cfg)
    assert seen == dict(C=8, BLOCK_N=16, num_warps=4, num_stages=3, maxnreg=128)
    assert any(c.maxnreg == 128 for c in D.DECODE_CONFIGS)


# The family's entry point (kernels/mla_attention.py) re-exports the kernel modules' names, lazily, so
# the imports that predate the split into mla_decode / mla_prefill keep working.


def test_entry_point_reexports_the_kernel_modules_own_objects():
    for module in (D, K, P):
        for name in A._REEXPORTS[module.__name__.rsplit(".", 1)[1]]:
            assert getattr(A, name) is getattr(module, name), name
            assert name in dir(A)
    from dsv3_export.kernels.mla_attention import _mla_decode_split_kernel, mla_prefill  # the from-import form

    assert _mla_decode_split_kernel is K._mla_decode_split_kernel and mla_prefill is P.mla_prefill
    with pytest.raises(AttributeError, match="has no attribute 'mla_decode_fast'"):
        A.mla_decode_fast  # noqa: B018


def test_entry_point_reads_module_state_where_it_lives(monkeypatch):
    """DECODE_CONFIGS and the chosen-config cache live in mla_decode only; the entry point reads them there."""
    configs = D.DECODE_CONFIGS[:1]
    monkeypatch.setattr(D, "DECODE_CONFIGS", configs)
    assert A.DECODE_CONFIGS is configs and A._decode_chosen is D._decode_chosen


@pytest.mark.parametrize("first", ["mla_decode", "mla_prefill", "mla_attention"])
def test_any_module_of_the_family_can_be_imported_first(first):
    """mla_decode / mla_prefill import mla_attention's checks: no import cycle whichever comes first."""
    import subprocess
    import sys

    code = (f"import dsv3_export.kernels.{first}; from dsv3_export.kernels import mla_attention as A; "
            "from dsv3_export.kernels.mla_attention import mla_decode, mla_prefill, DECODE_CONFIGS; "
            "print(mla_decode.__module__, mla_prefill.__module__, len(DECODE_CONFIGS))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[:2] == ["dsv3_export.kernels.mla_decode", "dsv3_export.kernels.mla_prefill"]


@pytest.mark.parametrize("runtime_splits", [False, True])
def test_unclamped_int64_start_positions_are_clamped_by_the_kernels(seed, runtime_splits):
    """The torch engine passes the step's start_pos as it is (int64; below 0 or past the cache's T rows in
    principle): the split and reduce kernels clamp it to [0, T], the same bits as the int32 clamped lengths."""
    torch.manual_seed(seed)
    b, t = 4, S
    kv, pe = _caches(b, torch.float32)
    q, qp = torch.randn(b, H, C), torch.randn(b, H, R)
    kv_new, pe_new = torch.randn(b, C), torch.randn(b, R)
    start_pos = torch.tensor([-3, 0, 37, t + 200], dtype=torch.int64)  # t + 200: more splits than t if unclamped
    seen = start_pos.clamp(0, t).to(torch.int32)
    kw = dict(kv_new=kv_new, pe_new=pe_new, runtime_splits=runtime_splits)
    want = D.mla_decode(q, qp, kv, pe, seen, SCALE, **kw)
    got = D.mla_decode(q, qp, kv, pe, start_pos, SCALE, **kw)
    assert_finite("mla_decode int64 start_pos", got)
    assert torch.equal(got, want)
    assert mean_rel(got, A.mla_decode_ref(q, qp, kv, pe, seen, SCALE, kv_new=kv_new, pe_new=pe_new)) < 1e-4
    assert torch.equal(A.mla_decode_ref(q, qp, kv, pe, start_pos, SCALE, kv_new=kv_new, pe_new=pe_new),
                       A.mla_decode_ref(q, qp, kv, pe, seen, SCALE, kv_new=kv_new, pe_new=pe_new))


@pytest.mark.parametrize("variant", sorted(D.VARIANT_FLAGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_q_rope_in_the_kernel_equals_the_roped_query(seed, variant, dtype):
    """q_rope: the split kernel rotates the raw q_pe itself by the rope tables' row at each position
    (reference/layers.py apply_rotary_emb: fp32, rounded to q_pe's dtype); the same bits as the query roped by torch,
    read from a strided view as the engine passes it (heads 7 + R apart), with the new token (whose score reloads
    q_pe) and both split rules; positions past the tables are clamped to their last row."""
    from dsv3_export.reference.layers import apply_rotary_emb

    torch.manual_seed(seed)
    b, rows = 3, 11
    kv, pe = (t.to(dtype) for t in _caches(b, torch.float32))
    q = torch.randn(b, H, C).to(dtype)
    raw = torch.randn(b, H, 7 + R).to(dtype)[..., 7:]  # [b, H, R], strides (H * (7 + R), 7 + R, 1)
    angles = torch.rand(rows, R // 2) * 6.3
    cos_t, sin_t = angles.cos(), angles.sin()  # the tables [P, R/2] fp32
    positions = torch.tensor([0, 5, rows + 4])
    at = positions.clamp(max=rows - 1)
    roped = apply_rotary_emb(raw[:, None], cos_t[at][:, None], sin_t[at][:, None])[:, 0]  # [b, H, R] in dtype
    kw = dict(kv_new=torch.randn(b, C).to(dtype), pe_new=torch.randn(b, R).to(dtype), variant=variant)
    seqlens = torch.tensor([0, 41, S], dtype=torch.int32)
    for rule in (dict(runtime_splits=True), dict(num_splits=3)):
        want = D.mla_decode_partials(q, roped.contiguous(), kv, pe, seqlens, SCALE, **kw, **rule)
        got = D.mla_decode_partials(q, raw, kv, pe, seqlens, SCALE, **kw, **rule, q_rope=(cos_t, sin_t, positions))
        assert_finite("mla_decode q_rope", D.mla_decode_reduce(got, dtype))
        assert torch.equal(D.mla_decode_reduce(got, dtype), D.mla_decode_reduce(want, dtype)), rule
    with pytest.raises(ValueError, match=r"q_rope cos \(11, 4\) must be \[P, R/2=8\]"):
        D.mla_decode_partials(q, raw, kv, pe, seqlens, SCALE, q_rope=(cos_t[:, :4], sin_t, positions))
