"""engines/torch_triton.py mla_attention: the decode program's W_UK / W_UV projections by
kernels/mla_absorb.py head_gemm (DSV3_TORCH_ABSORB_GEMM=1, the default) instead of einsums (=0).

Numerics in the Triton CPU interpreter (a subprocess: TRITON_INTERPRET must be set before the
kernels are decorated): the tiny bf16 model's decode program lowered for CUDA as engines/torch.py
lower_program lowers it (every dsv3:: op a triton_op, run by the interpreter on CPU tensors), with
the switch on and off, against each other and against the program before lowering (ATen op
bodies), random inputs, fresh seed. Wiring, not bits (head_gemm's numerics: tests/kernels): a wrong
view, stride or head is an O(1) error. Both lowered forms run the same attention and MoE kernels;
they differ by the projections' bf16 output rounding (the interpreter truncates where the einsum
rounds: one bf16 step, ~0.4%) passed through the layers: measured 0.6-1.1% over three seeds with the
tiny model's 3 layers (run with 2 since session 18), bound 0.04. Against the unlowered program (which also rounds differently in the attention and the MoE):
measured 0.5-1.2% with the kernel, 0.5-1.0% without, bound 0.05.
Compared per batch row, and tightly only where the two runs routed the row alike: a rounding step
can flip a near-tie expert in the gate's top-k, a discrete change of one expert's output. Seed
1083769734 flipped expert 2 for 6 in row 0's first MoE layer with the kernel on (head_gemm itself
within 0.4% of the rounded einsum): that row's logits moved 8.9%, the other rows 0.9-1.4%. A row
routed differently is held to the wiring bound only (0.5: a wrong view, stride or head is O(1)).
The prefill program keeps its einsums either way: its two lowerings are compared as code and run once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

_SCRIPT = r'''
import os, sys, json
os.environ["TRITON_INTERPRET"] = "1"
import torch
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.export import export_step
from dsv3_export.kernels import mla_absorb
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.pipeline import run_pipeline
from dsv3_export.reference import ModelArgs, Transformer
from tests.conftest import rel_err
from tests.passes.tiny_programs import step_inputs

from torch.utils._python_dispatch import TorchDispatchMode


class TopkIds(TorchDispatchMode):
    """Each aten.topk's indices (the gate's routing), sorted, per batch row."""

    def __init__(self):
        super().__init__()
        self.ids = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.topk.default:
            self.ids.append(out[1].sort(-1).values.reshape(len(inputs[0]), -1))
        return out


def run(module):
    with torch.no_grad(), TopkIds() as spy:
        got = module(*inputs)
    return got, spy.ids


def compare(got, want, ids, want_ids):
    """Per batch row: (relative error of each output, whether both runs routed the row alike)."""
    assert len(ids) == len(want_ids) > 0, (len(ids), len(want_ids))
    same = [all(torch.equal(a[r], b[r]) for a, b in zip(ids, want_ids)) for r in range(len(inputs[0]))]
    return [[[rel_err(g[r], w[r]) for g, w in zip(got, want)], same[r]] for r in range(len(same))]


launches = []
spec = mla_absorb.head_gemm_spec
mla_absorb.head_gemm_spec = lambda x, w, out, bucket: launches.append(tuple(w.shape)) or spec(x, w, out, bucket)

seed, out, N_LAYERS = int(sys.argv[1]), {}, int(sys.argv[2])
torch.manual_seed(0)
model = Transformer(ModelArgs.preset("tiny").replace(n_layers=N_LAYERS), dtype=torch.bfloat16).eval()
for kind in ("decode", "prefill"):
    program, _ = run_pipeline(export_step(model, kind), PassConfig(precision="bf16"))
    tokens, start_pos, kv_cache = step_inputs(kind, seed, torch.bfloat16)  # a cache for tiny's 3 layers
    inputs = (tokens, start_pos, kv_cache[:, :N_LAYERS].contiguous())
    want, want_ids = run(program.module())
    got, ids, code = {}, {}, {}
    for switch in ("1", "0"):
        os.environ["DSV3_TORCH_ABSORB_GEMM"] = switch
        lowered, how = lower_dsv3_ops(program, "cuda", triton_lowerings(kind))
        out[f"{kind}_{switch}_how"] = how["dsv3::mla_attention"]
        code[switch] = lowered.graph_module.code
        if kind == "prefill" and switch == "0":  # the same program as with the switch on (checked): not run again
            out["prefill_same_program"] = code["0"] == code["1"]
            continue
        launches.clear()
        got[switch], ids[switch] = run(lowered.module())
        out[f"{kind}_{switch}_launches"] = launches[:]
        out[f"{kind}_{switch}_finite"] = all(bool(torch.isfinite(g.float()).all()) for g in got[switch])
        out[f"{kind}_{switch}_rel_program"] = compare(got[switch], want, ids[switch], want_ids)
    if kind == "decode":
        out["decode_rel_switch"] = compare(got["1"], got["0"], ids["1"], ids["0"])
print(json.dumps(out))
'''


# The tiny model's dense layer and one MoE layer (tiny has two): the projections' wiring is per layer, and
# each interpreted run of the third layer cost ~1/3 of this test's time.
N_LAYERS = 2
WIRING_BOUND = 0.5  # a row the two runs routed differently: only an O(1) error (wrong view, stride, head) fails


def _check_rows(rows: list, bound: float, what: str, seed: int) -> None:
    """rows: per batch row [per-output relative errors, routed alike]. Alike rows within bound, the
    others within WIRING_BOUND; at least one row routed alike (else nothing was checked tightly)."""
    assert any(same for _, same in rows), f"{what}: every row routed differently (seed {seed}): {rows}"
    for r, (rel, same) in enumerate(rows):
        limit = bound if same else WIRING_BOUND
        assert max(rel) < limit, f"{what}: row {r} (routed alike: {same}) {rel} >= {limit} (seed {seed})"


def test_decode_program_with_and_without_the_kernel_in_the_interpreter(seed):
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(seed % 2**31), str(N_LAYERS)], check=False,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # each decode layer: W_UK [h, dn, c] then W_UV^T [h, c, dv]; none with the switch off, none in prefill
    from dsv3_export.reference import ModelArgs

    a = ModelArgs.preset("tiny")
    h, dn, dv, c = a.n_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
    assert out["decode_1_launches"] == [[h, dn, c], [h, c, dv]] * N_LAYERS, out["decode_1_launches"]
    assert out["decode_0_launches"] == out["prefill_1_launches"] == [], out
    assert "kernels/mla_absorb.py head_gemm" in out["decode_1_how"], out["decode_1_how"]
    assert "head_gemm" not in out["decode_0_how"] and "kernels/mla_attention.py" in out["decode_0_how"]
    for kind, switch in (("decode", "1"), ("decode", "0"), ("prefill", "1")):
        assert out[f"{kind}_{switch}_finite"], (kind, switch)
        _check_rows(out[f"{kind}_{switch}_rel_program"], 0.05, f"{kind} switch={switch} vs the unlowered program",
                    seed)
    _check_rows(out["decode_rel_switch"], 0.04, "decode 1 vs 0", seed)
    assert out["prefill_same_program"], "the prefill program depends on DSV3_TORCH_ABSORB_GEMM"


def test_switch_values(monkeypatch):
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_triton, torch_triton_mla

    monkeypatch.setenv(torch_triton_mla.ABSORB_ENV, "yes")
    with pytest.raises(ValueError, match="DSV3_TORCH_ABSORB_GEMM='yes'"):
        torch_triton.triton_lowerings("decode")
    for value in ("0", "1"):
        monkeypatch.setenv(torch_triton_mla.ABSORB_ENV, value)
        how = torch_triton.triton_lowerings("decode")["dsv3::mla_attention"].how
        assert ("mla_absorb.py head_gemm" in how) == (value == "1"), how
    monkeypatch.delenv(torch_triton_mla.ABSORB_ENV)
    assert "mla_absorb.py head_gemm" in torch_triton.triton_lowerings("decode")["dsv3::mla_attention"].how
    assert torch.bfloat16 in torch_triton_mla.ka.DOT_DTYPES and torch.float32 not in torch_triton_mla.ka.DOT_DTYPES
