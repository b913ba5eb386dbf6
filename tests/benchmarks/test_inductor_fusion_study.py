"""benchmarks/inductor_fusion_study.py on one 16b layer (a subprocess: the study patches Inductor and Triton's
driver for the process): it runs, and with DSV3_TORCH_KV_ROW=norm the layer's new kv row is one persistent
Inductor kernel (engines/torch_kv_row.py), where the default form takes two (the kv_norm's mean, then the row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inductor_fusion_study.py"


def _kernels(tmp_path: Path, kv_row: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV3_TORCH_")}
    env.update(DSV3_TORCH_KV_ROW=kv_row)
    done = subprocess.run([sys.executable, str(SCRIPT), "--layers", "1", "--out", str(tmp_path / kv_row)],
                          check=False, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / kv_row / "kernels.json").read_text())


@pytest.mark.slow  # ~30 s on 2 cores: a 1-layer 16b export, the passes, Inductor's code generation
def test_norm_form_makes_the_kv_row_one_persistent_kernel(tmp_path):
    pytest.importorskip("triton")
    kernels = _kernels(tmp_path, "norm")
    row = [k for k in kernels if "constant_pad_nd" in k["origins"]]  # the row's where(pad, pad)
    assert len(row) == 1 and row[0]["name"].startswith("triton_per_"), [k["name"] for k in row]
    assert "sum" in "".join(row[0]["origins"]) and "rsqrt" in "".join(row[0]["origins"]), row[0]["origins"]
    # the default form's separate mean over the latent: a reduction of the split kv row without the where
    apart = [k["name"] for k in kernels if "split_with_sizes" in "".join(k["origins"])
             and "constant_pad_nd" not in k["origins"]]
    assert not apart, apart
