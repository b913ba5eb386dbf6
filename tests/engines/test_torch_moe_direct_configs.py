"""engines/torch_triton_moe.py DSV3_TORCH_MOE_DIRECT_CONFIGS: the one-token grouped GEMMs launched with their own
configs (two launches gated by the batch). In the Triton CPU interpreter (a subprocess: TRITON_INTERPRET must be
set before the kernels are decorated), the bf16 experts op at one token and at three: the configs launched, and
the same bits as without the switch (BLOCK_N only splits the output columns among programs)."""

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

seed, out = int(sys.argv[1]), {}
g = torch.Generator().manual_seed(seed)
e, k, d, i = 7, 3, 48, 40  # D and I not multiples of the column blocks
w13 = (torch.randn(e, 2 * i, d, generator=g) * d**-0.5).bfloat16()
w2 = (torch.randn(e, d, i, generator=g) * i**-0.5).bfloat16()
launched = []
launch = torch_launch.launch_spec
def spy(spec):
    if spec is not None and spec.kernel.__name__ == "_grouped_gemm_kernel":
        launched.append(spec.configs[0].kwargs["BLOCK_N"])
    return launch(spec)
torch_launch.launch_spec = spy
for tokens in (1, 3):
    x = torch.randn(tokens, d, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    for setting in ("", "up=16:4:1,down=32:2:1"):
        os.environ[tt.MOE_DIRECT_CONFIGS_ENV] = setting
        launched.clear()
        y = tt.moe_experts(x, weights, ids, w13, w2, 16)
        out[f"{tokens} {setting or 'default'}"] = {"block_n": list(launched), "y": y.float().flatten().tolist()}
print(json.dumps(out))
'''


def test_one_token_gemms_take_the_pinned_configs_with_the_same_bits(seed):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV3_TORCH_")}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(seed % 2**31)], check=False, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    tuned = out["1 default"]["block_n"]
    assert len(tuned) == 2 and 16 not in tuned, tuned  # the interpreter's first config for both GEMMs
    assert out["1 up=16:4:1,down=32:2:1"]["block_n"] == [16, 32]  # one token: the pinned configs (up, then down)
    assert out["3 up=16:4:1,down=32:2:1"]["block_n"] == out["3 default"]["block_n"] == tuned  # aligned: tuned
    for tokens in (1, 3):
        assert out[f"{tokens} up=16:4:1,down=32:2:1"]["y"] == out[f"{tokens} default"]["y"], tokens


@pytest.mark.parametrize("value, configs", [("", {}), ("up=32:4:5", {"up": (32, 4, 5)}),
                                            (" down=64:8:3 , up=16:1:1 ", {"down": (64, 8, 3), "up": (16, 1, 1)})])
def test_switch_values(monkeypatch, value, configs):
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_triton_moe as tt

    monkeypatch.setenv(tt.MOE_DIRECT_CONFIGS_ENV, value)
    got = {gemm: (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for gemm, c in tt.moe_direct_configs().items()}
    assert got == configs


@pytest.mark.parametrize("value", ["up", "up=32:4", "gate=32:4:5", "up=32:4:5,up=64:4:4", "up=48:4:5", "down=32:3:2",
                                   "down=32:4:0", "up=a:4:5"])
def test_bad_switch_values_name_the_variable(monkeypatch, value):
    pytest.importorskip("triton")
    from dsv3_export.engines import torch_triton_moe as tt

    monkeypatch.setenv(tt.MOE_DIRECT_CONFIGS_ENV, value)
    with pytest.raises(ValueError, match=tt.MOE_DIRECT_CONFIGS_ENV):
        tt.moe_direct_configs()
