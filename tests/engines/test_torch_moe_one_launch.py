"""engines/torch_triton_moe.py DSV3_TORCH_MOE_ONE_LAUNCH: the decode program's fp8 experts op at one token as
kernels/moe_fused.py's one launch, and from two tokens on as before. In the Triton CPU interpreter (a subprocess:
TRITON_INTERPRET must be set before the kernels are decorated), dsv3_aoti::moe_experts_fp8_quantized at one token
and at three, switch on and off: which kernels launch, and the outputs (fp16: the interpreter's bf16 cast
truncates the three-launch path's rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from dsv3_export.engines import torch_launch, torch_triton_moe as tt
from dsv3_export.kernels import fp8_quant as Q
from dsv3_export.reference import fp8 as R

seed, out = int(sys.argv[1]), {}
g = torch.Generator().manual_seed(seed)
e, k, d, i = 7, 3, 200, 150  # D and I not multiples of 128
def quantized(n, kk):
    w = torch.randn(e, n, kk, generator=g) * kk**-0.5
    qs, ss = zip(*(R.weight_quant(w[j]) for j in range(e)))
    return torch.stack(qs), torch.stack(ss)
w13, w13s = quantized(2 * i, d)
w2, w2s = quantized(d, i)
launched = []
launch = torch_launch.launch_spec
def spy(spec):
    if spec is not None:
        launched.append(spec.kernel.__name__.replace("_ieee", ""))  # act_quant's CPU rounding form
    return launch(spec)
torch_launch.launch_spec = spy
for tokens in (1, 3):
    x = torch.randn(tokens, d, generator=g).half()
    xq, xs = Q.act_quant(x)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    for setting in ("0", "1"):
        os.environ[tt.MOE_ONE_LAUNCH_ENV] = setting
        launched.clear()
        y = tt.moe_experts_fp8_quantized(x, xq, xs, weights, ids, w13, w13s, w2, w2s, 16)
        out[f"{tokens} {setting}"] = {"kernels": list(launched), "dtype": str(y.dtype), "shape": list(y.shape),
                                      "y": y.float().flatten().tolist()}
print(json.dumps(out))
'''


def test_one_token_runs_one_launch_and_more_tokens_the_grouped_gemms(seed):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV3_TORCH_")}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(seed % 2**31)], check=False, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["1 0"]["kernels"] == ["_grouped_gemm_kernel", "_act_quant_kernel", "_grouped_gemm_kernel"]
    assert out["1 1"]["kernels"] == ["_moe_one_token_kernel"]  # no moe_align, no grouped GEMM, no act_quant
    three = ["_grouped_gemm_kernel", "_act_quant_kernel", "_grouped_gemm_kernel"]  # (moe_align launches directly)
    assert out["3 0"]["kernels"] == out["3 1"]["kernels"] == three, out["3 1"]["kernels"]
    for tokens in (1, 3):
        assert out[f"{tokens} 1"]["dtype"] == "torch.float16" and out[f"{tokens} 1"]["shape"] == [tokens, 200]
    assert out["3 1"]["y"] == out["3 0"]["y"]  # from two tokens on: the aligned path's bits
    one, three_launches = (torch_tensor(out[f"1 {s}"]["y"]) for s in ("1", "0"))
    rel = float((one - three_launches).abs().mean() / three_launches.abs().mean())
    assert rel < 1e-3, rel  # tests/kernels/_helpers.py TOL["moe_one_token"]: the per-slot fp16 rounding


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)


def test_switch_values(monkeypatch):
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_triton_moe as tt

    monkeypatch.delenv(tt.MOE_ONE_LAUNCH_ENV, raising=False)
    assert tt.moe_one_launch_on() is False
    monkeypatch.setenv(tt.MOE_ONE_LAUNCH_ENV, "1")
    assert tt.moe_one_launch_on() is True
    monkeypatch.setenv(tt.MOE_ONE_LAUNCH_ENV, "yes")
    with pytest.raises(ValueError, match=tt.MOE_ONE_LAUNCH_ENV):
        tt.moe_one_launch_on()
