"""engines/torch_q_rope.py: the decode query's RoPE inside the MLA split kernel (DSV3_TORCH_Q_ROPE=kernel) or W_UK's
head_gemm launch (=absorb, the default since session 22).

In the Triton CPU interpreter (a subprocess: TRITON_INTERPRET must be set before the kernels are decorated): the
tiny bf16 model's decode program lowered for CUDA as engines/torch.py lower_program lowers it (every dsv3:: op a
triton_op, run by the interpreter on CPU tensors), with the rewrite and without, on random inputs: the same bits
(the kernel rotates in fp32 and rounds to bf16 to nearest even, as torch's ops do), one rewrite per layer, and the
RoPE's ATen ops gone from the program.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_SCRIPT = r'''
import os, sys, json
os.environ["TRITON_INTERPRET"] = "1"
import torch
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_q_rope import Q_ROPE_ENV, q_rope_into_attention
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.export import export_step
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.pipeline import run_pipeline
from dsv3_export.reference import ModelArgs, Transformer
from tests.passes.tiny_programs import step_inputs

seed, out = int(sys.argv[1]), {}
torch.manual_seed(0)
model = Transformer(ModelArgs.preset("tiny").replace(n_layers=2), dtype=torch.bfloat16).eval()
program, _ = run_pipeline(export_step(model, "decode"), PassConfig(precision="bf16"))
tokens, start_pos, kv_cache = step_inputs("decode", seed, torch.bfloat16)
inputs = (tokens, start_pos, kv_cache[:, :2].contiguous())
lowered, _ = lower_dsv3_ops(program, "cuda", triton_lowerings("decode"))
os.environ.pop(Q_ROPE_ENV, None)  # the default, whatever the caller's environment says
out["default"] = q_rope_into_attention(lowered, "decode")[1]
os.environ[Q_ROPE_ENV] = "inductor"
out["inductor"] = q_rope_into_attention(lowered, "decode")[1]
os.environ[Q_ROPE_ENV] = "kernel"
rewritten, out["how"] = q_rope_into_attention(lowered, "decode")
count = lambda p, name: sum(name in str(n.target) for n in p.graph.nodes if n.op == "call_function")  # noqa: E731
out["ops"] = {name: [count(lowered, name), count(rewritten, name)] for name in ("mla_attention_rope_q", "stack")}
with torch.no_grad():
    want, got = lowered.module()(*inputs), rewritten.module()(*inputs)
out["equal"] = [torch.equal(g, w) for g, w in zip(got, want)]
out["finite"] = all(bool(torch.isfinite(g.float()).all()) for g in got)
# DSV3_TORCH_Q_ROPE=absorb: the rotation in W_UK's head_gemm launch (counted: the kernel that runs is the new one)
import dsv3_export.kernels.mla_query as kq
spec, launches = kq.head_gemm_rope_spec, []
kq.head_gemm_rope_spec = lambda *args: (launches.append(1), spec(*args))[1]
os.environ[Q_ROPE_ENV] = "absorb"
absorbed, out["how_absorb"] = q_rope_into_attention(lowered, "decode")
launches.clear()  # the rewrite ran the op on fake tensors for its nodes' values: only the run's launches count
with torch.no_grad():
    got = absorbed.module()(*inputs)
out["equal_absorb"] = [torch.equal(g, w) for g, w in zip(got, want)]
out["head_gemm_rope_launches"] = len(launches)
print(json.dumps(out))
'''


def test_rewritten_decode_program_is_bit_identical_in_the_interpreter(seed):
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(seed % 2**31)], check=False, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["inductor"] == "Inductor (DSV3_TORCH_Q_ROPE=inductor)", out["inductor"]
    assert out["how"] == "2 query RoPEs into the MLA split kernel (DSV3_TORCH_Q_ROPE=kernel)", out["how"]
    assert out["default"] == out["how_absorb"], out  # the default since session 22 (`kernel` in session 21)
    assert out["ops"]["mla_attention_rope_q"] == [0, 2], out["ops"]
    stacks_before, stacks_after = out["ops"]["stack"]
    assert stacks_before - stacks_after == 2, out["ops"]  # each layer's query RoPE stack gone (k_pe's stays)
    assert out["finite"] and all(out["equal"]), out
    assert out["how_absorb"] == "2 query RoPEs into W_UK's head_gemm launch (DSV3_TORCH_Q_ROPE=absorb)", out
    assert out["head_gemm_rope_launches"] == 2 and all(out["equal_absorb"]), out


def test_switch_and_program_kinds(monkeypatch):
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_q_rope as Q

    sentinel = object()
    assert Q.q_rope_into_attention(sentinel, "prefill") == (sentinel, "Inductor (prefill)")
    monkeypatch.setenv(Q.Q_ROPE_ENV, "yes")
    with pytest.raises(ValueError, match="DSV3_TORCH_Q_ROPE='yes'"):
        Q.q_rope_into_attention(sentinel, "decode")
