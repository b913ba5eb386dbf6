"""engines/torch_triton.py DSV3_TORCH_DECODE_GEMV (default auto: on for a decode program traced above batch
2): the decode program's small fp8 Linears run kernels/fp8_gemv.py at batch <= GEMV_MAX_ROWS and act_quant
+ the tile GEMM above, from one program.

Numerics in the Triton CPU interpreter (a subprocess: TRITON_INTERPRET is set before the kernels are
decorated): dsv3_aoti::fp8_linear with the switch on equals, bit for bit, the GEMV alone at M <= 2 and
the switch-off op (act_quant + tile GEMM) above, both with and without split-K partials (summed by the
sum kernel, which the GEMV's batches skip, or by Inductor's c.sum: the GEMV then writes split 0 and zeros
the rest), and is within the fp8 GEMM tolerance of dequantize-then-matmul;
W_UV's head_gemv (DSV3_TORCH_HEAD_GEMV) equals head_gemv at M <= 2 and head_gemm above (traced: both
launches, gated); dsv3_aoti::mla_attention with the split merge in W_UV's launch (DSV3_TORCH_MERGE_UV) equals,
bit for bit, the op without it at batch 1, 2 (kernels/mla_merge_uv.py against the reduce kernel + head_gemv)
and 3 (the reduce kernel + head_gemm either way), ragged cache lengths.
Traced (no interpreter): the op holds both paths, each launch's grid gated by the symbolic batch (no
guard, the batch stays dynamic); the MLA op's grids evaluated at batch 1 leave the reduce kernel out.
"""

from __future__ import annotations

import pytest

from tests.engines._program_script import SCRIPT_PREAMBLE, run_script
from tests.kernels._helpers import TOL

_SCRIPT = SCRIPT_PREAMBLE + r'''
import torch
from dsv3_export.engines import torch_launch, torch_triton as tt, torch_triton_mla as tm
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
        tile = kg.fp8_gemm(*R.act_quant(x), w, s, torch.float32, shape_class="decode", split_k=split, variant="tile")
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
                return tm._head_gemm(lat, self.w.transpose(1, 2), gemv=True)  # [h, c, dv], c contiguous

        ep = export(Head(), (torch.randn(3, 3, 130, generator=g),), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
        kernels = ep.run_decompositions({}, decompose_custom_triton_ops=True)
        out["head_launches"] = sum(nd.op == "call_function" and "triton_kernel_wrapper" in str(nd.target)
                                   for nd in kernels.graph.nodes)
        break
    both = tm._head_gemm(lat, w_uv, gemv=True)
    gemv, tile = ka.head_gemv(lat, w_uv), ka.head_gemm(lat, w_uv)
    # the two forms sum in other orders: their fp32 results differ, so equality names the path that ran
    out[f"head_m{m}"] = dict(equal_gemv=bool(torch.equal(both, gemv)), equal_tile=bool(torch.equal(both, tile)),
                             forms_differ=not torch.equal(gemv, tile))
# MLA decode's split merge + W_UV in one launch at batch <= 2 (DSV3_TORCH_MERGE_UV: mla_attention's merge_uv)
h, dn, dv, c, r, T = 3, 24, 37, 130, 16, 50
wkv_b = (torch.randn(h * (dn + dv), c, generator=g) * c**-0.5).bfloat16()


def mla_inputs(m):
    return (torch.randn(m, 1, h, dn, generator=g).bfloat16(), torch.randn(m, 1, h, r, generator=g).bfloat16(),
            torch.randn(m, 1, c + r, generator=g).bfloat16(), torch.randn(m, T, c + r, generator=g).bfloat16(),
            torch.tensor([7, 0, 49][:m]))  # ragged cached lengths; 0: the new key only


if mode == "trace":
    from torch.export import Dim, export
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    class Attn(torch.nn.Module):
        def __init__(self, merge):
            super().__init__()
            self.merge = merge
            self.register_buffer("wkv_b", wkv_b)

        def forward(self, q_nope, q_pe, kv_new, kv_cache, start_pos):
            return tm.mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, self.wkv_b, 0.25, True, True, True,
                                    self.merge)

    for merge in (True, False):
        batch = Dim("batch", min=1, max=64)
        ep = export(Attn(merge), mla_inputs(3), dynamic_shapes=({0: batch},) * 5, strict=False)
        kernels = ep.run_decompositions({}, decompose_custom_triton_ops=True)
        launches = []  # (kernel, its first config's grid as sympy expressions of the batch)
        for nd in kernels.graph.nodes:
            if nd.op == "call_function" and "triton_kernel_wrapper" in str(nd.target):
                kernel = kernel_side_table.get_kernel(nd.kwargs["kernel_idx"])
                grid = [x.meta["val"].node.expr if isinstance(x, torch.fx.Node) else x for x in nd.kwargs["grid"][0]]
                launches.append((getattr(getattr(kernel, "fn", kernel), "__name__", "?"), grid))

        def runs_at(b):  # the kernels whose grid is not empty at batch b
            size = lambda e: int(e.subs({s: b for s in e.free_symbols})) if hasattr(e, "free_symbols") else e
            return [name for name, grid in launches if all(size(e) > 0 for e in grid)]

        key = "on" if merge else "off"
        out[f"mla_{key}_program"] = [name for name, _ in launches]
        out[f"mla_{key}_at_1"], out[f"mla_{key}_at_3"] = runs_at(1), runs_at(3)
else:
    ran, launch = [], torch_launch.launch_spec

    def recording_launch(spec):  # the lowering's gated launches (the split and reduce kernels launch in kd)
        if spec is not None:
            ran.append(spec.kernel.fn.__name__)
        launch(spec)

    torch_launch.launch_spec = recording_launch
    for m in (1, 2, 3):
        args = mla_inputs(m)
        ran.clear()
        on = tm.mla_attention(*args, wkv_b, 0.25, True, True, True, True)
        launched_on = ran[:]
        ran.clear()
        off = tm.mla_attention(*args, wkv_b, 0.25, True, True, True, False)
        out[f"mla_m{m}"] = dict(equal=bool(torch.equal(on, off)), finite=bool(torch.isfinite(on.float()).all()),
                                on=launched_on, off=ran[:])
    torch_launch.launch_spec = launch
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
    for m in (1, 2, 3):  # MLA decode: the merge in W_UV's launch at m <= 2; the reduce kernel + head_gemm above
        mla = out.pop(f"mla_m{m}")
        assert mla["equal"] and mla["finite"], (m, mla)  # the same bits as without the merged launch
        merged = ["_mla_merge_uv_kernel"] if m <= 2 else ["_mla_decode_reduce_kernel", "_head_gemm_kernel"]
        assert mla["on"] == ["_head_gemm_kernel", *merged], (m, mla)  # W_UK's head_gemm first
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
    # MLA decode (W_UK's head_gemm, the split kernel, then): at batch 1 the merged launch alone, the reduce kernel's
    # grid empty (one launch fewer than the reduce kernel + head_gemv); at batch 3 the same launches either way
    w_uk_split = ["_head_gemm_kernel", "_mla_decode_split_kernel"]
    assert out["mla_on_at_1"] == [*w_uk_split, "_mla_merge_uv_kernel"], out
    assert out["mla_off_at_1"] == [*w_uk_split, "_mla_decode_reduce_kernel", "_head_gemv_kernel"], out
    assert out["mla_on_at_3"] == out["mla_off_at_3"] == [*w_uk_split, "_mla_decode_reduce_kernel",
                                                           "_head_gemm_kernel"], out
    assert len(out["mla_on_program"]) == len(out["mla_off_program"]) == 5, out
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


def test_merge_uv_switch(monkeypatch):
    """DSV3_TORCH_MERGE_UV: on by default with head_gemv, named in the manifest's lowering line; `0` or head_gemv
    off leave it out; other values are refused."""
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_triton as tt
    from dsv3_export.engines import torch_triton_mla as tm

    def how():
        return tt.triton_lowerings("decode")["dsv3::mla_attention"].how

    assert "head_gemv" in how() and "kernels/mla_merge_uv.py" in how(), how()
    monkeypatch.setenv(tm.MERGE_UV_ENV, "0")
    assert "head_gemv" in how() and "mla_merge_uv" not in how(), how()
    monkeypatch.setenv(tm.MERGE_UV_ENV, "1")
    monkeypatch.setenv(tm.HEAD_GEMV_ENV, "0")
    assert "mla_merge_uv" not in how(), how()
    monkeypatch.delenv(tm.HEAD_GEMV_ENV)  # read only with head_gemv on, as head_gemv's only with the GEMV
    monkeypatch.setenv(tm.MERGE_UV_ENV, "on")
    with pytest.raises(ValueError, match="DSV3_TORCH_MERGE_UV='on'"):
        tt.triton_lowerings("decode")
