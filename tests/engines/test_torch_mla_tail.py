"""engines/torch_mla_tail.py: the fp8 decode attention's tail (merge, W_UV, wo's act_quant) as one kernel.

The tiny preset has v_head_dim 32 (a 1x128 block spans 4 heads: the rewrite does not apply), so the
numerics run on the tiny preset with v_head_dim = 128 (each head's output one block), bf16, fp8.

Numerics in the Triton CPU interpreter (a subprocess: TRITON_INTERPRET must be set before the kernels
are decorated): the decode program lowered for CUDA as engines/torch.py lower_program lowers it (every
op a triton_op, run by the interpreter on CPU tensors) with DSV3_TORCH_MLA_TAIL=1 against =0, random
inputs, fresh seed. Both run the same split kernel and the same GEMMs; they can differ only where the
tail sums in another order than reduce + head_gemm (now and then one bf16 step of y, then one e4m3
step of its code, kernels/mla_tail.py), which the tiny random network would amplify (fp8 noise, as in
test_torch_norm_quant): measured 0 (identical outputs) for seeds 11, 22, 33 and the first runs; bound
0.06, room for such a flip; a wrong head, scale or view is O(1). Against the unlowered program (ATen
op bodies, which round differently everywhere): measured 3.6-6.1%, the same with and without the
tail, bound 0.2 (the bf16 bound of test_torch_norm_quant).
The bf16 engine (no fp8 wo to rewrite; the same v128 model): with the switch its decode attention runs
the unquantized tail (merge + W_UV) instead of reduce + head_gemm: measured identical to the switch off
(seeds 5, 6), 0.6-1.1% from the unlowered program, bounds 0.04 / 0.05 (test_torch_absorb's).
DSV3_TORCH_MLA_TAIL=gemmq (the same rewrite; split + reduce, then kernels/mla_absorb.py head_gemm_quant for
W_UV and wo's act_quant) must not move a bit: its outputs, and every fp8 GEMM's quantized input (codes
and scales: a one-ulp scale would hide in the outputs), are torch.equal to the switch off's. The
interpreter's dot is numpy's matmul, whose summation order may change with the tile shape, so the
separate head_gemm runs with head_gemm_quant's tile there (BLOCK_N 128, the same BLOCK_M / BLOCK_K).
The traced form (no interpreter, decomposed as AOTInductor decomposes) is checked for the kernels it
launches: with `1` one tail kernel per layer, no reduce kernel, no W_UV head_gemm, 3 act_quant fewer;
with gemmq one head_gemm_quant per layer for W_UV's head_gemm and wo's act_quant (one launch fewer).
"""

from __future__ import annotations

import pytest
import torch

from tests.engines._program_script import SCRIPT_PREAMBLE, run_script

_SCRIPT = SCRIPT_PREAMBLE + r'''
import dataclasses
SWITCHES = ("1", "gemmq", "0")
import torch
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_mla_tail import fuse_mla_tail
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.export import export_step
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.pipeline import run_pipeline
from dsv3_export.reference import ModelArgs, Transformer
from tests.conftest import rel_err

args = dataclasses.replace(ModelArgs.preset("tiny"), v_head_dim=128)
torch.manual_seed(0)
model = Transformer(args, dtype=torch.bfloat16).eval()
program, _ = run_pipeline(export_step(model, "decode"), PassConfig(precision="fp8"))
gen = torch.Generator().manual_seed(seed)
b, t = 3, 11
inputs = (torch.randint(0, args.vocab_size, (b, 1), generator=gen), torch.tensor([0, 5, 11]),
          torch.randn(b, args.n_layers, t, args.kv_lora_rank + args.qk_rope_head_dim, generator=gen).to(torch.bfloat16))
if mode == "interpret":
    # head_gemm's interpreter config (HEAD_GEMM_CONFIGS[0]) with head_gemm_quant's first tile (BLOCK_N 128):
    # numpy's matmul (the interpreter's dot) may sum in another order for another tile shape
    import triton
    from dsv3_export.kernels import mla_absorb
    first = mla_absorb.HEAD_GEMM_QUANT_CONFIGS[0]
    mla_absorb.HEAD_GEMM_CONFIGS.insert(0, triton.Config({**first.kwargs, "BLOCK_N": 128}))
out, lowered = {}, {}
for switch in SWITCHES:
    os.environ["DSV3_TORCH_MLA_TAIL"] = switch
    fused, how = fuse_mla_tail(program, "decode")
    out[switch + "_how"] = how
    out[switch + "_ops"] = sorted(str(n.target) for n in fused.graph.nodes
                                  if n.op == "call_function" and "dsv3" in str(n.target))
    lowered[switch], _ = lower_dsv3_ops(fused, "cuda", triton_lowerings("decode"))
if mode == "interpret":
    from dsv3_export.kernels import mla_tail
    tails = []
    spec = mla_tail.mla_tail_spec
    mla_tail.mla_tail_spec = lambda *a: tails.append("q" if a[5] is not None else "bf16") or spec(*a)
    quant_spec = mla_absorb.head_gemm_quant_spec
    mla_absorb.head_gemm_quant_spec = lambda *a: tails.append("gemmq") or quant_spec(*a)
    # every fp8 GEMM's quantized input (wo's among them), bits: the outputs alone would hide a one-ulp scale
    from dsv3_export.engines import torch_triton
    gemm_inputs, fp8_gemm = [], torch_triton._fp8_gemm
    def recording_fp8_gemm(a, a_s, *rest, **kwargs):
        if a_s is not None:
            gemm_inputs.append((a.view(torch.uint8).clone(), a_s.clone()))
        return fp8_gemm(a, a_s, *rest, **kwargs)
    torch_triton._fp8_gemm = recording_fp8_gemm
    with torch.no_grad():
        want = program.module()(*inputs)
        got, quantized = {}, {}
        for k, v in lowered.items():
            tails.clear()
            gemm_inputs.clear()
            got[k] = v.module()(*inputs)
            out[k + "_tails"] = tails[:]
            quantized[k] = gemm_inputs[:]
    out["rel_switch"] = [rel_err(a, b) for a, b in zip(got["1"], got["0"])]
    out["gemmq_equal"] = [torch.equal(a, b) for a, b in zip(got["gemmq"], got["0"])]
    out["gemmq_fp8_inputs"] = [len(quantized["0"]), len(quantized["gemmq"]),
                               sum(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                   for a, b in zip(quantized["gemmq"], quantized["0"]))]
    for k in got:
        out[k + "_rel_program"] = [rel_err(g, w) for g, w in zip(got[k], want)]
        out[k + "_finite"] = all(bool(torch.isfinite(g.float()).all()) for g in got[k])
    # the bf16 engine: no fp8 wo to rewrite; the switch makes mla_attention's decode use the unquantized tail
    bf16, _ = run_pipeline(export_step(model, "decode"), PassConfig(precision="bf16"))
    with torch.no_grad():
        want = bf16.module()(*inputs)
        for switch in SWITCHES:
            os.environ["DSV3_TORCH_MLA_TAIL"] = switch
            low, how = lower_dsv3_ops(fuse_mla_tail(bf16, "decode")[0], "cuda", triton_lowerings("decode"))
            out[f"bf16_{switch}_how"] = how["dsv3::mla_attention"]
            tails.clear()
            got[switch] = low.module()(*inputs)
            out[f"bf16_{switch}_tails"] = tails[:]
            out[f"bf16_{switch}_rel_program"] = [rel_err(g, w) for g, w in zip(got[switch], want)]
    out["bf16_rel_switch"] = [rel_err(a, b) for a, b in zip(got["1"], got["0"])]
    out["bf16_gemmq_equal"] = [torch.equal(a, b) for a, b in zip(got["gemmq"], got["0"])]
else:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    for k, ep in lowered.items():
        kernels = ep.run_decompositions({}, decompose_custom_triton_ops=True)
        names = [getattr(getattr(kn, "fn", kn), "__name__", "?") for kn in
                 (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]) for n in kernels.graph.nodes
                  if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target))]
        out[k + "_kernels"] = {name: names.count(name) for name in set(names)}
        out[k + "_dims"] = [len(program.range_constraints), len(kernels.range_constraints)]
print(json.dumps(out))
'''


def _run(mode: str, seed: int = 0) -> dict:
    return run_script(_SCRIPT, mode, seed)


LAYERS = 3


def test_rewritten_decode_program_matches_in_the_interpreter(seed):
    out = _run("interpret", seed)
    assert out["1_how"].startswith(f"{LAYERS} of {LAYERS} MLA attentions"), out["1_how"]
    assert "DSV3_TORCH_MLA_TAIL=0" in out["0_how"], out["0_how"]
    ops = out["1_ops"]
    assert ops.count("dsv3_aoti.mla_attention_q.default") == LAYERS and "dsv3.mla_attention.default" not in ops
    assert ops.count("dsv3_aoti.fp8_linear_q.default") == LAYERS  # wo of each layer
    assert out["0_ops"].count("dsv3.mla_attention.default") == LAYERS
    assert out["1_finite"] and out["0_finite"]
    assert max(out["rel_switch"]) < 0.06, f"tail vs separate kernels: {out['rel_switch']} (seed {seed})"
    for switch in ("1", "0"):
        assert max(out[switch + "_rel_program"]) < 0.2, (switch, out[switch + "_rel_program"], seed)
    assert out["1_tails"] == ["q"] * LAYERS and out["0_tails"] == [], (out["1_tails"], out["0_tails"])
    # gemmq: the same rewrite, W_UV + act_quant in head_gemm_quant; the outputs the very same bits
    assert out["gemmq_how"].startswith(f"{LAYERS} of {LAYERS} MLA attentions") and "head_gemm_quant" in out["gemmq_how"]
    assert out["gemmq_ops"] == out["1_ops"], out["gemmq_ops"]
    assert out["gemmq_tails"] == ["gemmq"] * LAYERS and out["gemmq_finite"], out["gemmq_tails"]
    assert all(out["gemmq_equal"]), f"gemmq vs separate kernels: {out['gemmq_equal']} (seed {seed})"
    # ... and so are the fp8 GEMMs' quantized inputs (codes and scales), wo's included: [count, count, equal]
    n_gemm = out["gemmq_fp8_inputs"][0]
    assert n_gemm >= 2 * LAYERS and out["gemmq_fp8_inputs"] == [n_gemm] * 3, (out["gemmq_fp8_inputs"], seed)
    # bf16 engine: one unquantized tail per layer with the switch on
    assert out["bf16_1_tails"] == ["bf16"] * LAYERS and out["bf16_0_tails"] == [], out["bf16_1_tails"]
    assert "kernels/mla_tail.py" in out["bf16_1_how"] and "mla_tail" not in out["bf16_0_how"]
    assert max(out["bf16_rel_switch"]) < 0.04, f"bf16 tail vs separate kernels: {out['bf16_rel_switch']} ({seed})"
    # gemmq changes nothing in the bf16 engine (its W_UV has no act_quant after it)
    assert out["bf16_gemmq_tails"] == [] and "mla_tail" not in out["bf16_gemmq_how"], out["bf16_gemmq_tails"]
    assert all(out["bf16_gemmq_equal"]), out["bf16_gemmq_equal"]
    for switch in ("1", "0"):
        assert max(out[f"bf16_{switch}_rel_program"]) < 0.05, (switch, out[f"bf16_{switch}_rel_program"], seed)


def test_traced_program_launches_the_tail_kernel():
    out = _run("trace")
    tail, plain = out["1_kernels"], out["0_kernels"]
    assert tail.get("_mla_tail_kernel") == LAYERS and "_mla_tail_kernel" not in plain, (tail, plain)
    assert plain.get("_mla_decode_reduce_kernel") == LAYERS and "_mla_decode_reduce_kernel" not in tail
    assert tail.get("_mla_decode_split_kernel") == plain.get("_mla_decode_split_kernel") == LAYERS
    assert plain["_head_gemm_kernel"] - tail["_head_gemm_kernel"] == LAYERS  # W_UV; W_UK stays
    act_quant = {k: v.get("_act_quant_kernel", 0) + v.get("_act_quant_ieee_kernel", 0) for k, v in out.items()
                 if k.endswith("_kernels")}
    assert act_quant["0_kernels"] - act_quant["1_kernels"] == LAYERS, act_quant
    before, after = out["1_dims"]
    assert before == after and after >= 2, out["1_dims"]
    # gemmq: split + reduce as before; W_UV's head_gemm and wo's act_quant become one head_gemm_quant
    gemmq = out["gemmq_kernels"]
    assert gemmq.get("_head_gemm_quant_kernel") == LAYERS and "_mla_tail_kernel" not in gemmq, gemmq
    assert gemmq["_mla_decode_reduce_kernel"] == gemmq["_mla_decode_split_kernel"] == LAYERS, gemmq
    assert plain["_head_gemm_kernel"] - gemmq["_head_gemm_kernel"] == LAYERS, gemmq
    assert act_quant["0_kernels"] - act_quant["gemmq_kernels"] == LAYERS, act_quant
    assert sum(gemmq.values()) == sum(plain.values()) - LAYERS, (gemmq, plain)
    assert out["gemmq_dims"] == out["1_dims"], out["gemmq_dims"]


def test_where_it_does_not_apply(monkeypatch):
    """Switch off (the default) or unknown; prefill; bf16 engines (no fp8 wo); v_head_dim 32."""
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_mla_tail as mt
    from dsv3_export.passes.base import PassConfig
    from dsv3_export.passes.pipeline import run_pipeline
    from tests.passes.tiny_programs import tiny_program

    fp8 = run_pipeline(tiny_program("decode", torch.bfloat16), PassConfig(precision="fp8"))[0]
    assert mt.MLA_TAIL_DEFAULT == "0"  # not measured on the H200 yet
    monkeypatch.delenv(mt.MLA_TAIL_ENV, raising=False)
    program, how = mt.fuse_mla_tail(fp8, "decode")
    assert program is fp8 and "DSV3_TORCH_MLA_TAIL=0" in how
    monkeypatch.setenv(mt.MLA_TAIL_ENV, "1")
    program, how = mt.fuse_mla_tail(fp8, "decode")
    assert program is fp8 and how.startswith("0 of 3") and "v_head_dim 32" in how, how
    bf16 = run_pipeline(tiny_program("decode", torch.bfloat16), PassConfig(precision="bf16"))[0]
    program, how = mt.fuse_mla_tail(bf16, "decode")
    assert program is bf16 and how.startswith("0 of 3"), how
    prefill = run_pipeline(tiny_program("prefill", torch.bfloat16), PassConfig(precision="fp8"))[0]
    program, how = mt.fuse_mla_tail(prefill, "prefill")
    assert program is prefill and "prefill program" in how, how
    fp32 = run_pipeline(tiny_program("decode"), PassConfig(precision="fp8"))[0]
    program, how = mt.fuse_mla_tail(fp32, "decode")
    assert program is fp32 and "torch.float32 attention" in how, how
    monkeypatch.setenv(mt.MLA_TAIL_ENV, "yes")
    with pytest.raises(ValueError, match="DSV3_TORCH_MLA_TAIL='yes'"):
        mt.fuse_mla_tail(fp8, "decode")


def test_match_guards_on_a_v128_program(monkeypatch):
    """On a program where the rewrite applies, each guard's near miss names its reason."""
    pytest.importorskip("triton")
    import dataclasses

    from dsv3_export.engines import torch_mla_tail as mt
    from dsv3_export.export import export_step
    from dsv3_export.passes.base import PassConfig
    from dsv3_export.passes.pipeline import run_pipeline
    from dsv3_export.reference import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(ModelArgs.preset("tiny"), v_head_dim=128), dtype=torch.bfloat16).eval()
    bf16 = run_pipeline(export_step(model, "decode"), PassConfig(precision="bf16"))[0]
    attn = next(n for n in bf16.graph.nodes if n.target is torch.ops.dsv3.mla_attention.default)
    assert "other than fp8 GEMMs with act_quant" in mt._match(attn, "decode")  # bf16 wo: a plain linear
    fp8 = run_pipeline(export_step(model, "decode"), PassConfig(precision="fp8"))[0]
    attn = next(n for n in fp8.graph.nodes if n.target is torch.ops.dsv3.mla_attention.default)
    site = mt._match(attn, "decode")
    assert isinstance(site, dict) and len(site["linears"]) == 1 and site["dtype"] == torch.bfloat16
    assert "prefill program" in mt._match(attn, "prefill")
