"""engines/torch_triton.py DSV3_TORCH_MOE_ALIGN=scan: the decode program's grouped GEMMs find their
rows in topk_ids themselves (kernels/moe.py grouped_gemm_scan), no moe_align launch; prefill keeps
the alignment kernel.

Numerics in the Triton CPU interpreter (a subprocess: TRITON_INTERPRET must be set before the
kernels are decorated): the tiny bf16 model's fp8 programs lowered for CUDA as engines/torch.py
lower_program lowers them, scan against kernel, random inputs, fresh seed (decode; prefill's
launches: the traced test). Bit for bit: the decode
batch's T*k fits one chunk, where the scan runs each expert's rows in the aligned kernel's row
groups with the same K loop and epilogue (tests/kernels/test_moe_scan.py), and everything else is
the same program. Also with the fused RMSNorm + act_quant rewrite (its own MoE op, the same
alignment helper). Traced: a dynamic token dim, the launches of a package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r'''
import os, sys, json
os.environ["TRITON_INTERPRET"] = "1"
import torch
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_norm_quant import fuse_norm_act_quant
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.export import export_step
from dsv3_export.kernels import moe as km
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.pipeline import run_pipeline
from dsv3_export.reference import ModelArgs, Transformer
from tests.conftest import rel_err
from tests.passes.tiny_programs import step_inputs

launches = []
for name in ("grouped_gemm_spec", "grouped_gemm_scan_spec"):
    real = getattr(km, name)
    setattr(km, name, lambda *a, _real=real, _name=name, **kw: launches.append(_name) or _real(*a, **kw))
align = km.moe_align
km.moe_align = lambda *a, **kw: launches.append("moe_align") or align(*a, **kw)

seed, out = int(sys.argv[1]), {}
torch.manual_seed(0)
model = Transformer(ModelArgs.preset("tiny"), dtype=torch.bfloat16).eval()
for kind in ("decode",):  # prefill keeps the alignment: the traced test below
    program, _ = run_pipeline(export_step(model, kind), PassConfig(precision="fp8"))
    inputs = step_inputs(kind, seed, torch.bfloat16)
    with torch.no_grad():
        want = program.module()(*inputs)
    for norm in ("0", "1"):
        os.environ["DSV3_TORCH_NORM_QUANT"] = norm
        rewritten, _ = fuse_norm_act_quant(program, kind)
        got = {}
        for form in ("scan", "kernel"):
            os.environ["DSV3_TORCH_MOE_ALIGN"] = form
            key = f"{kind}_norm{norm}_{form}"
            table = triton_lowerings(kind)
            lowered, _ = lower_dsv3_ops(rewritten, "cuda", table)
            out[key + "_how"] = table["dsv3::moe_experts_fp8"].how
            launches.clear()
            with torch.no_grad():
                got[form] = lowered.module()(*inputs)
            out[key + "_launches"] = {n: launches.count(n) for n in set(launches)}
            out[key + "_finite"] = all(bool(torch.isfinite(g.float()).all()) for g in got[form])
            out[key + "_rel_program"] = [rel_err(g, w) for g, w in zip(got[form], want)]
        out[f"{kind}_norm{norm}_equal"] = all(torch.equal(a, b) for a, b in zip(got["scan"], got["kernel"]))
print(json.dumps(out))
'''


@pytest.mark.slow  # ~50 s: the tiny decode program exported, lowered 4 times and run by the interpreter
def test_tiny_fp8_decode_program_scan_vs_kernel_in_the_interpreter(seed):
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(seed % 2**31)], check=False, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    moe_layers = 2  # tiny: 3 layers, the first dense
    aligned = {"moe_align": moe_layers, "grouped_gemm_spec": 2 * moe_layers}
    for norm in ("0", "1"):  # the decode program without and with the fused RMSNorm + act_quant rewrite
        # scan: 2 scan GEMMs per MoE layer, no alignment, no aligned GEMM
        assert out[f"decode_norm{norm}_scan_launches"] == {"grouped_gemm_scan_spec": 2 * moe_layers}, out
        assert "no moe_align: grouped_gemm_scan" in out[f"decode_norm{norm}_scan_how"], out
        assert out[f"decode_norm{norm}_kernel_launches"] == aligned, out
        assert "moe_align kernel" in out[f"decode_norm{norm}_kernel_how"], out
        assert out[f"decode_norm{norm}_equal"], f"decode norm={norm}: scan and kernel differ (seed {seed})"
    for key in ("decode_norm0_scan", "decode_norm0_kernel", "decode_norm1_scan", "decode_norm1_kernel"):
        assert out[key + "_finite"], key
        # against the unlowered program: the router/MoE/attention roundings differ (bf16 truncation in the
        # interpreter, fp8 rounding flips); the bound of the router test's bf16 programs
        assert max(out[key + "_rel_program"]) < 0.2, f"{key}: {out[key + '_rel_program']} (seed {seed})"


def test_traced_with_a_dynamic_token_dim_launches_no_alignment():
    """A package's launches (tests/engines/test_torch_engine.py's traced bf16 + fp8 MoE module, token
    dim dynamic): with scan the decode program has 4 scan GEMMs, no moe_align kernel and no ATen
    sort; prefill keeps moe_align."""
    pytest.importorskip("triton")
    from tests.engines.test_torch_engine import _MOE_ALIGN_TRACE_SCRIPT

    for kind, want in (("decode", {"_grouped_gemm_scan_kernel": 4}), ("prefill", {"_grouped_gemm_kernel": 4,
                                                                                  "_moe_align_kernel": 2})):
        done = subprocess.run([sys.executable, "-c", _MOE_ALIGN_TRACE_SCRIPT, "scan", kind, "0"], check=False,
                              capture_output=True, text=True, timeout=300, env=os.environ.copy())
        assert done.returncode == 0, done.stderr[-3000:]
        out = dict((line.split(" ", 1) + [""])[:2] for line in done.stdout.strip().split("\n"))
        kernels = out["kernels"].split(",")
        moe = {k: kernels.count(k) for k in set(kernels) if "grouped_gemm" in k or "moe_align" in k}
        assert moe == want, (kind, out)
        assert kernels.count("_act_quant_ieee_kernel") == 2 and out["aten"] == "", out
        assert int(out["dims"]) == 1, out  # the token dim stays dynamic


def test_scan_is_not_the_default_and_names_its_form(monkeypatch):
    pytest.importorskip("triton")
    import torch

    from dsv3_export.engines import torch_triton as tt

    assert tt.MOE_ALIGN_DEFAULT == "kernel" and "scan" in tt.MOE_ALIGN_FORMS
    monkeypatch.delenv(tt.MOE_ALIGN_ENV, raising=False)
    assert "moe_align kernel" in tt.triton_lowerings("decode")["dsv3::moe_experts"].how
    monkeypatch.setenv(tt.MOE_ALIGN_ENV, "scan")
    assert "grouped_gemm_scan" in tt.triton_lowerings("decode")["dsv3::moe_experts"].how
    assert "moe_align kernel" in tt.triton_lowerings("prefill")["dsv3::moe_experts"].how
    ids = torch.zeros(2, 3, dtype=torch.int64)
    assert isinstance(tt._moe_align(ids, 4, tt.BLOCK_M["decode"]), tt.ScanRouting)  # nothing launched
    monkeypatch.setenv(tt.MOE_ALIGN_ENV, "scan2")
    with pytest.raises(ValueError, match="DSV3_TORCH_MOE_ALIGN='scan2'"):
        tt.triton_lowerings("decode")
