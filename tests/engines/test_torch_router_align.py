"""engines/torch_router.py DSV3_TORCH_ROUTER_ALIGN=1: the decode program's router and moe_align in one
launch (kernels/router_align.py), the MoE op taking that alignment (dsv3_aoti::moe_experts_fp8_aligned /
moe_experts_aligned).

Numerics in the Triton CPU interpreter (a subprocess: TRITON_INTERPRET must be set before the kernels
are decorated): the tiny bf16 model's fp8 and bf16 decode programs, rewritten by fuse_router and lowered
for CUDA as engines/torch.py lower_program lowers them, switch on against off, random inputs, fresh
seed: EQUAL outputs (the rewrite replaces router_topk + moe_align by a kernel computing the same bits,
and the experts run the same launches on them). Structure: one router_align per MoE layer and no
router_topk / moe_align launch with the switch on; none in prefill, with the switch off, or with the
other routing forms (gate in the router, MOE_ALIGN=aten). Traced (no
interpreter; decomposed as AOTInductor decomposes): one _router_align_kernel per MoE layer, every kernel
argument named in each launch (the 16b launch test's rule).
"""

from __future__ import annotations

import pytest

from tests.engines._program_script import SCRIPT_PREAMBLE, run_script

LAYERS = 2  # the tiny preset's MoE layers (3 layers, 1 dense)

_SCRIPT = SCRIPT_PREAMBLE + r'''
import torch
from dsv3_export.engines import torch_triton as tt
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_router import fuse_router
from dsv3_export.export import export_step
from dsv3_export.kernels import fp8_quant as kq
from dsv3_export.kernels import moe as km
from dsv3_export.kernels import router_align as kra
from dsv3_export.kernels import topk as kt
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.pipeline import run_pipeline
from dsv3_export.reference import ModelArgs, Transformer
from tests.passes.tiny_programs import step_inputs

launches = []
for mod, name in ((kra, "router_align_spec"), (kt, "router_spec"), (kq, "act_quant_spec")):
    real = getattr(mod, name)
    setattr(mod, name, lambda *a, _real=real, _name=name, **kw: launches.append(_name) or _real(*a, **kw))
align = km.moe_align
km.moe_align = lambda *a, **kw: launches.append("moe_align") or align(*a, **kw)

def dsv3_ops(p):
    return sorted(str(n.target) for n in p.graph.nodes if n.op == "call_function" and "dsv3" in str(n.target))

out = {}
torch.manual_seed(0)
model = Transformer(ModelArgs.preset("tiny").replace(route_scale=2.5), dtype=torch.bfloat16).eval()
for precision in ("fp8", "bf16"):
    program, _ = run_pipeline(export_step(model, "decode"), PassConfig(precision=precision))
    inputs = step_inputs("decode", seed, torch.bfloat16)
    got = {}
    for switch in ("1", "0"):
        os.environ["DSV3_TORCH_ROUTER_ALIGN"] = switch
        key = f"{precision}_{switch}"
        fused, how = fuse_router(program, "decode")
        out[key + "_how"], out[key + "_ops"] = how, dsv3_ops(fused)
        if mode == "trace":
            from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
            from triton.runtime.jit import JITFunction
            lowered, _ = lower_dsv3_ops(fused, "cuda", tt.triton_lowerings("decode"))
            kernels = lowered.run_decompositions({}, decompose_custom_triton_ops=True)
            names, incomplete = [], {}
            for n in kernels.graph.nodes:
                if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
                    k = fn = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
                    while not isinstance(fn, JITFunction):
                        fn = fn.fn
                    names.append(fn.__name__)
                    passed = set(n.kwargs["kwargs"]) | set(
                        kernel_side_table.get_constant_args(n.kwargs["constant_args_idx"]))
                    passed |= set(k.configs[0].kwargs) if getattr(k, "configs", None) else set()
                    if set(fn.arg_names) - passed:
                        incomplete[fn.__name__] = sorted(set(fn.arg_names) - passed)
            out[key + "_kernels"] = {k: names.count(k) for k in set(names)}
            out[key + "_incomplete"] = incomplete
            continue
        lowered, _ = lower_dsv3_ops(fused, "cuda", tt.triton_lowerings("decode"))
        launches.clear()
        with torch.no_grad():
            got[switch] = lowered.module()(*inputs)
        out[key + "_launches"] = {n: launches.count(n) for n in set(launches)}
        out[key + "_finite"] = all(bool(torch.isfinite(g.float()).all()) for g in got[switch])
    if got:
        out[f"{precision}_equal"] = all(torch.equal(a, b) for a, b in zip(got["1"], got["0"]))
print(json.dumps(out))
'''


def _run(mode: str, seed: int = 0) -> dict:
    return run_script(_SCRIPT, mode, seed)


@pytest.mark.slow  # ~40-80 s: the tiny decode programs exported, lowered 4 times and run by the interpreter
def test_rewritten_decode_program_equals_the_unrewritten_one_in_the_interpreter(seed):
    out = _run("interpret", seed)
    keys = [k[: -len("_equal")] for k in out if k.endswith("_equal")]
    assert {"fp8", "bf16"} <= set(keys), keys
    for key in keys:
        on, off = f"{key}_1", f"{key}_0"
        assert f"{LAYERS} of them with moe_align in the same launch" in out[on + "_how"], out[on + "_how"]
        assert "moe_align" not in out[off + "_how"], out[off + "_how"]
        aligned = "dsv3_aoti.moe_experts_fp8_aligned.default" if key.startswith("fp8") else \
            "dsv3_aoti.moe_experts_aligned.default"
        assert out[on + "_ops"].count("dsv3_aoti.router_align.default") == LAYERS, out[on + "_ops"]
        assert out[on + "_ops"].count(aligned) == LAYERS and "dsv3_aoti.router_topk.default" not in out[on + "_ops"]
        assert not [o for o in out[on + "_ops"] if o.startswith("dsv3.moe_experts")], out[on + "_ops"]
        assert out[off + "_ops"].count("dsv3_aoti.router_topk.default") == LAYERS, out[off + "_ops"]
        on_launches, off_launches = dict(out[on + "_launches"]), dict(out[off + "_launches"])
        act_quant = on_launches.pop("act_quant_spec", 0)
        assert act_quant == off_launches.pop("act_quant_spec", 0), (out[on + "_launches"], key)
        assert on_launches == {"router_align_spec": LAYERS}, on_launches
        assert off_launches == {"router_spec": LAYERS, "moe_align": LAYERS}, off_launches
        assert out[on + "_finite"] and out[off + "_finite"]
        assert out[key + "_equal"], f"{key}: the switch changed the engine's outputs (seed {seed})"


@pytest.mark.slow  # ~40 s: 4 lowerings decomposed as AOTInductor decomposes them
def test_traced_decode_program_launches_router_align():
    out = _run("trace")
    for key in ("fp8", "bf16"):
        on, off = out[f"{key}_1_kernels"], out[f"{key}_0_kernels"]
        assert on.get("_router_align_kernel") == LAYERS and not {"_router_kernel", "_moe_align_kernel"} & set(on), on
        assert off["_router_kernel"] == off["_moe_align_kernel"] == LAYERS and "_router_align_kernel" not in off, off
        assert sum(on.values()) == sum(off.values()) - LAYERS, (on, off)
        assert not out[f"{key}_1_incomplete"] and not out[f"{key}_0_incomplete"], out


def test_where_it_does_not_apply(monkeypatch):
    """Switch off (the default) or unknown; prefill; the gate in the router; MOE_ALIGN=aten:
    router_topk as before, the MoE op aligning its ids itself, and the reason."""
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_router as tr
    from dsv3_export.engines import torch_triton as tt
    from dsv3_export.passes.base import PassConfig
    from dsv3_export.passes.pipeline import run_pipeline
    from tests.passes.tiny_programs import tiny_program

    import torch

    decode = run_pipeline(tiny_program("decode", torch.bfloat16), PassConfig(precision="fp8"))[0]
    for env in (tr.ALIGN_ENV, tr.GATE_ENV, tt.MOE_ALIGN_ENV):
        monkeypatch.delenv(env, raising=False)
    assert tr.ALIGN_DEFAULT == "0"  # not measured on the H200 yet

    def routed(program, kind="decode"):
        fused, how = tr.fuse_router(program, kind)
        ops = {str(n.target) for n in fused.graph.nodes}
        return how, "dsv3_aoti.router_align.default" in ops, "dsv3_aoti.router_topk.default" in ops

    how, aligned, topk = routed(decode)
    assert not aligned and topk and "moe_align" not in how, how
    monkeypatch.setenv(tr.ALIGN_ENV, "1")
    how, aligned, topk = routed(decode)
    assert aligned and not topk and f"{LAYERS} of them with moe_align" in how, how
    prefill = run_pipeline(tiny_program("prefill", torch.bfloat16), PassConfig(precision="fp8"))[0]
    how, aligned, topk = routed(prefill, "prefill")
    assert not aligned and topk and "0 of them with moe_align" in how and "prefill program" in how, how
    for env, value, reason in ((tr.GATE_ENV, "1", "DSV3_TORCH_ROUTER_GATE=1"),
                               (tt.MOE_ALIGN_ENV, "aten", "DSV3_TORCH_MOE_ALIGN=aten")):
        monkeypatch.setenv(env, value)
        how, aligned, _ = routed(decode)
        assert not aligned and f"not aligned: {reason}" in how, how
        monkeypatch.delenv(env)
    fp32 = run_pipeline(tiny_program("decode", torch.float32), PassConfig(precision="bf16"))[0]
    how, aligned, _ = routed(fp32)  # fp32 experts lower to ATen: nothing to align for
    assert not aligned and "torch.float32 experts (ATen)" in how, how
    monkeypatch.setenv(tr.ALIGN_ENV, "yes")
    with pytest.raises(ValueError, match="DSV3_TORCH_ROUTER_ALIGN='yes'"):
        tr.fuse_router(decode, "decode")
