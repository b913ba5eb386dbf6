"""engines/torch_scaled_mm.py and DSV3_TORCH_PREFILL_GEMM (engines/torch_triton.py): the prefill program's fp8
Linears whose K is a multiple of 512 and N of 16 run act_quant + blockwise torch._scaled_mm (cuBLAS) instead of the
Triton GEMM.

CPU, in subprocesses (tests/engines/_program_script.py):
  interpret  act_quant_padded under the Triton interpreter: its first M rows are act_quant's, bit for bit, in
             buffers of round_up(M, 16) rows, the scales outer-dim-major (strides (1, M')), as cuBLAS needs
  trace      a program of three fp8 Linears (N x K: 208 x 1024 W8A8 on a [B, S, K] x with both dims dynamic,
             72 x 640 W8A8, 208 x 1024 weight-only) lowered as engines/torch.py lowers for CUDA, its triton_ops
             decomposed: which reach aten._scaled_mm per switch value and program kind (cublas: the first, prefill
             only; triton: none; auto: none without a GPU, and the build's record says why; as cublas where the
             GPU's check passes), with M symbolic (no guard from the padded rows)
CPU, in process: which weight shapes the path takes, and the errors for the rest.
GPU (skipped without CUDA, or where the check reports cuBLAS refusing the mode): fp8_linear_cublas against the op's
reference math at ragged M, with the padded rows of its buffers NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch

from tests.engines._program_script import SCRIPT_PREAMBLE, run_script
from tests.kernels._helpers import TOL, mean_rel

_SCRIPT = SCRIPT_PREAMBLE + r'''
import torch
from dsv3_export.engines import torch_scaled_mm as sm

g = torch.Generator().manual_seed(seed)
out = {}
if mode == "interpret":
    from dsv3_export.kernels import fp8_quant as kq

    for m in (1, 5, 16, 37):
        x = torch.randn(m, 640, generator=g, dtype=torch.bfloat16) * 3
        q, scale_a = sm.act_quant_padded(x)
        q_ref, s_ref = kq.act_quant(x)
        out[f"m{m}"] = dict(rows=q.shape[0], scale_shape=list(scale_a.shape), scale_stride=list(scale_a.stride()),
                            q_equal=bool(torch.equal(q[:m].view(torch.uint8), q_ref.view(torch.uint8))),
                            s_equal=bool(torch.equal(scale_a[:m], s_ref)))
else:
    from torch.export import Dim, export

    import dsv3_export.ops  # noqa: F401  registers dsv3::
    from dsv3_export.engines.torch_lower import lower_dsv3_ops
    from dsv3_export.engines.torch_triton import PREFILL_GEMM_ENV, prefill_cublas, triton_lowerings
    from dsv3_export.reference import fp8 as R

    w_a, s_a = R.weight_quant(torch.randn(208, 1024, generator=g) / 32)  # K = 1024, N = 13 x 16: cuBLAS takes it
    w_b, s_b = R.weight_quant(torch.randn(72, 640, generator=g) / 25)  # K = 640: the Triton GEMM keeps it

    class Three(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in (("w_a", w_a), ("s_a", s_a), ("w_b", w_b), ("s_b", s_b)):
                self.register_buffer(name, t)

        def forward(self, x, y):
            return (torch.ops.dsv3.fp8_linear(x, self.w_a, self.s_a, True),
                    torch.ops.dsv3.fp8_linear(y, self.w_b, self.s_b, True),
                    torch.ops.dsv3.fp8_linear(x, self.w_a, self.s_a, False))

    b, s, m = Dim("b", min=2, max=8), Dim("s", min=2, max=4096), Dim("m", min=2, max=8192)
    args = (torch.randn(2, 3, 1024, dtype=torch.bfloat16), torch.randn(5, 640, dtype=torch.bfloat16))
    ep = export(Three(), args, dynamic_shapes=({0: b, 1: s}, {0: m}))
    for choice in ("cublas", "triton", "auto"):
        os.environ[PREFILL_GEMM_ENV] = choice  # read when a program is lowered
        for kind in ("prefill", "decode"):
            lowered, how = lower_dsv3_ops(ep, "cuda", triton_lowerings(kind))
            kernels = lowered.run_decompositions({}, decompose_custom_triton_ops=True)
            gemms = [n for n in kernels.graph.nodes if n.target == torch.ops.aten._scaled_mm.default]
            out[f"{choice}_{kind}"] = dict(
                scaled_mm=[list(n.args[1].meta["val"].shape) for n in gemms],  # [K, N] of each cuBLAS GEMM
                how=how["dsv3::fp8_linear"],
                rows=[str(n.meta["val"].shape[0]) for n in gemms],  # M' = round_up(B * S, 16), not a number
                outputs=[str(list(n.meta["val"].shape)) for n in kernels.graph.output_node().args[0]])
    os.environ[PREFILL_GEMM_ENV] = "auto"
    out["auto_takes_cublas"] = prefill_cublas("prefill")[0]  # on a GPU whose blockwise check passes
    out["cuda"] = torch.cuda.is_available()
    os.environ[PREFILL_GEMM_ENV] = "fast"
    try:
        triton_lowerings("prefill")
    except ValueError as e:
        out["bad_value"] = str(e)
print(json.dumps(out))
'''


# torch < 2.13's wrap_triton refuses the interpreter's kernels, which engines/torch_launch.py launch_spec hands it
# in that mode (seen with torch 2.11 on the GPU machine, session 30)
_INTERPRETED_LAUNCH = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


@pytest.mark.skipif(not _INTERPRETED_LAUNCH, reason="torch < 2.13: wrap_triton refuses interpreted kernels")
def test_act_quant_padded_rows_and_scale_layout(seed):
    result = run_script(_SCRIPT, "interpret", seed)
    for m in (1, 5, 16, 37):
        got = result[f"m{m}"]
        rows = -(-m // 16) * 16
        assert got["rows"] == rows and got["scale_shape"] == [rows, 5], got
        assert got["scale_stride"] == [1, rows], got  # outer-dim-major, leading dimension M'
        assert got["q_equal"] and got["s_equal"], got


def test_prefill_lowering_sends_k512_weights_to_scaled_mm():
    result = run_script(_SCRIPT, "trace")
    cublas = result["cublas_prefill"]
    assert cublas["scaled_mm"] == [[1024, 208]], result  # only the K=1024 W8A8 Linear
    assert "_scaled_mm" in cublas["how"], cublas  # the build's record says so
    assert not cublas["rows"][0].isdigit(), cublas  # M' symbolic: no guard pinned the batch or sequence
    assert cublas["outputs"] == result["triton_prefill"]["outputs"], result  # [B, S, 208] etc., as the Triton GEMM's
    for key in ("cublas_decode", "triton_prefill", "triton_decode", "auto_decode"):
        assert result[key]["scaled_mm"] == [] and "_scaled_mm" not in result[key]["how"], (key, result[key])
    assert result["cuda"] or not result["auto_takes_cublas"], result  # auto: never cuBLAS without a GPU
    if result["auto_takes_cublas"]:
        assert result["auto_prefill"]["scaled_mm"] == cublas["scaled_mm"], result
    else:
        assert result["auto_prefill"]["scaled_mm"] == [], result
        assert "prefill without cuBLAS: " in result["auto_prefill"]["how"], result  # and why, in the record
    assert "DSV3_TORCH_PREFILL_GEMM='fast'" in result["bad_value"] and "cublas" in result["bad_value"], result


def test_cublas_suits_and_refusals():
    from dsv3_export.engines.torch_scaled_mm import cublas_suits, fp8_linear_cublas

    assert cublas_suits(3648, 2048) and cublas_suits(10944, 2048) and cublas_suits(208, 1024)
    assert not cublas_suits(2048, 10944)  # K: 86 blocks, which cuBLAS reads 88 apart
    assert not cublas_suits(208, 640)  # K only
    assert not cublas_suits(200, 1024)  # N only
    w = torch.zeros(200, 1024, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"weight \[200, 1024\] needs K a multiple of 512 and N of 16"):
        fp8_linear_cublas(torch.zeros(3, 1024, dtype=torch.bfloat16), w, torch.ones(2, 8))
    w = torch.zeros(208, 1024, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="x must be bf16"):
        fp8_linear_cublas(torch.zeros(3, 1024, dtype=torch.float16), w, torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"needs contiguous scales \[2, 8\]"):
        fp8_linear_cublas(torch.zeros(3, 1024, dtype=torch.bfloat16), w, torch.ones(8, 2).t())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS's blockwise fp8 GEMM needs a CUDA GPU (sm_90+)")
def test_fp8_linear_cublas_matches_the_op_reference(seed, monkeypatch):
    from dsv3_export.engines.torch_scaled_mm import blockwise_check, fp8_linear_cublas
    from dsv3_export.kernels import fp8_quant as kq
    from dsv3_export.ops.fp8 import fp8_matmul
    from dsv3_export.reference.fp8 import weight_quant

    why_not = blockwise_check(torch.cuda.current_device())
    if why_not and "is wrong" not in why_not:
        pytest.skip(why_not)  # refused (an older GPU or cuBLAS): auto falls back; a wrong product fails below
    assert why_not is None

    allocate = kq.act_quant_outputs

    def poisoned(rows, cols, device):  # the padded rows past M hold NaN: no output row may read them
        q, s = allocate(rows, cols, device)
        return q.view(torch.uint8).fill_(0x7F).view(q.dtype), s.fill_(float("nan"))

    monkeypatch.setattr(kq, "act_quant_outputs", poisoned)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for n, k in ((208, 1024), (576, 2048), (3648, 2048)):
        w, w_s = weight_quant(torch.randn(n, k, device="cuda", generator=g) / k**0.5)
        for m in (1, 5, 33, 300):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g) * 2
            got = fp8_linear_cublas(x, w, w_s)
            want = fp8_matmul(x, w, w_s, True)  # the op's math: the same quantized x, fp32 sums, one bf16 rounding
            assert got.shape == (m, n) and torch.isfinite(got).all()
            assert mean_rel(got, want) < TOL["fp8_gemm_bf16_out"], (n, k, m)
