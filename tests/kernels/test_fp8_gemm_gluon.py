"""fp8_gemm(variant="gluon") (kernels/fp8_gemm_gluon.py): Gluon has no CPU interpreter, so CI checks that it builds
for sm_90 with the wgmma pipeline its design needs and that it refuses what it cannot run; its numbers are checked on
a Hopper GPU (here when one is present, and by benchmarks/kernels.py section fp8_prefill on the H200)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it")

from dsv3_export.kernels import fp8_gemm as G  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import TOL  # noqa: E402
from tests.kernels.test_compile_sm90 import REPO, _ptxas_available  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _operands(m: int, n: int, k: int, device: str = "cpu"):
    a, a_s = R.act_quant(torch.randn(m, k, device=device) * 2)
    b, b_s = R.weight_quant(torch.randn(n, k, device=device) / k**0.5)
    return a, a_s, b, b_s


def test_builds_for_sm90_with_the_wgmma_pipeline_it_asks_for():
    reason = _ptxas_available()
    if reason:
        pytest.skip(reason)
    # the default tile: DSV3_GLUON_WS_TILE (a benchmark sweep's override) would change what is compiled
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV3_GLUON_WS_TILE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "tests.kernels._sm90_gluon_compile"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"kernel"')]
    assert res.returncode == 0 and len(rows) == 5, f"{len(rows)} of 5 cases; stderr:\n{res.stderr[-3000:]}"
    assert {r["kernel"] for r in rows} == {"fp8_gemm_gluon", "fp8_gemm_gluon_ws"}, rows
    for r in rows:
        case = f"{r['kernel']} block_m={r['block_m']} unroll={r['unroll']} stages={r['stages']} c={r['c']}"
        copies = r.get("consumers", 1)  # the warp-specialized kernel holds the loop once per consumer warpgroup
        assert r["ok"], f"{case}: {r['error']}"
        assert r["fits"], f"{case}: {r['shared']} B of shared memory"
        assert r["wgmma"] == ["wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"], (case, r["wgmma"])
        assert r["spill_bytes"] == 0, f"{case}: {r['spill_bytes']} B spilled ({r['registers']} registers)"
        # one wait per K block in the loop, and in the warp-specialized form's last pair after groups of 4 (_ws_pair);
        # ptxas serializing the pipeline (C7514) puts a DEPBAR after every wgmma: 4 per block instead of 1 wait
        blocks = r["unroll"] + (2 if copies > 1 and r["unroll"] > 2 else 0)
        assert r["sass_depbars"] == r["ptx_waits"] == copies * blocks, (case, r["sass_depbars"], r["ptx_waits"])
        assert r["sass_gmmas"] == 4 * copies * blocks, case  # K = 128 per block in four k32 wgmmas
        if copies > 1:  # the producer warp gives its registers to the consumers
            assert min(r["setmaxnreg"]) <= 40 and max(r["setmaxnreg"]) >= 232, (case, r["setmaxnreg"])
            # its one load site issues four TMA copies per step: both halves of a, b, and the tile's scales
            assert r["sass_tma_loads"] == 4, (case, r["sass_tma_loads"])


@pytest.mark.parametrize("spec", ["4,6,8", "5,4"])
def test_refuses_a_warp_specialized_tile_it_cannot_run(spec):
    """DSV3_GLUON_WS_TILE is read at import: unroll 6 would leave two pairs after the groups, which the kernel does not
    run (wrong sums, or a hang with several tiles per program)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"DSV3_GLUON_WS_TILE": spec}
    res = subprocess.run([sys.executable, "-c", "import dsv3_export.kernels.fp8_gemm_gluon_ws"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and f"DSV3_GLUON_WS_TILE={spec!r}" in res.stderr, res.stderr[-2000:]


def test_refuses_what_it_cannot_run():
    a, a_s, b, b_s = _operands(3, 200, 256)
    a_s_outer = a_s.t().contiguous().t()  # as act_quant(..., outer_scales=True) writes them: the Gluon path takes it
    if not HOPPER:
        for scales in (a_s, a_s_outer):
            with pytest.raises(ValueError, match=r"variant='gluon'.*needs a Hopper \(sm_90\) GPU"):
                G.fp8_gemm(a, scales, b, b_s, variant="gluon")
    with pytest.raises(ValueError, match="a_s needs unit stride along its last dim"):  # the Triton kernels do not
        G.fp8_gemm(a, a_s_outer, b, b_s)
    with pytest.raises(ValueError, match="variant='gluon' needs fp8 a with a_s"):
        G.fp8_gemm(torch.randn(3, 256, dtype=torch.bfloat16), None, b, b_s, variant="gluon")
    with pytest.raises(ValueError, match="variant='gluon' does not split K"):
        G.fp8_gemm(a, a_s, b, b_s, split_k=2, variant="gluon")
    with pytest.raises(ValueError, match="variant='gluon' takes no triton.Config"):
        G.fp8_gemm(a, a_s, b, b_s, variant="gluon", config=G.PREFILL_CONFIGS[0])
    from dsv3_export.kernels.fp8_gemm_gluon import fp8_gemm_gluon

    with pytest.raises(ValueError, match="unroll even and >= 2"):
        fp8_gemm_gluon(a, a_s, b, b_s, warp_specialized=False, unroll=0)
    with pytest.raises(ValueError, match="single-partition form's"):
        fp8_gemm_gluon(a, a_s, b, b_s, block_m=64)


@pytest.mark.skipif(not HOPPER, reason="Gluon kernels have no CPU interpreter; needs an sm_90 GPU (checked on the "
                                       "H200 by benchmarks/kernels.py section fp8_prefill)")
def test_matches_reference_on_hopper(seed):
    """Both forms on ragged shapes, one and several tiles per program, with row-major and outer-dim-major scales
    (tests/kernels/_hopper_gluon_check.py's cases), compiled in a process without this folder's TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV3_GLUON_WS_TILE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "tests.kernels._hopper_gluon_check", str(seed)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"form"')]
    assert res.returncode == 0 and len(rows) == 7 * (3 * 4 + 1), f"{len(rows)} cases; stderr:\n{res.stderr[-3000:]}"
    for r in rows:
        tol = TOL["fp8_gemm_fp32_out"] if r["out"] == "fp32" else 1e-2
        assert r["finite"] and r["err"] < tol, r
