"""grouped_gemm(quant_out=True) / grouped_gemm_scan(quant_out=True): the up GEMM's epilogue writes h
quantized (fp8 rows + 1x128 scales) instead of h; and the engine switch DSV3_TORCH_MOE_QUANT_H that
uses it in the decode program's dsv3_aoti::moe_experts_fp8.

The contract is bit-for-bit: hq's bits and hs equal act_quant(h) of the GEMM that stores h (same
config: BLOCK_N = 128), in both routing forms, for every precision and both scale roundings (IEEE
amax / 448 as on the CPU, amax * fp32(1/448) as on CUDA). Outputs are NaN-poisoned (conftest): a row
or scale the epilogue forgets stays NaN. Shapes off the 128 grid: K = D not a multiple of 128, I = 200
(a last column tile of 72: the masked columns must count as zeros in the amax, as act_quant loads
them) and I = 256; k, E and the shape draws come from the fresh seed.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import fp8_quant as Q  # noqa: E402
from dsv3_export.kernels import moe as M  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import assert_finite  # noqa: E402
from tests.kernels.test_moe import _recorded_grids  # noqa: E402

CFG = M.QUANT_OUT_CONFIGS[0]  # the separate GEMM under the quantizing one's tile: equal sums


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qs, ss = zip(*(R.weight_quant(w[e].float()) for e in range(w.shape[0])))
    return torch.stack(qs), torch.stack(ss)


def _case(seed: int, t: int, inter: int):
    """(x [T, D], w13 [E, 2I, D] fp32, ids [T, k], weights [T, k]): k in 2..8, E in 5..9 (k <= E), D off
    the 128 grid; row 0 of x is zero past its first 128 columns, and for T > 2 one row is all zero
    (its h row is zero: the amax floor, not NaN)."""
    rng = random.Random(seed)
    e = rng.randint(5, 9)
    k = rng.randint(2, min(8, e))
    d = rng.choice((200, 330))
    torch.manual_seed(seed)
    x = torch.randn(t, d) * 3
    x[0, 128:] = 0
    if t > 2:
        x[t // 2] = 0
    w13 = torch.randn(e, 2 * inter, d) / d**0.5
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    if t > 1:
        ids[1] = ids[0]  # two tokens on the same experts: rows of one block from two tokens
    return x, w13, ids, torch.rand(t, k)


def _gemm(form: str, a, w, ids, topk: int, e: int, **kw):
    if form == "scan":
        return M.grouped_gemm_scan(a, w, ids, topk, **kw)
    return M.grouped_gemm(a, w, *M.moe_align(ids, e, M.SCAN_BLOCK_M), topk, **kw)


def _assert_same_quant(got: tuple, want: tuple, name: str) -> None:
    (gq, gs), (wq, ws) = got, want
    assert gq.dtype == wq.dtype == M.FP8_DTYPE and gs.dtype == ws.dtype == torch.float32, name
    assert gq.shape == wq.shape and gs.shape == ws.shape, (name, gq.shape, wq.shape, gs.shape, ws.shape)
    assert_finite(f"{name} hq", gq.float())
    assert_finite(f"{name} hs", gs)
    bits, want_bits = gq.view(torch.uint8), wq.view(torch.uint8)
    assert torch.equal(bits, want_bits), f"{name}: {int((bits != want_bits).sum())} of {bits.numel()} fp8 codes differ"
    assert torch.equal(gs, ws), f"{name}: {int((gs != ws).sum())} of {gs.numel()} scales differ"


@pytest.mark.parametrize("form,t,inter,precision,h_dtype,reciprocal", [
    ("aligned", 1, 200, "w8a8", torch.bfloat16, True),  # the decode program on CUDA
    ("scan", 1, 256, "w8a8", torch.bfloat16, True),
    ("aligned", 3, 256, "quant_a", torch.bfloat16, False),  # x quantized in the K loop, h in the epilogue
    ("scan", 3, 200, "w8a8", torch.float16, False),
    ("scan", 13, 200, "quant_a", torch.bfloat16, True),
    ("aligned", 13, 200, "bf16", torch.bfloat16, True),  # dense bf16 experts
    ("aligned", 3, 200, "w8a8", torch.float32, True),  # an fp32 h: no rounding before the quantization
])
def test_quant_out_is_up_gemm_then_act_quant_bit_for_bit(seed, form, t, inter, precision, h_dtype, reciprocal):
    x, w13, ids, _ = _case(seed, t, inter)
    e, k = w13.shape[0], ids.shape[1]
    if precision == "bf16":
        a, w, kw = x.bfloat16(), w13.bfloat16(), {}
    else:
        w, w_s = _quantize(w13)
        if precision == "w8a8":
            xq, xs = Q.act_quant(x.bfloat16(), scale_reciprocal=reciprocal)
            a, kw = xq, dict(a_scale=xs, w_scale=w_s)
        else:
            a, kw = x.bfloat16(), dict(w_scale=w_s, quant_a=True)
    kw.update(fuse_swiglu=True, out_dtype=h_dtype, scale_reciprocal=reciprocal)
    h = _gemm(form, a, w, ids, k, e, config=CFG, **kw)  # [T*k, I]
    want = Q.act_quant(h, scale_reciprocal=reciprocal)
    got = _gemm(form, a, w, ids, k, e, quant_out=True, **kw)
    assert got[1].shape == (t * k, -(-inter // 128))
    _assert_same_quant(got, want, f"{form} {precision}")
    # the scales are the real ones: the zero row (T > 2) gets the amax floor, the others its amax / 448
    assert (got[1] > 0).all()


def test_quant_out_after_the_routing_weight_epilogue(seed):
    """Any epilogue can quantize: the down-GEMM form (no SwiGLU, rows scaled by the routing weight)."""
    x, w13, ids, rw = _case(seed, 3, 200)
    e, k = w13.shape[0], ids.shape[1]
    w, w_s = _quantize(w13)
    xq, xs = Q.act_quant(x.bfloat16())
    kw = dict(a_scale=xs, w_scale=w_s, topk_weights=rw, out_dtype=torch.bfloat16)
    for form in ("aligned", "scan"):
        want = Q.act_quant(_gemm(form, xq, w, ids, k, e, config=CFG, **kw))
        _assert_same_quant(_gemm(form, xq, w, ids, k, e, quant_out=True, **kw), want, form)


def test_quant_out_launches_one_kernel_on_column_tiles_of_128(seed, monkeypatch):
    """One launch (the GEMM; no act_quant) whose grid's columns are ceil(I/128) scale blocks; every
    quant_out config has BLOCK_N = 128, and a config without it is refused naming the problem."""
    x, w13, ids, _ = _case(seed, 1, 200)
    e, k = w13.shape[0], ids.shape[1]
    w, w_s = _quantize(w13)
    xq, xs = Q.act_quant(x.bfloat16())
    assert all(c.kwargs == {"BLOCK_N": 128} for c in M.QUANT_OUT_CONFIGS)
    aligned = M.moe_align(ids, e, 16)
    grids = _recorded_grids(monkeypatch, M, "launch")
    M.grouped_gemm(xq, w, *aligned, k, a_scale=xs, w_scale=w_s, fuse_swiglu=True, quant_out=True)
    M.grouped_gemm_scan(xq, w, ids, k, a_scale=xs, w_scale=w_s, fuse_swiglu=True, quant_out=True)
    assert grids == [("_grouped_gemm_kernel", (k, 2)), ("_grouped_gemm_scan_kernel", (k, 2))], grids
    narrow = M.GROUPED_GEMM_CONFIGS[0]
    assert narrow.kwargs["BLOCK_N"] != 128
    with pytest.raises(ValueError, match="grouped_gemm: quant_out needs BLOCK_N=128"):
        M.grouped_gemm(xq, w, *aligned, k, a_scale=xs, w_scale=w_s, fuse_swiglu=True, quant_out=True, config=narrow)
    with pytest.raises(ValueError, match="grouped_gemm_scan: quant_out needs BLOCK_N=128"):
        M.grouped_gemm_scan(xq, w, ids, k, a_scale=xs, w_scale=w_s, fuse_swiglu=True, quant_out=True, config=narrow)


def test_quant_out_bad_inputs_name_the_tensor():
    x, w13, ids, _ = _case(0, 3, 200)
    e, k = w13.shape[0], ids.shape[1]
    w, w_s = _quantize(w13)
    xq, xs = Q.act_quant(x.bfloat16())
    with pytest.raises(ValueError, match="grouped_gemm_scan: a_scale must be"):
        M.grouped_gemm_scan(xq, w, ids, k, a_scale=xs[:, :1], w_scale=w_s, fuse_swiglu=True, quant_out=True)
    with pytest.raises(TypeError, match="grouped_gemm: out_dtype torch.int32 not supported"):
        M.grouped_gemm(xq, w, *M.moe_align(ids, e, 16), k, a_scale=xs, w_scale=w_s, quant_out=True,
                       out_dtype=torch.int32)
    with pytest.raises(TypeError, match="grouped_gemm_scan: topk_ids: dtype torch.float32"):
        M.grouped_gemm_scan(xq, w, ids.float(), k, a_scale=xs, w_scale=w_s, quant_out=True)


# ---------------------------------------------------------------------------------------------
# the engine: dsv3_aoti::moe_experts_fp8 (its launch code run eagerly by the interpreter) and the switch


@pytest.mark.parametrize("align_form,t,inter", [("kernel", 3, 200), ("scan", 1, 256), ("scan", 13, 200)])
def test_engine_moe_fp8_quant_h_equals_act_quant_form(seed, monkeypatch, align_form, t, inter):
    """quant_h=True (DSV3_TORCH_MOE_QUANT_H=1 in the decode program): the up GEMM writes h quantized, no
    act_quant launch for h (one for x), and the MoE's output equals the act_quant form's bit for bit,
    in both routing forms; also with the GEMMs quantizing x themselves (fuse_act_quant)."""
    from dsv3_export.engines import torch_triton as TT

    monkeypatch.setenv(TT.MOE_ALIGN_ENV, align_form)  # _moe_align reads it: scan in the decode block_m
    x, w13, ids, rw = _case(seed, t, inter)
    d = x.shape[1]
    (w13q, w13s), (w2q, w2s) = _quantize(w13), _quantize(torch.randn(w13.shape[0], d, inter) / inter**0.5)
    args = (x.bfloat16(), rw.bfloat16(), ids, w13q, w13s, w2q, w2s, TT.BLOCK_M["decode"])
    gemm = "_grouped_gemm_scan_kernel" if align_form == "scan" else "_grouped_gemm_kernel"
    outs = {}
    for fuse in (False, True):
        for quant_h in (False, True):
            grids = _recorded_grids(monkeypatch, TT, "_launch")
            outs[fuse, quant_h] = TT.moe_experts_fp8(*args, fuse, quant_h)
            names = [name for name, _ in grids]
            quant_launches = 0 if fuse else 2 - quant_h  # x's and h's act_quant (CPU: the IEEE kernel)
            assert names.count("_act_quant_ieee_kernel") == quant_launches and names.count(gemm) == 2, names
            assert len(names) == quant_launches + 2, names
            assert_finite(f"moe_experts_fp8 fuse={fuse} quant_h={quant_h}", outs[fuse, quant_h])
            monkeypatch.undo()
            monkeypatch.setenv(TT.MOE_ALIGN_ENV, align_form)
    base = outs[False, False]
    for key, out in outs.items():
        assert torch.equal(out, base), f"{key}: {int((out != base).sum())} of {out.numel()} outputs differ"


def test_quant_h_switch_is_off_by_default_decode_only_and_named(monkeypatch):
    from dsv3_export.engines import torch_triton as TT

    monkeypatch.delenv(TT.MOE_QUANT_H_ENV, raising=False)
    assert not TT._moe_quant_h("decode")
    assert TT.MOE_QUANT_H_ENV not in TT.triton_lowerings("decode")["dsv3::moe_experts_fp8"].how
    monkeypatch.setenv(TT.MOE_QUANT_H_ENV, "1")
    assert TT._moe_quant_h("decode") and not TT._moe_quant_h("prefill")
    assert "DSV3_TORCH_MOE_QUANT_H=1: the up GEMM writes h quantized" in \
        TT.triton_lowerings("decode")["dsv3::moe_experts_fp8"].how
    assert TT.MOE_QUANT_H_ENV not in TT.triton_lowerings("prefill")["dsv3::moe_experts_fp8"].how
    monkeypatch.setenv(TT.MOE_QUANT_H_ENV, "yes")
    with pytest.raises(ValueError, match="DSV3_TORCH_MOE_QUANT_H='yes'"):
        TT.triton_lowerings("decode")


def test_lowering_passes_the_switch_to_the_op(seed, monkeypatch):
    """The decode lowering of dsv3::moe_experts_fp8 calls the triton_op with quant_h from the switch (read
    when the program is lowered, an argument of the op: the traced op reads no environment)."""
    from dsv3_export.engines import torch_triton as TT

    seen = []
    monkeypatch.setattr(TT, "moe_experts_fp8", lambda *a: seen.append(a[8:]) or a[0])
    x, w13, ids, rw = _case(seed, 1, 200)
    for value, kind, want in (("1", "decode", (False, True)), ("1", "prefill", (False, False)),
                              ("0", "decode", (False, False))):
        monkeypatch.setenv(TT.MOE_QUANT_H_ENV, value)
        lower = TT.triton_lowerings(kind)["dsv3::moe_experts_fp8"]
        monkeypatch.setenv(TT.MOE_QUANT_H_ENV, "invalid")  # read at lowering time only
        lower(x.bfloat16(), rw, ids, w13, w13, w13, w13, True)
        assert seen.pop() == want, (value, kind)


def test_fused_norm_form_of_the_moe_takes_quant_h(seed, monkeypatch):
    """dsv3_aoti::moe_experts_fp8_q (the MoE of the fused RMSNorm + act_quant rewrite, x already
    quantized) with quant_h: one GEMM launch writes hq, hs (no act_quant at all) and the output equals
    quant_h=False's bit for bit."""
    from dsv3_export.engines import torch_norm_quant as NQ
    from dsv3_export.engines import torch_triton as TT

    monkeypatch.setenv(TT.MOE_ALIGN_ENV, "kernel")
    x, w13, ids, rw = _case(seed, 3, 200)
    d = x.shape[1]
    (w13q, w13s), (w2q, w2s) = _quantize(w13), _quantize(torch.randn(w13.shape[0], d, 200) / 200**0.5)
    xq, xs = Q.act_quant(x.bfloat16())
    args = (xq, xs, rw.bfloat16(), ids, w13q, w13s, w2q, w2s, TT.BLOCK_M["decode"], torch.bfloat16)
    grids = _recorded_grids(monkeypatch, TT, "_launch")
    base = NQ.moe_experts_fp8_q(*args, False)
    assert [name for name, _ in grids] == ["_grouped_gemm_kernel", "_act_quant_ieee_kernel", "_grouped_gemm_kernel"]
    grids.clear()
    got = NQ.moe_experts_fp8_q(*args, True)
    assert [name for name, _ in grids] == ["_grouped_gemm_kernel", "_grouped_gemm_kernel"], grids
    assert_finite("moe_experts_fp8_q quant_h", got)
    assert torch.equal(got, base), f"{int((got != base).sum())} of {got.numel()} outputs differ"
