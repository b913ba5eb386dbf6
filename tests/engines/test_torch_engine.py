"""The torch backend (AOTInductor packages): numerics, greedy parity, device records and refusals.

One tiny fp32 CPU engine is built per session (tests/engines/_torch_engine.py) through the
real build path: export -> passes (MLA / MoE fused into dsv3:: ops) -> lowering -> AOTInductor.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch

from dsv3_export.engines.base import BackendUnavailable
from dsv3_export.engines.torch_device import cpu_flags, cpu_target, incompatibility
from dsv3_export.engines.torch_lower import ATEN_LOWERINGS, LoweringError, dsv3_ops, lower_dsv3_ops
from dsv3_export.runtime import load_engine
from dsv3_export.step import LatentCacheStep
from tests.conftest import TOLERANCES, reference_greedy, rel_err
from tests.engines._torch_engine import reference_model, tiny_torch_engine


@pytest.fixture(scope="module")
def engine_dir() -> Path:
    return tiny_torch_engine()


@pytest.fixture(scope="module")
def engine(engine_dir):
    return load_engine(engine_dir)


@pytest.fixture(scope="module")
def model():
    return reference_model()


def _edited_copy(engine_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the engine whose manifest.json was changed by edit(dict)."""
    out = tmp_path / "engine"
    shutil.copytree(engine_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("batch, seqlen", [(3, 7), (2, 1), (1, 4)])
def test_step_matches_reference_step(engine, model, seed, batch, seqlen):
    """Prefill (s > 1) and decode (s == 1) packages vs LatentCacheStep, random cache and positions."""
    g = torch.Generator().manual_seed(seed)
    a = model.args
    cache_len = 11  # not a power of two; entries at t >= start_pos must be ignored
    tokens = torch.randint(0, a.vocab_size, (batch, seqlen), generator=g)
    start_pos = torch.randint(0, cache_len, (batch,), generator=g)
    cache = torch.randn(batch, a.n_layers, cache_len, a.kv_lora_rank + a.qk_rope_head_dim, generator=g)
    with torch.no_grad():
        want_logits, want_kv = LatentCacheStep(model).eval()(tokens, start_pos, cache)
    logits, new_kv = engine.step(tokens, start_pos, cache)
    assert logits.shape == want_logits.shape and new_kv.shape == want_kv.shape
    assert rel_err(logits, want_logits) < TOLERANCES["fp32_engine"]
    assert rel_err(new_kv, want_kv) < TOLERANCES["fp32_engine"]


def test_step_accepts_strided_views(engine, model, seed):
    """tokens[:, :1] of a [b, s] prompt has row stride s: the package must still see each row's token."""
    g = torch.Generator().manual_seed(seed)
    a = model.args
    prompt = torch.randint(0, a.vocab_size, (3, 7), generator=g)
    start_pos = torch.tensor([9, 4, 0, 2, 6, 1])[::2]  # stride 2
    cache = torch.randn(3, a.n_layers, 11, a.latent_cache_width, generator=g)
    for tokens in (prompt[:, :1], prompt[:, 2:5]):  # decode and prefill packages
        assert not tokens.is_contiguous()
        with torch.no_grad():
            want, _ = LatentCacheStep(model).eval()(tokens.contiguous(), start_pos.contiguous(), cache)
        got, _ = engine.step(tokens, start_pos, cache)
        assert rel_err(got, want) < TOLERANCES["fp32_engine"]


def test_greedy_32_tokens_match_reference_model(engine, model, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.args.vocab_size, (6,), generator=g).tolist()
    assert engine.generate(prompt, max_new_tokens=32) == reference_greedy(model, prompt, 32)


def test_batched_prompts_of_different_lengths(engine, model, seed):
    """Batch > 1 with right padding and per-row positions gives each prompt's own tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist() for n in (5, 2, 1)]
    got = engine.generate(prompts, max_new_tokens=8)
    assert got == [reference_greedy(model, p, 8) for p in prompts]


def test_manifest_records_payload_and_machine(engine_dir):
    m = json.loads((engine_dir / "manifest.json").read_text())
    info = m["backend_info"]
    assert m["backend"] == "torch" and m["device"] == "cpu"
    assert sorted(m["files"]) == sorted([*info["packages"].values(), info["weights"]])
    assert info["device_kind"] == "cpu" and info["decode_cuda_graph"] is False
    assert info["cpu_flags_required"] and set(info["cpu_flags_required"]) <= cpu_flags()
    # The fused ops of the pass pipeline reached the backend and were lowered.
    assert {"dsv3::mla_attention", "dsv3::moe_experts"} <= set(m["lowerings"])
    assert not any(op.startswith("dsv3") for op in m["op_histogram"])


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 micro-architecture levels")
def test_cpu_target_names_an_x86_level():
    march, flags = cpu_target("avx512 avx512_vnni")
    assert march == "x86-64-v4" and {"avx512f", "avx512bw", "avx2", "fma", "avx512_vnni"} <= set(flags)
    march, flags = cpu_target("avx2")
    assert march == "x86-64-v3" and "avx2" in flags and not any(f.startswith("avx512") for f in flags)


def test_refuses_cpu_without_required_flags(engine_dir, tmp_path):
    def edit(m):
        m["backend_info"]["cpu_flags_required"].append("avx10_99")

    with pytest.raises(BackendUnavailable, match="lacks avx10_99.*rebuild the engine"):
        load_engine(_edited_copy(engine_dir, tmp_path, edit))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_refuses_cuda_engine_on_cpu_machine(engine_dir, tmp_path):
    def edit(m):
        m["backend_info"].update(device_kind="cuda", compute_capability="9.0")

    with pytest.raises(BackendUnavailable, match="built for CUDA but torch sees no CUDA device"):
        load_engine(_edited_copy(engine_dir, tmp_path, edit))


def test_incompatibility_names_compute_capability_and_machine():
    assert "built for riscv64" in incompatibility({"device_kind": "cpu", "machine": "riscv64"})
    assert "expected 'cpu' or 'cuda'" in incompatibility({"device_kind": "tpu"})


def test_refuses_unknown_payload_layout(engine_dir, tmp_path):
    def edit(m):
        m["backend_info"]["layout"] = "aoti-packages+safetensors/99"

    with pytest.raises(BackendUnavailable, match="payload layout"):
        load_engine(_edited_copy(engine_dir, tmp_path, edit))


def test_step_rejects_bad_inputs(engine):
    a = engine.args
    tokens, pos = torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    width = a.kv_lora_rank + a.qk_rope_head_dim
    with pytest.raises(ValueError, match="kv_cache must be torch.float32"):
        engine.step(tokens, pos, torch.zeros(2, a.n_layers, 4, width, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        engine.step(tokens, pos, torch.zeros(2, a.n_layers, 8, width)[:, :, :4])
    with pytest.raises(ValueError, match="start_pos must be int64"):
        engine.step(tokens, pos.int(), torch.zeros(2, a.n_layers, 4, width))


# --- lowerings (no compile) ------------------------------------------------------------------

def _op(name: str):
    return getattr(torch.ops.dsv3, name.split("::")[1]).default


def _fp8_weight(n: int, k: int, g: torch.Generator, experts: int | None = None):
    from dsv3_export.reference.fp8 import weight_quant

    if experts is None:
        return weight_quant(torch.randn(n, k, generator=g) * k**-0.5)
    pairs = [weight_quant(torch.randn(n, k, generator=g) * k**-0.5) for _ in range(experts)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _routing(t: int, e: int, k: int, g: torch.Generator):
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # [T, k] distinct experts
    return torch.rand(t, k, generator=g), ids


@pytest.mark.parametrize("act_quant", [False, True])
def test_fp8_lowerings_match_op_bodies(seed, act_quant):
    """Shapes off the 128 grid (ragged scale blocks); act_quant=True differs only in fp32 summation order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 200, generator=g)
    w, s = _fp8_weight(130, 200, g)
    want = _op("dsv3::fp8_linear")(x, w, s, act_quant)
    assert rel_err(ATEN_LOWERINGS["dsv3::fp8_linear"](x, w, s, act_quant), want) < 1e-5
    t, e, k, d, i = 7, 5, 2, 136, 72
    x2 = torch.randn(t, d, generator=g)
    weights, ids = _routing(t, e, k, g)
    w13, s13 = _fp8_weight(2 * i, d, g, experts=e)
    w2, s2 = _fp8_weight(d, i, g, experts=e)
    want = _op("dsv3::moe_experts_fp8")(x2, weights, ids, w13, s13, w2, s2, act_quant)
    got = ATEN_LOWERINGS["dsv3::moe_experts_fp8"](x2, weights, ids, w13, s13, w2, s2, act_quant)
    assert rel_err(got, want) < 1e-5


def test_moe_and_mla_lowerings_match_op_bodies(seed):
    g = torch.Generator().manual_seed(seed)
    t, e, k, d, i = 9, 6, 3, 40, 24
    x = torch.randn(t, d, generator=g)
    weights, ids = _routing(t, e, k, g)
    w13, w2 = torch.randn(e, 2 * i, d, generator=g), torch.randn(e, d, i, generator=g)
    want = _op("dsv3::moe_experts")(x, weights, ids, w13, w2)
    assert rel_err(ATEN_LOWERINGS["dsv3::moe_experts"](x, weights, ids, w13, w2), want) < TOLERANCES["fp32_structural"]
    b, s, h, dn, r, c, dv, tl = 2, 3, 4, 8, 6, 10, 7, 5
    args = (torch.randn(b, s, h, dn, generator=g), torch.randn(b, s, h, r, generator=g),
            torch.randn(b, s, c + r, generator=g), torch.randn(b, tl, c + r, generator=g),
            torch.tensor([2, 5]), torch.randn(h * (dn + dv), c, generator=g), 0.3)
    want = _op("dsv3::mla_attention")(*args)
    assert rel_err(ATEN_LOWERINGS["dsv3::mla_attention"](*args), want) < TOLERANCES["fp32_structural"]


def test_unknown_dsv3_op_fails_lowering():
    if not hasattr(torch.ops.dsv3, "_test_unlowerable"):
        @torch.library.custom_op("dsv3::_test_unlowerable", mutates_args=())
        def _unlowerable(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        _unlowerable.register_fake(lambda x: torch.empty_like(x))

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.dsv3._test_unlowerable(x) + 1

    ep = torch.export.export(M(), (torch.randn(3),))
    assert dsv3_ops(ep) == {"dsv3::_test_unlowerable": 1}
    with pytest.raises(LoweringError, match="no cpu lowering for op dsv3::_test_unlowerable"):
        lower_dsv3_ops(ep, "cpu")


_TRITON_OPS_SCRIPT = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels
import torch
import dsv3_export.ops  # noqa: F401
from dsv3_export.engines.torch_triton import fp8_linear, mla_attention, moe_experts, moe_experts_fp8
from dsv3_export.reference.fp8 import weight_quant

g = torch.Generator().manual_seed(int(sys.argv[1]))
t, e, k, d, i = 5, 6, 2, 136, 72  # D, I off the 128 grid: ragged fp8 scale blocks
x = torch.randn(t, d, generator=g).bfloat16()
ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
w = torch.rand(t, k, generator=g).bfloat16()
w13 = (torch.randn(e, 2 * i, d, generator=g) * d**-0.5).bfloat16()
w2 = (torch.randn(e, d, i, generator=g) * i**-0.5).bfloat16()

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def fp8_experts(n, kk):
    pairs = [weight_quant(torch.randn(n, kk, generator=g) * kk**-0.5) for _ in range(e)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

q13, s13 = fp8_experts(2 * i, d)
q2, s2 = fp8_experts(d, i)
print("moe", rel(moe_experts(x, w, ids, w13, w2, 16), torch.ops.dsv3.moe_experts(x, w, ids, w13, w2)))
print("moe_fp8", rel(moe_experts_fp8(x, w, ids, q13, s13, q2, s2, 16),
                     torch.ops.dsv3.moe_experts_fp8(x, w, ids, q13, s13, q2, s2, True)))

# MLA: a populated cache of T = 13 rows; per-row start_pos 0 (cache unused), inside the cache, and
# past its end (every cache row visible); heads, latent and rope widths off the kernels' blocks.
b, h, dn, r, c, dv, tl = 3, 5, 16, 8, 40, 12, 13
start_pos = torch.tensor([0, 6, tl + 3])
for dtype in (torch.float32, torch.bfloat16):
    wkv_b = (torch.randn(h * (dn + dv), c, generator=g) * c**-0.5).to(dtype)
    cache = torch.randn(b, tl, c + r, generator=g).to(dtype)
    for s, decode in ((1, True), (1, False), (6, False)):
        args = [torch.randn(b, s, h, dn, generator=g), torch.randn(b, s, h, r, generator=g),
                torch.randn(b, s, c + r, generator=g)]
        args = [a.to(dtype) for a in args] + [cache, start_pos, wkv_b, dn**-0.5]
        name = f"mla_{'decode' if decode else 'prefill'}_s{s}_{str(dtype).split('.')[1]}"
        print(name, rel(mla_attention(*args, decode), torch.ops.dsv3.mla_attention(*args)))

# fp8_linear: lead dims [2, 3], N = 130 and K = 200 / 520 off the 128 grid (K = 520 splits K in decode).
for kk in (200, 520):
    wq, ws = weight_quant(torch.randn(130, kk, generator=g) * kk**-0.5)
    xf = torch.randn(2, 3, kk, generator=g)
    for decode in (True, False):
        tag = f"k{kk}_{'decode' if decode else 'prefill'}"
        print(f"fp8_act_fp32_{tag}", rel(fp8_linear(xf, wq, ws, True, decode), torch.ops.dsv3.fp8_linear(xf, wq, ws, True)))
        xb = xf.bfloat16()
        print(f"fp8_act_bf16_{tag}", rel(fp8_linear(xb, wq, ws, True, decode), torch.ops.dsv3.fp8_linear(xb, wq, ws, True)))
        print(f"fp8_wonly_bf16_{tag}", rel(fp8_linear(xb, wq, ws, False, decode),
                                          torch.ops.dsv3.fp8_linear(xb, wq, ws, False)))

# decode_kernel (kernels/fp8_gemm_decode.py): a weight wide enough that decode does not split K (N > 64 x the 132
# nominal SMs), N and K off the grids; batches of the swapped tile, of the direct tile, and with the GEMV on (its
# batches launch the GEMV alone).
wq, ws = weight_quant(torch.randn(8500, 200, generator=g) * 200**-0.5)
for m, gemv in ((1, False), (16, False), (17, False), (2, True), (3, True), (17, True)):
    xb = torch.randn(m, 200, generator=g).bfloat16()
    want = torch.ops.dsv3.fp8_linear(xb, wq, ws, True)
    got = fp8_linear(xb, wq, ws, True, True, gemv=gemv, decode_kernel=True)
    print(f"fp8_decode_kernel{'_gemv' if gemv else ''}_m{m}", rel(got, want))
assert fp8_linear(torch.randn(0, 200).bfloat16(), wq, ws, True, True, decode_kernel=True).shape == (0, 8500)
'''


def _triton_op_errors(seed: int) -> dict[str, float]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TRITON_OPS_SCRIPT, str(seed % 2**31)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: float(v) for name, v in (line.split() for line in done.stdout.split("\n") if line.strip())}


def test_triton_ops_match_dsv3_ops_in_the_interpreter(seed):
    """The CUDA lowerings' launch code (torch_triton.py), run eagerly by the Triton CPU interpreter.

    A subprocess, because TRITON_INTERPRET must be set before the kernels are decorated.
    Tolerances: fp32 MLA is the same math in another order (the interpreter's fp32 dots are fp32:
    1e-5); fp32 act_quant fp8_linear has identical quantized operands and exact fp8 products (1e-5);
    bf16 runs get the bf16 entry of the table (x2 for fp8, whose rounding of x and h may differ
    by one bf16 step from the op body's). Measured bf16 errors are 2e-3 to 5e-3, mostly because
    the interpreter stores fp32 -> bf16 by truncation (checked: a bf16 fp8_linear output equals
    the fp32 one truncated, not rounded to nearest); the GPU rounds to nearest.
    """
    pytest.importorskip("triton")
    errs = _triton_op_errors(seed)
    mla = {n: v for n, v in errs.items() if n.startswith("mla_")}
    assert len(mla) == 6 and len([n for n in errs if n.startswith("fp8_")]) == 18, errs
    for name, err in errs.items():
        if name.endswith("_float32") or name.startswith("fp8_act_fp32"):
            limit = TOLERANCES["fp32_structural"]
        elif name.startswith(("moe_fp8", "fp8_")):
            limit = 2 * TOLERANCES["bf16"]
        else:
            limit = TOLERANCES["bf16"]
        assert err < limit, f"{name}: rel err {err:.2e} >= {limit:.0e} (seed {seed}; all: {errs})"


_TRITON_TRACE_SCRIPT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # traced kernels must be real JITFunctions for wrap_triton
import torch
from torch.export import Dim
import dsv3_export.ops  # noqa: F401
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.reference.fp8 import weight_quant

kind = sys.argv[1]
b, h, dn, r, c, dv, tl = 3, 4, 16, 8, 40, 12, 13
s = 1 if kind == "decode" else 5


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wkv_b = torch.nn.Parameter(torch.randn(h * (dn + dv), c).bfloat16(), requires_grad=False)
        wq, ws = weight_quant(torch.randn(70, h * dv))
        self.wq, self.ws = torch.nn.Parameter(wq, requires_grad=False), torch.nn.Parameter(ws, requires_grad=False)

    def forward(self, q_nope, q_pe, kv_new, kv_cache, start_pos):
        o = torch.ops.dsv3.mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, self.wkv_b, 0.25)
        y = (torch.ops.dsv3.fp8_linear(o.flatten(2), self.wq, self.ws, True)
             + torch.ops.dsv3.fp8_linear(o.flatten(2), self.wq, self.ws, False))
        return y


args = (torch.randn(b, s, h, dn).bfloat16(), torch.randn(b, s, h, r).bfloat16(), torch.randn(b, s, c + r).bfloat16(),
        torch.randn(b, tl, c + r).bfloat16(), torch.tensor([0, 6, 20]))
B, T = Dim("batch", min=1, max=64), Dim("cache_len", min=1, max=4096)
S = Dim("seq", min=1, max=512) if kind == "prefill" else Dim.STATIC
dyn = ({0: B, 1: S}, {0: B, 1: S}, {0: B, 1: S}, {0: B, 1: T}, {0: B})
ep = torch.export.export(Attn(), args, dynamic_shapes=dyn, strict=False)
lowered, how = lower_dsv3_ops(ep, "cuda", triton_lowerings(kind))
ops = sorted({str(n.target) for n in lowered.graph.nodes if n.op == "call_function" and "dsv3" in str(n.target)})
print("ops", ",".join(ops))
print("dims", len(lowered.range_constraints))
print("how_mla", how["dsv3::mla_attention"])
print("how_fp8", how["dsv3::fp8_linear"])
kernels = lowered.run_decompositions({}, decompose_custom_triton_ops=True)  # what AOTInductor does
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
names = sorted({getattr(getattr(k, "fn", k), "__name__", "?") for k in
                (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]) for n in kernels.graph.nodes
                 if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target))})
print("kernels", ",".join(names))
print("kernel_dims", len(kernels.range_constraints))
# MLA decode's split rule runs in its kernels: (grid split axis, SPLIT_TARGET) per MLA decode launch,
# and how many of their grid sizes / arguments hold a min/max of a dim (none: untested in AOTInductor).
mla = [(name, n.kwargs) for n in kernels.graph.nodes if n.op == "call_function"
       and "triton_kernel_wrapper" in str(n.target)
       for k in [kernel_side_table.get_kernel(n.kwargs["kernel_idx"])]
       for name in [getattr(getattr(k, "fn", k), "__name__", "?")] if name.startswith("_mla_decode")]
print("mla_rule", ";".join(f"{name}:{kw['grid'][0][2]}:{kw['kwargs'].get('SPLIT_TARGET')}" for name, kw in mla) or "-")
vals = [str(v.meta.get("val")) for _, kw in mla for v in [*kw["kwargs"].values(), *(x for g in kw["grid"] for x in g)]
        if isinstance(v, torch.fx.Node)]
print("mla_minmax", sum("Min(" in e or "Max(" in e for e in vals))
'''


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_triton_ops_trace_with_dynamic_dims(kind):
    """torch.export of dsv3::mla_attention + fp8_linear with dynamic batch / cache (and seq for
    prefill), lowered for CUDA: the dsv3_aoti triton_ops stay in the program without specializing
    a dim, and decompose (as AOTInductor decomposes them) into our kernels. CPU-only: the triton
    kernels are traced, never launched (torch's mutation analysis warns that no GPU driver exists)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _TRITON_TRACE_SCRIPT, kind], check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in done.stdout.strip().split("\n"))
    assert out["ops"] == "dsv3_aoti.fp8_linear.default,dsv3_aoti.mla_attention.default", out
    n_dims = 3 if kind == "prefill" else 2
    assert int(out["dims"]) == n_dims and int(out["kernel_dims"]) == n_dims, out
    attention = "_mla_decode_split_kernel" if kind == "decode" else "_mla_prefill_kernel"
    kernels = set(out["kernels"].split(","))
    assert {attention, "_fp8_gemm_kernel"} <= kernels, out
    assert "_act_quant_ieee_kernel" in kernels, out  # act_quant then the fp8 GEMM
    # decode: MAX_SPLITS split programs per row, the kernels pick how many run (mla_decode runtime_splits)
    from dsv3_export.kernels.mla_decode import MAX_SPLITS, runtime_split_target

    target = runtime_split_target(torch.device("cpu"))  # traced on CPU tensors: the nominal 132 SMs
    want = f"_mla_decode_split_kernel:{MAX_SPLITS}:{target};_mla_decode_reduce_kernel:1:{target}"
    assert out["mla_rule"] == (want if kind == "decode" else "-"), out
    assert out["mla_minmax"] == "0", out
    # the manifest's `lowerings` text names what each op became
    assert "dsv3_aoti::mla_attention" in out["how_mla"] and "kernels/mla_attention.py" in out["how_mla"], out
    assert "dsv3_aoti::fp8_linear" in out["how_fp8"] and "kernels/fp8_gemm.py" in out["how_fp8"], out


_DECODE_GEMM_TRACE_SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)  # traced kernels must be real JITFunctions for wrap_triton
import torch
from torch.export import Dim
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from dsv3_export.engines.torch_triton import fp8_linear
from dsv3_export.reference.fp8 import weight_quant

w, s = weight_quant(torch.randn(8500, 256) / 16)  # wide enough that decode does not split K (132 nominal SMs)


class Linear(torch.nn.Module):
    """y = linear(x, w, s): the decode-form triton_op directly, or (Op below) dsv3::fp8_linear for the lowering."""

    def __init__(self, linear):
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("s", s)
        self.linear = linear

    def forward(self, x):
        return self.linear(x, self.w, self.s)


x = torch.randn(64, 256).bfloat16()  # the decode program's tuning batch
decode_form = Linear(lambda x, w, s: fp8_linear(x, w, s, True, True, decode_kernel=True))
ep = torch.export.export(decode_form, (x,), dynamic_shapes={"x": {0: Dim("m", min=1, max=64)}})
kernels = ep.run_decompositions({}, decompose_custom_triton_ops=True)  # what AOTInductor does
for n in kernels.graph.nodes:
    if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
        k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
        kw = n.kwargs["kwargs"]
        print("launch", getattr(getattr(k, "fn", k), "__name__", "?"), kw.get("SWAP_AB"), kw.get("BLOCK_M"))
print("dims", len(kernels.range_constraints))

# the switch, through the lowering of dsv3::fp8_linear (read when a program is lowered)
import dsv3_export.ops  # noqa: F401  registers dsv3::
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_triton import DECODE_GEMM_ENV, triton_lowerings


op = torch.export.export(Linear(lambda x, w, s: torch.ops.dsv3.fp8_linear(x, w, s, True)), (x,),
                        dynamic_shapes={"x": {0: Dim("m", min=1, max=64)}})
for choice in ("decode", "tile"):
    os.environ[DECODE_GEMM_ENV] = choice
    for kind in ("decode", "prefill"):
        lowered, how = lower_dsv3_ops(op, "cuda", triton_lowerings(kind))
        names = sorted({getattr(getattr(k, "fn", k), "__name__", "?") for k in
                        (kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
                         for n in lowered.run_decompositions({}, decompose_custom_triton_ops=True).graph.nodes
                         if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target))})
        gemms = ",".join(n for n in names if "gemm" in n)
        print("switch", choice, kind, gemms, "fp8_gemm_decode" in how["dsv3::fp8_linear"])
os.environ[DECODE_GEMM_ENV] = "fast"
try:
    triton_lowerings("decode")
except ValueError as e:
    print("bad", DECODE_GEMM_ENV in str(e) and "'fast'" in str(e))
'''


def test_decode_gemm_tiles_reach_the_package_as_call_arguments():
    """The decode program's W8A8 GEMM whose K is not split traces (batch symbolic, no guard) into act_quant and
    kernels/fp8_gemm_decode.py's two gated launches, their tiles told apart by the call's constexprs: AOTInductor
    compiles one kernel per (kernel, call arguments) and ignores the autotuner's configs, so tiles that differed only
    in their configs ran as one (session 31 on the H200: rows 16-63 of every 64 unwritten). CPU-only, traced only."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _DECODE_GEMM_TRACE_SCRIPT], check=False, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().split("\n")
    launches = sorted(line.split(" ", 1)[1] for line in lines if line.startswith("launch "))
    assert launches == ["_act_quant_ieee_kernel None None", "_fp8_gemm_decode_kernel False 64",
                        "_fp8_gemm_decode_kernel True 16"], lines
    assert "dims 1" in lines, lines
    # DSV3_TORCH_DECODE_GEMM: the decode kernel in the decode program only, the tile kernel with `tile`; the
    # manifest's lowering text says which; an unknown value is an error naming the variable
    switch = sorted(line for line in lines if line.startswith("switch "))
    assert switch == ["switch decode decode _fp8_gemm_decode_kernel True",
                      "switch decode prefill _fp8_gemm_kernel False",
                      "switch tile decode _fp8_gemm_kernel False",
                      "switch tile prefill _fp8_gemm_kernel False"], lines
    assert "bad True" in lines, lines


_FAKE_QUANT_CASES = [(k, dtype) for k in (200, 256, 328) for dtype in (torch.float32, torch.bfloat16)]


def test_fp8_lowerings_are_exact_after_aoti_compile(tmp_path, seed):
    """Two miscompiles of the fp8 CPU lowerings, pinned after AOTInductor (one program, one compile:
    ~20 s each on 2 cores):
    - the fp8 activation rounding (_fake_quant) must survive bit-exactly, ragged K included (an earlier
      form, reference.fp8.act_quant + act_dequant, compiled to NaN for K = 200; slicing back to K before
      the cast to bf16 compiled to garbage for K = 200 and 328: the tiny fp8 CPU engine's NaN);
    - fp8_linear with one scale block along N (80 < 128), where Inductor miscompiled the reference's
      repeat_interleave dequant (inf): the lowering's block form must compile exactly, at [N, K] =
      [80, 192] and [130, 200]."""
    from dsv3_export.engines.torch_lower import ATEN_LOWERINGS, _fake_quant
    from dsv3_export.engines.torch_step import load_package
    from dsv3_export.reference.fp8 import act_dequant, act_quant

    g = torch.Generator().manual_seed(seed)
    shapes = [(80, 192), (130, 200)]
    weights = [_fp8_weight(n, k, g) for n, k in shapes]

    class Fp8Lowerings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ws = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for w, _ in weights])
            self.ss = torch.nn.ParameterList([torch.nn.Parameter(s, requires_grad=False) for _, s in weights])

        def forward(self, fq_xs, linear_xs):
            return (tuple(_fake_quant(x) for x in fq_xs),
                    tuple(ATEN_LOWERINGS["dsv3::fp8_linear"](x, w, s, True)
                          for x, w, s in zip(linear_xs, self.ws, self.ss)))

    fq_xs = tuple((torch.randn(5, k, generator=g) * 3).to(dtype) for k, dtype in _FAKE_QUANT_CASES)
    fq_wants = [act_dequant(*act_quant(x)).to(x.dtype) for x in fq_xs]
    for x, want in zip(fq_xs, fq_wants):
        assert torch.equal(_fake_quant(x), want)
    linear_xs = tuple(torch.randn(2, 5, k, generator=g) for _, k in shapes)
    module = Fp8Lowerings()
    package = torch._inductor.aoti_compile_and_package(torch.export.export(module, (fq_xs, linear_xs)),
                                                       package_path=str(tmp_path / "fp8_lowerings.pt2"))
    fq_gots, linear_gots = load_package(package, torch.device("cpu"))(fq_xs, linear_xs)  # the nested outputs
    assert len(fq_gots) == len(fq_wants) and len(linear_gots) == len(shapes), (len(fq_gots), len(linear_gots))
    for (k, dtype), got, want in zip(_FAKE_QUANT_CASES, fq_gots, fq_wants):
        assert torch.equal(got, want), (k, dtype)
    for shape, got, want in zip(shapes, linear_gots, module(fq_xs, linear_xs)[1]):
        assert rel_err(got, want) < TOLERANCES["fp32_structural"], shape


_MOE_ALIGN_TRACE_SCRIPT = r'''
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)  # traced kernels must be real JITFunctions for wrap_triton
import torch
from torch.export import Dim
import dsv3_export.ops  # noqa: F401
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.reference.fp8 import weight_quant
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

t, d, i, e, k = 3, 136, 24, 5, 2  # D off the 128 grid: a ragged activation scale block


def fp8_experts(n, kk):
    pairs = [weight_quant(torch.randn(n, kk)) for _ in range(e)]
    return [torch.nn.Parameter(torch.stack([p[j] for p in pairs]), requires_grad=False) for j in (0, 1)]


class Moe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w13 = torch.nn.Parameter(torch.randn(e, 2 * i, d).bfloat16(), requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(e, d, i).bfloat16(), requires_grad=False)
        (self.q13, self.s13), (self.q2, self.s2) = fp8_experts(2 * i, d), fp8_experts(d, i)

    def forward(self, x, weights, ids):
        return (torch.ops.dsv3.moe_experts(x, weights, ids, self.w13, self.w2)
                + torch.ops.dsv3.moe_experts_fp8(x, weights, ids, self.q13, self.s13, self.q2, self.s2, True))


args = (torch.randn(t, d).bfloat16(), torch.rand(t, k).bfloat16(), torch.randint(0, e, (t, k)))
T = Dim("tokens", min=1, max=4096)
ep = torch.export.export(Moe(), args, dynamic_shapes=({0: T}, {0: T}, {0: T}), strict=False)
results = []
for form, kind, direct in json.loads(sys.argv[1]):  # the switches are read when a program is lowered
    if form == "default":
        os.environ.pop("DSV3_TORCH_MOE_ALIGN", None)
    else:
        os.environ["DSV3_TORCH_MOE_ALIGN"] = form
    os.environ["DSV3_TORCH_MOE_DIRECT"] = direct
    lowered, _ = lower_dsv3_ops(ep, "cuda", triton_lowerings(kind))
    kernels = lowered.run_decompositions({}, decompose_custom_triton_ops=True)  # what AOTInductor does
    launches = [(getattr(getattr(k_, "fn", k_), "__name__", "?"), n.kwargs["grid"]) for n, k_ in
                ((n, kernel_side_table.get_kernel(n.kwargs["kernel_idx"])) for n in kernels.graph.nodes
                 if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target))]
    aten = sorted({str(n.target) for n in kernels.graph.nodes if n.op == "call_function"
                   and any(a in str(n.target) for a in ("sort", "searchsorted", "scatter"))})
    # the grouped GEMMs' row blocks: one expression of the token symbol per autotune config
    rows = {getattr(getattr(g[0], "target", None), "__name__", str(g[0])) for name, grid in launches
            if name == "_grouped_gemm_kernel" for g in grid}
    # moe_align's grid: gated by min(1, T // 2) in direct mode (no launch at one token), else (1,)
    align = {str(getattr(getattr(g[0], "target", None), "__name__", g[0])) for name, grid in launches
             if name == "_moe_align_kernel" for g in grid}
    results.append({"kernels": ",".join(sorted(name for name, _ in launches)), "aten": ",".join(aten),
                    "dims": len(kernels.range_constraints), "gemm_rows": ",".join(sorted(rows)),
                    "align_grid": ",".join(sorted(align))})
print(json.dumps(results))
'''


_MOE_ALIGN_CASES = [("aten", "decode", "1"), ("kernel", "decode", "0"), ("default", "decode", "1"),
                    ("default", "prefill", "1"), ("single", "prefill", "1")]
# (DSV3_TORCH_MOE_ALIGN, program kind, DSV3_TORCH_MOE_DIRECT)
_PARALLEL_ALIGN = ("_align_count_kernel", "_align_offsets_kernel", "_align_scatter_kernel")


def test_moe_align_traced_form_switch():
    """DSV3_TORCH_MOE_ALIGN picks how the MoE's alignment is traced into a CUDA package: the ATen ops
    (sort / scatter / searchsorted, several kernels) or the Triton kernels (the default: the single-program
    kernel in decode programs, block_m 16, and the parallel form's three in prefill programs, block_m 64; "single"
    keeps the single program there too), with the token dim still dynamic. The bf16 and fp8 MoE ops of one
    program: the grouped GEMMs launch sym_min(n_blocks, T*k) row blocks (a Min of the token symbol, no guard); the
    fp8 MoE launches act_quant twice. DSV3_TORCH_MOE_DIRECT (default 1): the alignment kernel's grid is gated
    by a Min of the token symbol (nothing launched at one token), 0: a plain one-program grid.
    Traced only: the package is never run on this CPU. One process exports once and lowers each case
    (a process per case paid the interpreter start, imports and export again: ~15-20 s each)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _MOE_ALIGN_TRACE_SCRIPT, json.dumps(_MOE_ALIGN_CASES)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(_MOE_ALIGN_CASES)
    for (form, kind, direct), out in zip(_MOE_ALIGN_CASES, results):
        case = (form, kind, direct, out)
        kernels = out["kernels"].split(",")
        assert kernels.count("_grouped_gemm_kernel") == 4 and out["dims"] == 1, case
        assert out["gemm_rows"] == "sym_min", case
        assert kernels.count("_act_quant_ieee_kernel") == 2, case
        if form in ("kernel", "default") and kind == "prefill":
            assert all(kernels.count(name) == 2 for name in _PARALLEL_ALIGN), case
            assert "_moe_align_kernel" not in kernels and out["aten"] == "", case
        elif form in ("kernel", "default", "single"):
            assert kernels.count("_moe_align_kernel") == 2 and out["aten"] == "", case
            assert not set(_PARALLEL_ALIGN) & set(kernels), case
            assert out["align_grid"] == ("sym_min" if direct == "1" else "1"), case
        else:
            assert "_moe_align_kernel" not in kernels and "sort" in out["aten"], case


def test_moe_align_traced_form_rejects_unknown(monkeypatch):
    from dsv3_export.engines import torch_triton, torch_triton_moe

    monkeypatch.setenv(torch_triton.MOE_ALIGN_ENV, "fast")
    with pytest.raises(ValueError, match="DSV3_TORCH_MOE_ALIGN='fast'"):
        torch_triton_moe._moe_routing(torch.zeros(2, 2, dtype=torch.int64), 4, 16)
