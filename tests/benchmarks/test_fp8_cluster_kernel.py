"""benchmarks/fp8_cluster_kernel.py (the 2-CTA multicast experiment of session 33) still builds for sm_90 as measured:
a 2-CTA cluster whose lead CTA alone multicasts the weight tile, the warp-specialized kernel's wgmma pipeline per
consumer, no spills, within shared memory. Gluon has no CPU interpreter; its numbers come from
benchmarks/fp8_cluster_probe.py on the H200. Run as a script (without TRITON_INTERPRET) it prints the build's facts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _lead_predicates(ptx: str) -> set[str]:
    """The PTX predicates true on the cluster's lead CTA only: `setp.eq` of %cluster_ctarank with 0, and any
    `and.pred` of one of them."""
    ranks = set(re.findall(r"mov\.u32\s+(%r\d+),\s*%cluster_ctarank;", ptx))
    lead = {p for p, r in re.findall(r"setp\.eq\.b32\s+(%p\d+),\s*(%r\d+),\s*0;", ptx) if r in ranks}
    ands = re.findall(r"and\.pred\s+(%p\d+),\s*(%p\d+),\s*(%p\d+);", ptx)
    grown = True
    while grown:
        before = len(lead)
        lead |= {d for d, a, b in ands if a in lead or b in lead}
        grown = len(lead) > before
    return lead


def _build_facts() -> dict:
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    sys.path.insert(0, str(REPO / "benchmarks"))  # this runs in its own process (the test's subprocess)
    import fp8_cluster_kernel as C
    from tests.kernels._sm90_compile import SMEM_LIMIT, TARGET, _cuobjdump, _resource_usage

    if C.cluster_unsupported():
        return dict(skip=C.cluster_unsupported())

    def desc(dtype, block, cga):
        layout = gl.NVMMASharedLayout.get_default_for(block, {"fp8e4nv": gl.float8e4nv, "bf16": gl.bfloat16}[dtype],
                                                      cga_layout=cga)
        return f"tensordesc<{dtype}[{block[0]}, {block[1]}],{layout!r}>"

    kernel = C._fp8_gemm_gluon_cluster_kernel
    signature = dict(a_desc=desc("fp8e4nv", [128, 128], C.A_CGA), b_desc=desc("fp8e4nv", [128, 128], C.B_CGA),
                     c_desc=desc("bf16", [128, 128], C.C_CGA), a_s_ptr="*fp32", b_s_ptr="*fp32", M="i32", N="i32",
                     K="i32", stride_asm="i32", stride_bsn="i32", CONSUMER_REGS="constexpr",
                     PRODUCER_REGS="constexpr", num_warps="constexpr")
    constexprs = dict(CONSUMER_REGS=232, PRODUCER_REGS=40, num_warps=4)
    src = GluonASTSource(fn=kernel, signature=signature,
                         constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=TARGET, options=dict(num_warps=4, num_ctas=C.CLUSTER_CTAS))
    ptx = compiled.asm["ptx"]
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    lead = _lead_predicates(ptx)
    multicast = re.findall(r"@(%p\d+)\s+cp\.async\.bulk\.tensor[^;]*\.multicast::cluster[^;]*,\s*(%rs\d+);", ptx)
    masks = dict(re.findall(r"mov\.b16\s+(%rs\d+),\s*(\d+);", ptx))
    skipped_waits = re.findall(r"@!(%p\d+)\s+bra\.uni\s+skipWait", ptx)
    return dict(triton=triton.__version__, stages=int(C.WS_STAGES), shared=compiled.metadata.shared,
                smem_limit=SMEM_LIMIT, cluster=re.findall(r"\.reqnctapercluster\s+(\d+)", ptx),
                multicast_guards_lead=[guard in lead for guard, _ in multicast],
                multicast_masks=[masks.get(reg) for _, reg in multicast],
                lead_only_waits=sum(p in lead for p in skipped_waits),
                barrier_counts=re.findall(r"mbarrier\.init\.shared::cta\.b64\s+\[%r\d+\],\s*(\d+);", ptx),
                wgmma=sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx))),
                ptx_waits=len(re.findall(r"wgmma\.wait_group", ptx)),
                sass_depbars=len(re.findall(r"WARPGROUP\.DEPBAR", sass)),
                remote_arrives=len(re.findall(r"mbarrier\.arrive\.shared::cluster", ptx)),
                **_resource_usage(compiled.asm["cubin"]))


def test_builds_for_sm90_as_measured():
    from tests.kernels.test_compile_sm90 import _ptxas_available

    reason = _ptxas_available()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    facts = json.loads(lines[-1])
    if "skip" in facts:
        pytest.skip(facts["skip"])
    assert facts["cluster"] == ["2"], facts
    # b's one multicast load: issued by the lead CTA alone, to both CTAs (mask 0b11)
    assert facts["multicast_guards_lead"] == [True] and facts["multicast_masks"] == ["3"], facts
    # pair_empty: its 2 arrivals per CTA doubled for the pair on the lead, which alone waits on it
    stages = facts["stages"]
    assert sorted(facts["barrier_counts"]) == sorted(["1"] * stages + ["2"] * stages + ["4"] * stages), facts
    assert facts["lead_only_waits"] >= 1, facts
    assert facts["remote_arrives"] == 6 * 2, facts  # each consumer releases every block to the lead's pair_empty
    assert facts["wgmma"] == ["wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"], facts
    # the warp-specialized consumer's pipeline, twice: 4 blocks per group and the last pair, one wait each
    assert facts["ptx_waits"] == facts["sass_depbars"] == 12, facts
    assert facts["spill_bytes"] == 0 and facts["shared"] <= facts["smem_limit"], facts


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET to compile"
    print(json.dumps(_build_facts()), flush=True)
