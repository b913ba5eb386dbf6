"""Every kernel compiles for sm_90 (H100/H200) through Triton's real backend and ptxas, no GPU needed.

The interpreter never runs the compiler, so without this a kernel could pass every CPU test and
still fail to build on the GPU (non-constexpr globals, compiled-dot dtype rules, shared memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it")

REPO = Path(__file__).resolve().parents[2]
# Spill bytes per thread that we accept in an offered config (the MLA prefill tiles spill a little).
MAX_SPILL_BYTES = 512


def _ptxas_available() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001 - any failure means no NVIDIA toolchain here
        return f"triton's NVIDIA backend / ptxas unavailable: {e}"
    return None if path and Path(path).exists() else "ptxas for sm_90 not found"


def _compile(*flags: str) -> list[dict]:
    reason = _ptxas_available()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "tests.kernels._sm90_compile", *flags], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no compile results; stderr:\n{res.stderr[-3000:]}"
    return rows


def _check(rows: list[dict]) -> None:
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} [{r['config']}]: {r['error']}" for r in failed)
    too_big = [r for r in rows if not r["fits"]]
    assert not too_big, [f"{r['kernel']}: {r['shared']} B shared" for r in too_big]


def test_every_kernel_compiles_for_sm90():
    _check(_compile())


@pytest.mark.slow
def test_every_config_compiles_for_sm90_without_heavy_spills():
    rows = _compile("--all-configs", "--ptxas-v")
    _check(rows)
    spilling = [f"{r['kernel']} [{r['config']}]: {r['spill_bytes']} B" for r in rows
                if r["spill_bytes"] > MAX_SPILL_BYTES]
    assert not spilling, spilling
    # The prefill-sized fp8 GEMM tiles must reach Hopper's wgmma, not the mma.sync fallback.
    big = [r for r in rows if r["kernel"].startswith("fp8_gemm") and "BLOCK_M: 128" in r["config"]]
    assert big and all(r["wgmma"] for r in big)
