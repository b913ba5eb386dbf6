"""engines/torch_triton.py DSV3_TORCH_DECODE_GEMV (default auto: on for a decode program traced above batch
2): the decode program's small fp8 Linears run kernels/fp8_gemv.py at batch <= GEMV_MAX_ROWS and act_quant
+ the tile GEMM above, from one program.

Numerics in the Triton CPU interpreter (a subprocess: TRITON_INTERPRET is set before the kernels are
decorated): dsv3_aoti::fp8_linear with the switch on equals, bit for bit, the GEMV alone at M <= 2 and
the switch-off op (act_quant + tile GEMM) above, both with and without split-K partials (summed by the
sum kernel, which the GEMV's batches skip, or by Inductor's c.sum: the GEMV then writes split 0 and zeros
the rest), and is within the fp8 GEMM tolerance of dequantize-then-matmul;
W_UV's head_gemv (DSV3_TORCH_HEAD_GEMV) equals head_gemv at M <= 2 and head_gemm above (traced: both
launches, gated).
Traced (no interpreter): the op holds both paths, each launch's grid gated by the symbolic batch (no
guard, the batch stays dynamic).
"""

from __future__ import annotations

import pytest

from tests.engines._program_script import SCRIPT_PREAMBLE, run_script
from tests.kernels._helpers import TOL

_SCRIPT = SCRIPT_PREAMBLE + r'''
import torch
from dsv3_export.engines import torch_triton as tt
from dsv3_export.kernels import fp8_gemm as kg
from dsv3_export.kernels import fp8_gemv as kv
from dsv3_export.reference import fp8 as R

g = torch.Generator().manual_seed(seed)
out = {}
for n, k, sum_form in ((200, 1000, "kernel"), (200, 1000, "inductor"), (72, 300, "kernel")):  # split-K 4, no split
    kernel_sum = sum_form == "kernel"  # what the lowering passes (engines/torch_triton.py SPLIT_K_SUM_ENV)
    w, s = R.weight_quant(torch.randn(n, k, generator=g) / k**0.5)
    split = kg._choose_split_k(tt.FP8_DECODE_M, n, -(-k // 128), torch.device("cpu"))
    for m in (1, 2, 3):  # the GEMV up to GEMV_MAX_ROWS = 2, the tile path above
        x = torch.randn(m, k, generator=g) * 2
        key = f"n{n}_k{k}_{sum_form}_m{m}"
        if mode == "trace":
            from torch.export import Dim, export

            class Linear(torch.nn.Module):  # buffers: on a CPU the mutation analysis (no GPU driver) flags every input
                def __init__(self):
                    super().__init__()
                    self.register_buffer("w", w)
                    self.register_buffer("s", s)

                def forward(self, x):
                    return tt.fp8_linear(x, self.w, self.s, True, True, True, kernel_sum)

            x3 = torch.randn(3, k, generator=g)  # batch 1 would specialize (torch.export's 0/1 rule)
            ep = export(Linear(), (x3,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
            from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

            kernels = ep.run_decompositions({}, decompose_custom_triton_ops=True)
            launched = [kernel_side_table.get_kernel(nd.kwargs["kernel_idx"]) for nd in kernels.graph.nodes
                        if nd.op == "call_function" and "triton_kernel_wrapper" in str(nd.target)]
            out[key + "_launches"] = len(launched)
            # the GEMV goes in as a one-config autotuner: Inductor compiles a bare kernel with its own
            # default warps and stages, not the config's
            gemv = [k for k in launched if getattr(getattr(k, "fn", None), "__name__", "") == "_fp8_gemv_kernel"]
            out[key + "_gemv_configs"] = [[c.num_warps, c.num_stages, c.kwargs] for k in gemv for c in k.configs]
            break
        on = tt.fp8_linear(x, w, s, True, True, True, kernel_sum)
        off = tt.fp8_linear(x, w, s, True, True, False, kernel_sum)
        gemv = kv.fp8_gemv(x, w, s, torch.float32)
        tile = kg.fp8_gemm(*R.act_quant(x), w, s, torch.float32, shape_class="decode", split_k=split)
        ref = kg.fp8_gemm_ref(*R.act_quant(x), w, s, torch.float32)
        out[key] = dict(split=split, equal_gemv=bool(torch.equal(on, gemv)), equal_off=bool(torch.equal(on, off)),
                        off_rel_tile=((off - tile).abs().max() / tile.abs().max()).item(),
                        rel=((on - ref).abs().mean() / ref.abs().mean()).item(),
                        finite=bool(torch.isfinite(on).all()))
from dsv3_export.kernels import mla_absorb as ka  # W_UV at batch <= 2 by head_gemv (DSV3_TORCH_HEAD_GEMV)
for m in (1, 2, 3):
    w_uv = torch.randn(3, 40, 130, generator=g).transpose(1, 2)  # [h, c, dv] with c contiguous
    lat = torch.randn(m, 3, 130, generator=g)
    if mode == "trace":
        from torch.export import Dim, export
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

        class Head(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("w", torch.randn(3, 40, 130, generator=g))  # wkv_b's W_UV rows [h, dv, c]

            def forward(self, lat):
                return tt._head_gemm(lat, self.w.transpose(1, 2), gemv=True)  # [h, c, dv], c contiguous

        ep = export(Head(), (torch.randn(3, 3, 130, generator=g),), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
        kernels = ep.run_decompositions({}, decompose_custom_triton_ops=True)
        out["head_launches"] = sum(nd.op == "call_function" and "triton_kernel_wrapper" in str(nd.target)
                                   for nd in kernels.graph.nodes)
        break
    both = tt._head_gemm(lat, w_uv, gemv=True)
    gemv, tile = ka.head_gemv(lat, w_uv), ka.head_gemm(lat, w_uv)
    # the two forms sum in other orders: their fp32 results differ, so equality names the path that ran
    out[f"head_m{m}"] = dict(equal_gemv=bool(torch.equal(both, gemv)), equal_tile=bool(torch.equal(both, tile)),
                             forms_differ=not torch.equal(gemv, tile))
print(json.dumps(out))
'''


def test_small_batches_take_the_gemv_and_the_rest_the_tile_gemm(seed):
    """Both DSV3_TORCH_SPLIT_K_SUM forms: the split-K sum by the sum kernel (default), which the GEMV's
    batches skip (the GEMV then writes the output itself), or by Inductor (c.sum); the same results."""
    out = run_script(_SCRIPT, "interpret", seed)
    assert out["n200_k1000_kernel_m1"]["split"] > 1 and out["n72_k300_kernel_m1"]["split"] == 1, out
    for m in (1, 2, 3):  # W_UV: head_gemv at m <= 2, head_gemm above
        head = out.pop(f"head_m{m}")
        assert head["forms_differ"] and head["equal_gemv" if m <= 2 else "equal_tile"], (m, head)
    for key, r in out.items():
        m = int(key.rsplit("_m", 1)[1])
        assert r["finite"] and r["rel"] < TOL["fp8_gemm_fp32_out"], (key, r)
        # the switch-off op is act_quant + the tile GEMM + its split-K sum: fp8_gemm's, up to the sum's order
        assert r["off_rel_tile"] < 1e-6, (key, r)
        if m <= 2:
            assert r["equal_gemv"], (key, r)
        else:
            assert r["equal_off"], (key, r)


def test_traced_op_keeps_both_paths_with_the_gemv_config():
    """Exported with a dynamic batch (a guard on it would fail the export): both paths' launches, and the
    GEMV with GEMV_CONFIGS[0]'s warps and stages."""
    pytest.importorskip("triton")
    from dsv3_export.kernels.fp8_gemv import GEMV_CONFIGS

    out = run_script(_SCRIPT, "trace")
    # GEMV, act_quant, tile GEMM; with split-K and the kernel sum (the default) also the sum kernel (Inductor's
    # sum is no user-kernel launch)
    assert out["n72_k300_kernel_m1_launches"] == out["n200_k1000_inductor_m1_launches"] == 3, out
    assert out["n200_k1000_kernel_m1_launches"] == 4, out
    assert out["head_launches"] == 2, out  # W_UV: head_gemv and head_gemm, each grid gated by the batch
    first = GEMV_CONFIGS[0]
    assert out["n200_k1000_kernel_m1_gemv_configs"] == [[first.num_warps, first.num_stages, first.kwargs]], out


def test_gemv_suits_the_small_weights_only():
    pytest.importorskip("triton")
    from dsv3_export.kernels import fp8_gemv as kv

    assert kv.gemv_suits(3648, 2048) and kv.gemv_suits(2048, 2048)  # 16b wq+wkv_a, wo
    assert not kv.gemv_suits(21888, 2048) and not kv.gemv_suits(2048, 10944)  # the dense MLP


def test_switch_rejects_unknown(monkeypatch):
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_decode_gemv as dg
    from dsv3_export.engines import torch_triton as tt

    monkeypatch.setenv(dg.DECODE_GEMV_ENV, "on")
    with pytest.raises(ValueError, match="DSV3_TORCH_DECODE_GEMV='on'"):
        tt.triton_lowerings("decode")


def test_switch_refuses_a_decode_program_traced_at_a_gemv_batch(monkeypatch):
    """Traced (so tuned) at batch 2 the tile GEMMs' configs would be timed on empty grids: `1` refuses
    such a program, `auto` (the default) leaves the GEMV out of it and keeps it for the default tune batch."""
    pytest.importorskip("triton")
    import torch

    from dsv3_export.engines import torch_decode_gemv as dg
    from dsv3_export.export import export_step, tune_shape
    from tests.passes.tiny_programs import tiny_model, tiny_program

    model = tiny_model(torch.bfloat16)
    at_2 = export_step(model, "decode", shape=tune_shape(model.args, "decode", batch=2))
    default = tiny_program("decode", torch.bfloat16)  # the default tune batch
    monkeypatch.setenv(dg.DECODE_GEMV_ENV, "1")
    with pytest.raises(ValueError, match="traced at batch 2"):
        dg.program_decode_gemv(at_2, "decode")
    assert dg.program_decode_gemv(default, "decode")
    assert not dg.program_decode_gemv(at_2, "prefill")  # not the decode program: the switch does not apply
    monkeypatch.delenv(dg.DECODE_GEMV_ENV)
    assert dg.traced_batch(at_2) == 2
    assert not dg.program_decode_gemv(at_2, "decode") and dg.program_decode_gemv(default, "decode")
    monkeypatch.setenv(dg.DECODE_GEMV_ENV, "0")
    assert not dg.program_decode_gemv(at_2, "decode") and not dg.program_decode_gemv(default, "decode")
