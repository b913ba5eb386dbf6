"""mla_decode's variants (kernels/mla_decode.py DECODE_VARIANTS) vs mla_decode_ref, in the interpreter.

variant="early" loads q and the new token before the program waits for its cache length and scores the
new token from q in registers; variant="lazy" raises the softmax's running max only when a tile's exceeds it by more
than LAZY_LOG2; both run with the pointer configs the benchmark pins. The caches here hold
NaN past every row's length: a tile load not masked there would turn the output into NaN (0 x NaN in the
value dot). torch.empty is NaN-poisoned (conftest), so a partial or output the kernels forget
to write fails the comparison too. Tolerances: tests/kernels/_helpers.py TOL (fp32: max abs 2e-5,
summation order only; bf16: mean rel 1e-2). The sm_90 build of every variant's configs is checked by
tests/kernels/test_compile_sm90.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import mla_attention as A  # noqa: E402
from dsv3_export.kernels import mla_decode as D  # noqa: E402
from dsv3_export.kernels import mla_splits  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402

H, C, R, S = 5, 64, 16, 100  # H not a power of 2; the real model has C=512, R=64, H=16
SCALE = 0.173


def _poisoned_cache(bmax: int, lens: list[int], c: int, r: int, dtype) -> torch.Tensor:
    """[bmax, S, c + r] (FlashMLA-style [latent | rope] rows), NaN at and past each row's length."""
    cache = torch.randn(bmax, S, c + r, dtype=dtype)
    for b, n in enumerate(lens):
        cache[b, n:] = float("nan")
    return cache


def _check(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert_finite("mla_decode variant", out)
    if dtype == torch.float32:
        assert (out - ref).abs().max().item() < TOL["mla_fp32_abs"]
    else:
        assert mean_rel(out, ref) < TOL["mla_bf16_mean_rel"]


OTHER_VARIANTS = [v for v in D.DECODE_VARIANTS if v != D.DECODE_VARIANT]
# The early-load variants run pinned pointer configs: the ones benchmarks/kernels.py mla_sweep times.
EARLY_CONFIGS = [c for c in D.DECODE_CONFIGS if c.num_warps == 4 and not c.maxnreg and
                 (c.kwargs["BLOCK_N"], c.kwargs["PREFETCH"], c.num_stages) in ((32, 0, 3), (64, 2, 2))]
VARIANT_CONFIGS = [(v, c) for v in OTHER_VARIANTS for c in EARLY_CONFIGS]


def test_early_configs_found():
    assert len(EARLY_CONFIGS) == 2 and OTHER_VARIANTS == ["early", "lazy"]


@pytest.mark.parametrize("variant,config", VARIANT_CONFIGS, ids=str)
def test_variant_every_config_ragged(seed, variant, config):
    """Ragged rows (empty, 1 key, not a multiple of any BLOCK_N, the full cache) over 3 splits."""
    torch.manual_seed(seed)
    lens = [0, 1, 37, S]
    cache = _poisoned_cache(5, lens, C, R, torch.float32)  # one more cache row than the batch
    kv, pe = cache[..., :C], cache[..., C:]
    q, qp = torch.randn(4, H, C), torch.randn(4, H, R)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    ref = A.mla_decode_ref(q, qp, torch.nan_to_num(kv), torch.nan_to_num(pe), seqlens, SCALE)
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, num_splits=3, config=config, variant=variant)
    assert out.shape == (4, H, C) and out.dtype == torch.float32
    _check(out, ref, torch.float32)
    assert (out[0] == 0).all()  # no keys: zeros, as the pointer form


@pytest.mark.parametrize("variant", OTHER_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_variant_matches_pointer_form(seed, variant, dtype, num_splits):
    """Same tiles, same math: each variant equals the pointer form (fp32: to rounding; bf16: the
    reference's tolerance), at the host's split count and at forced ones."""
    torch.manual_seed(seed)
    lens = [70, 9, 64]
    cache = _poisoned_cache(3, lens, C, R, dtype)
    kv, pe = cache[..., :C], cache[..., C:]
    q, qp = torch.randn(3, H, C, dtype=dtype), torch.randn(3, H, R, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, num_splits=num_splits, variant=variant,
                       config=EARLY_CONFIGS[0])
    ptr = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, num_splits=num_splits, variant="pointer")
    assert_finite("mla_decode pointer", ptr)
    if dtype == torch.float32:
        assert (out - ptr).abs().max().item() < 1e-6
    _check(out, A.mla_decode_ref(q, qp, torch.nan_to_num(kv), torch.nan_to_num(pe), seqlens, SCALE), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_rescales_when_a_later_tile_dominates(seed, dtype):
    """variant="lazy" keeps the running max until a tile's exceeds it by > LAZY_LOG2: keys in later tiles scaled up
    make some head's max grow by far more than that mid-loop (the rescale path), the others' by less (the skip
    path); one split, so every tile of a row goes through one program."""
    torch.manual_seed(seed)
    lens = [S, 70]
    cache = _poisoned_cache(2, lens, C, R, dtype)
    cache[0, 80] *= 80  # tile 2 of row 0 (BLOCK_N 32, counted from 0): scores ~80x the others
    cache[1, 40] *= 6
    q, qp = torch.randn(2, H, C, dtype=dtype), torch.randn(2, H, R, dtype=dtype)

    def growth():  # per head, key 80's score (base 2) above the running max after tiles 0-1
        k = cache[0].float()
        scores = (k[:, :C] @ q[0].float().T + k[:, C:] @ qp[0].float().T).T * SCALE * 1.4427  # [H, S]
        return scores[:, 80] - scores[:, :64].max(dim=1).values

    if growth().max().item() <= 8:  # make one head's key point along its query, rope part zero
        head = growth().argmax()
        cache[0, 80, :C] = q[0, head].to(dtype) * 8
        cache[0, 80, C:] = 0
    assert growth().max().item() > 8  # the rescale path runs mid-loop
    kv, pe = cache[..., :C], cache[..., C:]
    seqlens = torch.tensor(lens, dtype=torch.int32)
    ref = A.mla_decode_ref(q, qp, torch.nan_to_num(kv), torch.nan_to_num(pe), seqlens, SCALE)
    out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, num_splits=1, variant="lazy", config=EARLY_CONFIGS[0])
    ptr = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, num_splits=1, variant="pointer", config=EARLY_CONFIGS[0])
    assert_finite("mla_decode lazy", out)
    # per (row, head), relative to that head's output scale (the scaled key's heads reach ~80x the others'). fp32:
    # the pointer form to rounding; the reference within 1e-4 (a head mixing the scaled key's value with the others'
    # cancels: the pointer form itself is 1.2e-5 from it there at some seeds)
    scale = ref.abs().amax(dim=-1, keepdim=True)
    if dtype == torch.float32:
        assert ((out - ptr).abs() / scale).max().item() < 1e-6
        assert ((out - ref).abs() / scale).max().item() < 1e-4
    else:
        assert ((out - ref).abs() / scale).mean().item() < TOL["mla_bf16_mean_rel"]


@pytest.mark.parametrize("variant", OTHER_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variant_runtime_splits_with_new_token(seed, monkeypatch, variant, dtype):
    """The decode program's form: cache + new token (the early variant scores it before the loop), the
    kernels' runtime split rule (20 SMs: B=5 -> 8 splits before the key cap; chunks not multiples of
    BLOCK_N), the first and last pinned config."""
    monkeypatch.setattr(mla_splits, "num_sms", lambda device: 20)
    torch.manual_seed(seed)
    lens = [0, 37, 65, 90, S - 1]  # cache keys before the new token: 1, 1, 2, 2, 2 splits
    cache = _poisoned_cache(6, lens, C, R, dtype)
    kv, pe = cache[..., :C], cache[..., C:]
    new = torch.randn(5, C + R, dtype=dtype)
    q, qp = torch.randn(5, H, C, dtype=dtype), torch.randn(5, H, R, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(kv_new=new[:, :C], pe_new=new[:, C:])
    ref = A.mla_decode_ref(q, qp, torch.nan_to_num(kv), torch.nan_to_num(pe), seqlens, SCALE, **kw)
    assert [D.runtime_num_splits(5, H, n, kv.device) for n in lens] == [1, 1, 2, 2, 2]
    for cfg in (EARLY_CONFIGS[0], EARLY_CONFIGS[-1]):  # BN=32 (mma.sync scores), BN=64 (wgmma)
        out = D.mla_decode(q, qp, kv, pe, seqlens, SCALE, runtime_splits=True, config=cfg, variant=variant, **kw)
        _check(out, ref, dtype)


def test_unknown_variant_is_an_error():
    kv, pe = torch.randn(1, 8, C), torch.randn(1, 8, R)
    with pytest.raises(ValueError, match="variant='wgmma' must be one of"):
        D.mla_decode(torch.randn(1, H, C), torch.randn(1, H, R), kv, pe, torch.ones(1, dtype=torch.int32), SCALE,
                     variant="wgmma")


def test_default_variant_is_the_measured_one():
    """No variant becomes the default before the H200 measured it (benchmarks/kernels.py mla_sweep)."""
    assert D.DECODE_VARIANT == "pointer" and D.DECODE_VARIANTS[0] == "pointer" and not any(D.VARIANT_FLAGS["pointer"].values())
