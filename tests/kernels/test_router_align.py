"""router_align (router + moe_align in one program) vs router_topk + moe_align (bit for bit) and vs
router_align_ref (ids and alignment exactly, weights within one output rounding: the kernel's exp
against torch's, as tests/kernels/test_topk.py's router test). Every config; row counts past one
chunk and not chunk multiples; NaN-poisoned outputs (conftest: every torch.empty), so a slot the
kernel forgets to write fails the equality.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels import moe_align as A  # noqa: E402
from dsv3_export.kernels import router_align as R  # noqa: E402
from dsv3_export.kernels import topk as K  # noqa: E402

# (T, N routed logits, k, n_extra, E experts of the grouped GEMMs, block_m)
CASES = [(1, 64, 6, 2, 66, 16), (3, 8, 1, 0, 8, 16), (37, 30, 8, 2, 40, 64), (64, 64, 6, 2, 66, 16),
         (70, 66, 4, 0, 66, 16), (5, 20, 3, 2, 22, 32)]


def _logits(t: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(t, n) * 2).to(dtype)  # [T, N]


def _separate(logits, k, e, block_m, route, config=None):
    """The two launches router_align replaces (router_topk with `config`)."""
    weights, ids = K.router_topk(logits, k, config=config, **route)
    return (weights, ids, *A.moe_align(ids, e, block_m))


def _assert_same(got, want):
    for name, g, w in zip(("weights", "ids", "sorted_token_ids", "expert_ids", "num_tokens_post_pad"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w) or (g.dtype.is_floating_point and torch.equal(g.isnan(), w.isnan())
                                     and torch.equal(g.nan_to_num(), w.nan_to_num())), name


@pytest.mark.parametrize("config, twin", list(zip(R.ROUTER_ALIGN_CONFIGS, R.ROUTER_TWINS)), ids=str)
@pytest.mark.parametrize("t, n, k, n_extra, e, block_m", CASES)
def test_equals_router_topk_then_moe_align(seed, config, twin, t, n, k, n_extra, e, block_m):
    torch.manual_seed(seed)
    logits = _logits(t, n, torch.bfloat16)
    route = dict(scale=2.5, n_extra=n_extra, first_extra=n, out_dtype=torch.bfloat16)
    got = R.router_align(logits, k, e, block_m, config=config, **route)
    _assert_same(got, _separate(logits, k, e, block_m, route, twin))
    _, ids, sorted_ids, expert_ids, npp = got
    assert ids.shape == (t, k + n_extra) and sorted_ids.shape == (A.align_blocks(ids.numel(), e, block_m) * block_m,)
    assert int(npp) % block_m == 0 and (expert_ids[: int(npp) // block_m] >= 0).all()


@pytest.mark.parametrize("dtype", K.DTYPES)
@pytest.mark.parametrize("t, n, k, n_extra, e, block_m", CASES)
def test_matches_the_reference(seed, dtype, t, n, k, n_extra, e, block_m):
    """Ids and alignment exactly the reference's (ties: the lower index first in both); weights within
    one rounding of the output dtype (as test_topk's router test)."""
    torch.manual_seed(seed)
    logits = _logits(t, n, dtype)
    route = dict(scale=1.5, n_extra=n_extra, first_extra=n, out_dtype=dtype)
    got = R.router_align(logits, k, e, block_m, **route)
    want = R.router_align_ref(logits, k, e, block_m, **route)
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g, w)
    ulp = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert got[0].dtype == dtype
    assert ((got[0].float() - want[0].float()).abs() <= ulp * want[0].float().abs() * 2 + 1e-30).all()


def test_nan_rows_strided_logits_and_extra_experts_past_the_routed_ones():
    """A NaN logit (its row's softmax all NaN: the lowest ids first, NaN weights), logits with a row stride
    past N, and shared experts numbered after unused ones (E > N + n_extra): still the separate
    launches' outputs, bit for bit."""
    torch.manual_seed(0)
    logits = torch.randn(9, 50)[:, :40]  # [9, 40], row stride 50
    logits[2, 7] = float("nan")
    route = dict(scale=1.0, n_extra=2, first_extra=45, out_dtype=torch.float32)
    got = R.router_align(logits, 5, 47, 16, **route)
    _assert_same(got, _separate(logits, 5, 47, 16, route))
    assert got[1][2, :5].tolist() == [0, 1, 2, 3, 4] and got[0][2, :5].isnan().all()
    assert (got[1][:, 5:] == torch.tensor([45, 46])).all() and not got[0][[0, 1, 3]].isnan().any()


def test_no_rows():
    """T = 0: empty weights and ids; the alignment is all padding (npp 0, every block -1)."""
    logits = torch.randn(0, 16)
    got = R.router_align(logits, 2, 18, 16, n_extra=2, first_extra=16)
    _assert_same(got, _separate(logits, 2, 18, 16, dict(n_extra=2, first_extra=16)))
    assert got[0].shape == (0, 4) and int(got[4]) == 0 and (got[3] == -1).all()


@pytest.mark.parametrize("call, match", [
    (lambda: R.router_align(torch.randn(3, 8, 2), 2, 8, 16), "router_align: logits: expected 2 dims"),
    (lambda: R.router_align(torch.randn(3, 8).long(), 2, 8, 16), "router_align: logits: dtype torch.int64"),
    (lambda: R.router_align(torch.randn(3, 8), 9, 8, 16), "router_align: logits: k=9"),
    (lambda: R.router_align(torch.randn(3, 2000), 2, 2000, 16), "router_align: logits: last dim 2000"),
    (lambda: R.router_align(torch.randn(8, 3).t(), 2, 8, 16), "router_align: logits needs unit stride"),
    (lambda: R.router_align(torch.randn(3, 8), 2, 8, 24), "router_align: block_m=24"),
    (lambda: R.router_align(torch.randn(3, 8), 2, 0, 16), "router_align: n_experts=0"),
    (lambda: R.router_align(torch.randn(3, 8), 2, 6, 16), r"do not fit n_experts=6"),
    (lambda: R.router_align(torch.randn(3, 8), 2, 9, 16, n_extra=2, first_extra=8), r"extra experts \[8, 10\)"),
    (lambda: R.router_align(torch.randn(3, 8), 2, 8, 16, n_extra=-1), "n_extra=-1"),
])
def test_bad_inputs_name_the_problem(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_benchmark_section_cpu_smoke(tmp_path, monkeypatch):
    """benchmarks/kernels.py --only router_align on the CPU (tiny shapes): both rows per batch, checked ok
    (ids and alignment against the reference, router_align bit for bit the two launches')."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_router_align", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert mod.main(["--cpu-smoke", "--only", "router_align"]) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert len(rows) == 2 * len(mod.TINY.decode_m) and all(r["section"] == "router_align" and r["ok"] for r in rows)
    assert sum("router_align, one launch" in r["impl"] for r in rows) == len(mod.TINY.decode_m), rows


_LAYOUT_SCRIPT = r"""
import json, re, triton
from triton.compiler import ASTSource
import tests.kernels._sm90_compile as C
from dsv3_export.kernels import moe_align, router_align, topk

def layout(kernel, cfg, pointers, constexprs):
    consts = {**constexprs, **cfg.kwargs}
    src = ASTSource(fn=kernel, signature=C._signature(kernel, pointers, consts), constexprs=consts,
                    attrs=C._attrs(kernel, pointers))
    ttgir = triton.compile(src, target=C.TARGET, options=dict(num_warps=cfg.num_warps,
                                                              num_stages=cfg.num_stages)).asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<.*>)$", ttgir, re.M))
    rows = cfg.kwargs["BLOCK_ROWS"]
    return sorted({layouts[m] for m in re.findall(rf"tensor<{rows}x64xf32, (#\w+)>", ttgir)})

bf, out = "*bf16", []
route = dict(TOPK=6, N_EXTRA=2, BLOCK_N=64)
for cfg, twin in zip(router_align.ROUTER_ALIGN_CONFIGS, router_align.ROUTER_TWINS):
    out.append([layout(router_align._router_align_kernel, cfg,
                       dict(logits_ptr=bf, w_ptr=bf, idx_ptr="*i64", sorted_ids_ptr="*i32", expert_ids_ptr="*i32",
                            npp_ptr="*i32"), dict(route, **moe_align.align_meta(66, 16))),
                layout(topk._router_kernel, twin, dict(logits_ptr=bf, w_ptr=bf, idx_ptr="*i64"), route)])
one_row = layout(topk._router_kernel, topk.TOPK_CONFIGS[0], dict(logits_ptr=bf, w_ptr=bf, idx_ptr="*i64"), route)
print(json.dumps(dict(pairs=out, one_row=one_row)))
"""


def test_routing_tiles_have_router_topks_layout():
    """Compiled for sm_90 (no GPU needed; no interpreter: a subprocess): at the 16b's 64 routed experts
    each config's fp32 routing tile [BLOCK_ROWS, 64] has exactly the blocked layout of its twin
    router_topk config, so the softmax's sum runs in the same order (the GPU's bits, not just the
    interpreter's); router_topk's 1-row config splits a row the same way (2 per thread x 32 lanes)."""
    import json
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _LAYOUT_SCRIPT], check=False, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for fused, twin in out["pairs"]:
        assert len(fused) == 1 and fused == twin, (fused, twin)
    row = re.compile(r"sizePerThread = \[\d+, (\d+)\], threadsPerWarp = \[\d+, (\d+)\], warpsPerCTA = \[\d+, (\d+)\]")
    assert row.search(out["one_row"][0]).groups() == row.search(out["pairs"][0][0][0]).groups() == ("2", "32", "1")
