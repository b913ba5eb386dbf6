"""Every kernel compiles for sm_90 (H100/H200) through Triton's real backend and ptxas, no GPU needed.

The interpreter never runs the compiler, so without this a kernel could pass every CPU test and
still fail to build on the GPU (non-constexpr globals, compiled-dot dtype rules, shared memory).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it")

REPO = Path(__file__).resolve().parents[2]
# Stack-frame (spill) bytes per thread that we accept in an offered config, read from the cubin Triton
# builds: the MLA prefill tiles spill a little (the most: BLOCK_Q 64, BLOCK_N 32, 8 warps, with the new
# token, 560 B with triton 3.9's ptxas flags).
MAX_SPILL_BYTES = 640


def _ptxas_available() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001 - any failure means no NVIDIA toolchain here
        return f"triton's NVIDIA backend / ptxas unavailable: {e}"
    if not (path and Path(path).exists()):
        return "ptxas for sm_90 not found"
    return None if Path(path).with_name("cuobjdump").exists() else "cuobjdump not found beside triton's ptxas"


def _compile(*flags: str, env_extra: dict[str, str] | None = None) -> list[dict]:
    reason = _ptxas_available()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env_extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "tests.kernels._sm90_compile", *flags], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    families = [line["families"] for line in lines if "families" in line]
    # a family of the script's FAMILY_RULES without a test here would never be compiled
    assert families and set(families[0]) == set(FAMILY_CHECKS), (families, sorted(FAMILY_CHECKS))
    rows = [line for line in lines if "kernel" in line]
    assert rows, f"no compile results; stderr:\n{res.stderr[-3000:]}"
    return rows


def _check(rows: list[dict]) -> None:
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} [{r['config']}]: {r['error']}" for r in failed)
    too_big = [r for r in rows if not r["fits"]]
    assert not too_big, [f"{r['kernel']}: {r['shared']} B shared" for r in too_big]


def _block_m(row: dict) -> int:
    m = re.search(r"BLOCK_M: (\d+)", row["config"]) or re.search(r"block_m=(\d+)", row["kernel"])
    return int(m.group(1))


def _check_tensor_cores(rows: list[dict], gemm_kernels: tuple[str, ...], wgmma_e4m3: str | None = None) -> None:
    """The GEMMs run on tensor cores with their storage dtypes; fp32 upcasts stay in the interpreter.

    fp8 x fp8 tiles of 64+ rows must be Hopper's wgmma with e4m3 operands (fp32 accumulator);
    smaller tiles may use mma.sync after an exact e4m3 -> f16 conversion (Triton has no fp8
    mma.sync on sm_90). No GEMM may be a tf32 dot (what an fp32 upcast of the operands compiles
    to) or have no tensor-core instruction at all. `wgmma_e4m3`: a kernel of which some tile must
    reach wgmma with e4m3 operands.
    """
    gemms = [r for r in rows if r["kernel"].startswith(gemm_kernels)]
    assert gemms, f"no compiled case of {gemm_kernels}"
    for r in gemms:
        ops = r["mma_ops"]
        assert ops, f"{r['kernel']} [{r['config']}]: no tensor-core instruction in the PTX"
        assert not any("tf32" in op for op in ops), f"{r['kernel']} [{r['config']}]: fp32 operands {ops}"
        fp8_pair = "a_fp8=True" in r["kernel"]
        if fp8_pair and _block_m(r) >= 64:
            assert any(op.startswith("wgmma.mma_async") and op.endswith(".e4m3.e4m3") for op in ops), (
                f"{r['kernel']} [{r['config']}]: expected wgmma with e4m3 operands, got {ops}")
        if not fp8_pair:  # bf16 activations (dense, weight-only, attention): bf16 operands
            assert all(".bf16" in op for op in ops), f"{r['kernel']} [{r['config']}]: {ops}"
    if wgmma_e4m3:
        assert any("wgmma" in op and op.endswith(".e4m3.e4m3") for r in gemms for op in r["mma_ops"]
                   if r["kernel"].startswith(wgmma_e4m3)), f"no {wgmma_e4m3} tile reached wgmma e4m3"


def _check_act_quant_arithmetic(rows: list[dict]) -> None:
    """act_quant's bit-exactness needs IEEE x / s (div.rn, not div.approx / div.full) and, in the
    GPU kernel, the scale as amax * fp32(1/448) like torch's CUDA oracle (see kernels/fp8_quant.py)."""
    quant = {r["kernel"]: r for r in rows if r["kernel"].startswith("act_quant")}
    assert set(quant) == {"act_quant", "act_quant ieee"}, sorted(quant)
    for r in quant.values():
        assert r["div_ops"] and all(op == "div.rn.f32" for op in r["div_ops"]), (r["kernel"], r["div_ops"])
    assert quant["act_quant"]["mul_recip_448"] and not quant["act_quant ieee"]["mul_recip_448"]


def _check_fp8(rows: list[dict]) -> None:
    _check_tensor_cores(rows, ("fp8_gemm",), wgmma_e4m3="fp8_gemm")
    # the decode GEMM's 16-token tile too: the weight rows are wgmma's 64 (kernels/fp8_gemm_decode.py swaps A and B)
    decode = [r for r in rows if r["kernel"].startswith("fp8_gemm decode")]
    assert len(decode) == 4 and all(any(op.startswith("wgmma.mma_async") and op.endswith(".e4m3.e4m3")
                                        for op in r["mma_ops"]) for r in decode), [r["mma_ops"] for r in decode]
    _check_act_quant_arithmetic(rows)
    # no fp8 GEMM is warp-specialized (Hopper autoWS, setmaxnreg: wrong results on the H200 with triton 3.6)
    assert not any(r["warp_specialized"] for r in rows if r["kernel"].startswith("fp8_gemm")), \
        [r["config"] for r in rows if r["warp_specialized"]]


def _check_moe(rows: list[dict]) -> None:
    _check_tensor_cores(rows, ("grouped_gemm",), wgmma_e4m3="grouped_gemm")


def _check_mla_decode(rows: list[dict]) -> None:
    _check_tensor_cores(rows, ("mla_decode_split",))
    _check_score_dot_not_duplicated(rows)
    # the sweep's bulk L2 prefetch configs issue cp.async.bulk.prefetch (one range for interleaved [latent | rope]
    # rows, else a kv and a pe range: 3 in the PTX), and no other config does
    bulk = [r for r in rows if re.search(r"PREFETCH_BULK: [1-9]", r["config"])]
    assert bulk and all(r["bulk_prefetches"] == 3 for r in bulk), [(r["config"], r["bulk_prefetches"]) for r in bulk]
    assert not any(r["bulk_prefetches"] for r in rows if r not in bulk)


def _check_score_dot_not_duplicated(rows: list[dict]) -> None:
    """The split kernel's score dot (16 heads x BLOCK_N keys x 576, m16n8k16 HMMA) runs once per tile:
    per warp and trip 16 x BLOCK_N x 576 / (16 x 8 x 16) / num_warps HMMA, wherever its m16 x n8 tiles are
    at least as many as the warps. Session 16's SASS study found 72 where 36 do the work at BLOCK_N 32 on 4
    warps (Triton had put the warps on the keys: 2 row blocks of 16, so half of them repeated the other
    half's MMAs and shared-memory reads); the rewrite with the heads on the dot's M took the step 3-8%."""
    checked = 0
    for r in rows:
        if not r["kernel"].startswith("mla_decode_split") or "loop" not in r:
            continue
        block_n = int(re.search(r"BLOCK_N: (\d+)", r["config"]).group(1))
        warps = int(re.search(r"num_warps: (\d+)", r["config"]).group(1))
        if (16 // 16) * (block_n // 8) < warps:  # fewer tiles than warps: some must repeat
            continue
        want = 16 * block_n * (512 + 64) // (16 * 8 * 16) // warps
        assert r["loop"].get("hmma", 0) <= want, (r["kernel"], r["config"], r["loop"], want)
        checked += 1
    assert checked, "no MLA decode split case with a loop census (--census)"


def _check_mla(rows: list[dict]) -> None:
    _check_tensor_cores(rows, ("mla_prefill", "head_gemm"))
    _check_merge_uv_sums_like_its_parts(rows)


def _check_merge_uv_sums_like_its_parts(rows: list[dict]) -> None:
    """kernels/mla_merge_uv.py's reductions run in the layouts of the reduce kernel's (the split merge) and then
    head_gemv's (the product): the same fp32 sum orders, so the same bits as the two launches it replaces. Triton
    picks the product's layout from the order of the loads (kernels/mla_merge_uv.py says which); the L2 prefetch of
    the weight rows (PREFETCH_W) changes none of it."""
    layouts = {r["kernel"]: r["reduce_layouts"] for r in rows}
    parts = layouts["mla_decode_reduce runtime_splits=True"] + layouts["head_gemv K=512"]
    for prefetch in (False, True):
        merged = layouts[f"mla_merge_uv runtime_splits=True prefetch_w={prefetch}"]
        assert merged == parts, (prefetch, merged, parts)


# tests/kernels/_sm90_compile.py FAMILIES, with the checks that are particular to each family. A case in
# no family fails every run of the script, so the families together compile every case.
FAMILY_CHECKS = {"fp8": _check_fp8, "moe": _check_moe, "mla_decode": _check_mla_decode, "mla": _check_mla,
                 "routing": lambda rows: None}


# Every config of every kernel (180 compiles; 245 before session 14 removed MLA decode's fused merge and TMA
# cases and the router kernels, ~15-20 min of CPU on 2 cores with a cold Triton cache, which a CI clone always
# has) only where asked, e.g. before a GPU run that autotunes new configs. By default each kernel's first
# config and its tile extremes (45 compiles, 85 before; the two MLA families ~1 min of CPU cold, ~3 before):
# every kernel, both GEMM tile sets (mma.sync and wgmma), every arithmetic form the checks below read.
ALL_CONFIGS_ENV = "DSV3_SM90_ALL_CONFIGS"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_CHECKS))
def test_kernels_compile_for_sm90_without_heavy_spills(family: str):
    # One test per family so that xdist spreads the compiles; DSV3_SM90_ALL_CONFIGS=1: every config.
    all_configs = os.environ.get(ALL_CONFIGS_ENV) == "1"
    census = ["--census"] if family == "mla_decode" else []  # the loop census only where a check reads it
    rows = _compile(*(["--all-configs"] if all_configs else []), "--usage", *census, "--only", family)
    _check(rows)
    spilling = [f"{r['kernel']} [{r['config']}]: {r['spill_bytes']} B" for r in rows
                if r["spill_bytes"] > MAX_SPILL_BYTES]
    assert not spilling, spilling
    FAMILY_CHECKS[family](rows)


@pytest.mark.slow
def test_pdl_builds_prefetch_before_the_wait_and_let_dependents_launch_after_it():
    """DSV3_TRITON_GDC=1 with DSV3_TRITON_GDC_TRIGGER=1 (kernels/pdl.py): every kernel of the fp8 and MLA families
    waits, then triggers its dependents' launch, in that order; the GEMV and merge_uv forms that prefetch their
    weight rows (DSV3_TORCH_GEMV_PREFETCH, DSV3_TORCH_MERGE_UV_PREFETCH) issue the prefetches before the wait, so
    that they overlap the producer's end under a programmatic edge. Without GDC: no griddepcontrol at all."""
    rows = _compile("--only", "fp8,mla", env_extra={"DSV3_TRITON_GDC": "1", "DSV3_TRITON_GDC_TRIGGER": "1"})
    _check(rows)
    prefetching = {"fp8_gemv K=2048 prefetch_w zero_splits=0", "mla_merge_uv runtime_splits=True prefetch_w=True"}
    for r in rows:
        want = ["prefetch", "wait", "launch_dependents"] if r["kernel"] in prefetching else ["wait", "launch_dependents"]
        assert r["pdl_order"] == want, (r["kernel"], r["config"], r["pdl_order"])
    assert prefetching <= {r["kernel"] for r in rows}
