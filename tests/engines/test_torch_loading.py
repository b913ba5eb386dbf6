"""Loading defences of the torch backend (engines/torch_step.py) and the GPU load probe, on CPU.

The CUDA crash these guard against (torch 2.11, H200) cannot happen here; what is tested is that
each defence does what it says: constants checked and placed before a package keeps handles to
them, the handed tensors kept alive, run_single_threaded equal to the thread-safe run, the
switches parsed, and benchmarks/torch_load_probe.py's stages run and report.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv3_export.engines.base import torch_dtype
from dsv3_export.engines.torch import decode_cuda_graph
from dsv3_export.engines.torch_step import (CUDA_GRAPH_ENV, AOTIStep, constant_records, env_flag, load_package,
                                            load_weights, prepare_constants)
from dsv3_export.manifest import verify_engine_dir
from dsv3_export.step import LatentCacheStep
from tests.conftest import TOLERANCES, rel_err
from tests.engines._torch_engine import reference_model, tiny_torch_engine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine_dir() -> Path:
    return tiny_torch_engine()


@pytest.fixture(scope="module")
def parts(engine_dir):
    manifest = verify_engine_dir(engine_dir)
    info = dict(manifest.backend_info)
    packages = {kind: engine_dir / name for kind, name in info["packages"].items()}
    return manifest, info, packages


def _step_inputs(model, seed: int, seqlen: int):
    g = torch.Generator().manual_seed(seed)
    a = model.args
    tokens = torch.randint(0, a.vocab_size, (2, seqlen), generator=g)
    start = torch.randint(0, 11 - seqlen, (2,), generator=g)
    cache = torch.randn(2, a.n_layers, 11, a.latent_cache_width, generator=g)
    return tokens, start, cache


def test_manifest_records_every_constant_as_in_the_weights_file(engine_dir, parts):
    _, info, _ = parts
    record = info["constants"]
    with safe_open(str(engine_dir / info["weights"]), framework="pt") as f:
        names = set(f.keys())
        assert set(record) == names
        for name in names:
            t = f.get_tensor(name)
            assert record[name]["dtype"] == str(t.dtype).removeprefix("torch.") and record[name]["shape"] == list(t.shape)
            assert len(record[name]["stride"]) == t.dim() and record[name]["device"] == "cpu"


def test_prepare_constants_refuses_what_the_package_was_not_compiled_for(tmp_path):
    path = tmp_path / "decode.pt2"
    w = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(4)}
    expected = constant_records(w)
    with pytest.raises(ValueError, match=r"decode\.pt2: package needs constants missing .*'c\.weight'"):
        prepare_constants(path, ["a.weight", "c.weight"], w, torch.device("cpu"), expected)
    with pytest.raises(ValueError, match=r"constant 'a\.weight' is float64 \(3, 4\) .* compiled for float32 \(3, 4\)"):
        prepare_constants(path, ["a.weight"], {**w, "a.weight": w["a.weight"].double()}, torch.device("cpu"), expected)
    with pytest.raises(ValueError, match=r"constant 'b\.bias' is float32 \(5,\) .* compiled for float32 \(4,\)"):
        prepare_constants(path, ["b.bias"], {**w, "b.bias": torch.randn(5)}, torch.device("cpu"), expected)
    with pytest.raises(ValueError, match=r"constants the build did not record: \['b\.bias'\]"):
        prepare_constants(path, ["b.bias"], w, torch.device("cpu"), {"a.weight": expected["a.weight"]})
    with pytest.raises(TypeError, match=r"constant 'a\.weight' is a list"):
        prepare_constants(path, ["a.weight"], {"a.weight": [1.0]}, torch.device("cpu"))


def test_prepare_constants_aliases_or_restrides(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    w = {"w": torch.randn(5, 7, generator=g), "t": torch.randn(7, 5, generator=g).t()}  # "t": strides (1, 5)
    expected = constant_records(w)
    assert expected["t"]["stride"] == [1, 5]
    stored = {k: v.contiguous() for k, v in w.items()}  # what save_weights writes
    out = prepare_constants(tmp_path / "p.pt2", ["w", "t"], stored, torch.device("cpu"), expected)
    assert out["w"] is stored["w"]  # same device, layout as compiled: handed over without a copy
    assert out["t"].stride() == (1, 5) and torch.equal(out["t"], w["t"])
    # a constant recorded on another device type is placed there, e.g. "cuda" on a CPU engine
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError), match="CUDA|cuda"):
            prepare_constants(tmp_path / "p.pt2", ["w"], stored, torch.device("cpu"),
                              {"w": {**expected["w"], "device": "cuda"}})
    # no record (engines built before it): names only, non-contiguous made contiguous
    out = prepare_constants(tmp_path / "p.pt2", ["t"], w, torch.device("cpu"))
    assert out["t"].is_contiguous() and torch.equal(out["t"], w["t"])


def test_step_keeps_the_tensors_it_handed_over(parts, seed):
    """The packages hold handles to the weight tensors (user_managed): the caller dropping its dict
    must not matter, and both packages share the very same tensors (no copy)."""
    manifest, info, packages = parts
    weights = load_weights(packages["decode"].parent / info["weights"], torch.device("cpu"))
    ids = {k: v.data_ptr() for k, v in weights.items()}
    step = AOTIStep.from_packages(packages, weights, torch.device("cpu"), torch_dtype(manifest.kv_cache["dtype"]),
                                  constants=info["constants"])
    del weights
    gc.collect()
    assert not step.graphs_keyed_by_cache  # CPU: no decode graphs, so generate allocates a cache per call
    handed = step._weights
    for kind in ("prefill", "decode"):
        assert handed[kind] and all(t.data_ptr() == ids[f] for f, t in handed[kind].items())
    model = reference_model()
    for seqlen in (1, 4):
        tokens, start, cache = _step_inputs(model, seed + seqlen, seqlen)
        with torch.no_grad():
            want, _ = LatentCacheStep(model).eval()(tokens, start, cache)
        got, _ = step(tokens, start, cache)
        assert rel_err(got, want) < TOLERANCES["fp32_engine"]


def test_a_restrided_constant_is_placed_once_for_both_packages(parts, seed):
    """A weight that must be copied to the recorded strides is copied once: the prefill and the
    decode package hold the same tensor (a 16b model would otherwise carry a second copy)."""
    manifest, info, packages = parts
    weights = load_weights(packages["decode"].parent / info["weights"], torch.device("cpu"))
    fqn = next(f for f, r in info["constants"].items() if len(r["shape"]) == 2 and min(r["shape"]) > 1)
    weights[fqn] = weights[fqn].t().contiguous().t()  # same values, column-major: not the recorded strides
    step = AOTIStep.from_packages(packages, weights, torch.device("cpu"), torch_dtype(manifest.kv_cache["dtype"]),
                                  constants=info["constants"])
    prefill, decode = step._weights["prefill"][fqn], step._weights["decode"][fqn]
    assert prefill.stride() == tuple(info["constants"][fqn]["stride"]) and torch.equal(prefill, weights[fqn])
    assert prefill.data_ptr() == decode.data_ptr() != weights[fqn].data_ptr()
    model = reference_model()
    tokens, start, cache = _step_inputs(model, seed, 1)
    with torch.no_grad():
        want, _ = LatentCacheStep(model).eval()(tokens, start, cache)
    assert rel_err(step(tokens, start, cache)[0], want) < TOLERANCES["fp32_engine"]


def test_single_threaded_run_equals_thread_safe_run(parts, seed):
    manifest, info, packages = parts
    weights = load_weights(packages["decode"].parent / info["weights"], torch.device("cpu"))
    cache_dtype = torch_dtype(manifest.kv_cache["dtype"])
    steps = [AOTIStep.from_packages(packages, weights, torch.device("cpu"), cache_dtype, single_threaded=s)
             for s in (True, False)]
    model = reference_model()
    for seqlen in (1, 5):
        tokens, start, cache = _step_inputs(model, seed, seqlen)
        a, b = (s(tokens, start, cache) for s in steps)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_load_package_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt2: AOTInductor package not found"):
        load_package(tmp_path / "nope.pt2", torch.device("cpu"))


@pytest.mark.parametrize("victim", ["weights", "decode package"])
def test_a_truncated_file_with_matching_hashes_is_named(engine_dir, tmp_path, victim):
    """A weights file or package written wrong (intact by its hash: the manifest was made from it) is refused naming
    the file, not with safetensors' or the C++ zip reader's bare message."""
    import shutil

    from dsv3_export.manifest import EngineDirError
    from dsv3_export.runtime import load_engine
    from tests.engines._ort_engines import rehash

    engine = Path(shutil.copytree(engine_dir, tmp_path / "engine"))
    info = verify_engine_dir(engine).backend_info
    name = info["weights"] if victim == "weights" else info["packages"]["decode"]
    path = engine / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rehash(engine)
    with pytest.raises(EngineDirError, match=rf"{name}: (not a readable safetensors file|AOTInductor cannot load)"):
        load_engine(engine)


def test_switches(monkeypatch):
    monkeypatch.delenv(CUDA_GRAPH_ENV, raising=False)
    assert env_flag(CUDA_GRAPH_ENV, True) and not env_flag(CUDA_GRAPH_ENV, False)
    assert decode_cuda_graph({"decode_cuda_graph": True}) and not decode_cuda_graph({"decode_cuda_graph": False})
    for value, want in (("0", False), ("off", False), ("1", True), ("TRUE", True)):
        monkeypatch.setenv(CUDA_GRAPH_ENV, value)
        assert env_flag(CUDA_GRAPH_ENV, not want) is want
    monkeypatch.setenv(CUDA_GRAPH_ENV, "0")
    assert not decode_cuda_graph({"decode_cuda_graph": True})
    monkeypatch.setenv(CUDA_GRAPH_ENV, "maybe")
    with pytest.raises(ValueError, match="DSV3_TORCH_CUDA_GRAPH='maybe': expected 0 or 1"):
        env_flag(CUDA_GRAPH_ENV, True)


def _probe(args: list[str], out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "torch_load_probe.py"), "--device", "cpu",
                           "--out", str(out), *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          check=False)
    return done, json.loads((out / "torch_load_probe.json").read_text())


def test_probe_reports_a_native_crash_with_both_stacks(tmp_path):
    done, report = _probe(["--stages", "selftest_segv"], tmp_path)
    assert done.returncode == 1
    (stage,) = report["stages"]
    assert stage["status"] == "SIGSEGV" and stage["last_step"] == "read address 0"
    assert "Fatal Python error: Segmentation fault" in stage["stderr_tail"]
    if report["native_handler"]:
        assert "native stack (dsv3 probe handler)" in stage["stderr_tail"]


@pytest.mark.slow
def test_probe_stages_run_on_cpu(engine_dir, tmp_path):
    """Every CPU stage's code: load, attach and prefill are the first steps of decode (each stage runs
    the earlier ones in its own process), so they are not run again as stages of their own (~7 s each)."""
    stages = "decode,decode_threadsafe,engine,aoti_load_package"
    done, report = _probe(["--engine", str(engine_dir), "--stages", stages], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [s["stage"] for s in report["stages"]] == stages.split(",")
    assert all(s["status"] == "ok" for s in report["stages"]), report
    decode = {s["stage"]: s for s in report["stages"]}["decode"]
    for line in ("prefill: logits (2, 7,", "decode: logits (2, 1,", "finite=True"):
        assert line in decode["stdout_tail"], decode["stdout_tail"]
    assert decode["last_step"] == "decode synchronize"


def test_triton_ops_switch_lowers_cuda_programs_to_aten(monkeypatch):
    """DSV3_TORCH_TRITON_OPS=0 (the probe's --aten-only) builds CUDA packages without our triton_ops;
    traced on the CPU (no constants, so no move to a GPU is needed)."""
    from dsv3_export.engines.torch import TRITON_OPS_ENV, lower_program

    import dsv3_export.ops  # noqa: F401 - registers dsv3::mla_attention

    class Attn(torch.nn.Module):
        def forward(self, q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b):
            return torch.ops.dsv3.mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, 0.25)

    b, h, dn, r, c, dv, t = 2, 3, 8, 4, 10, 6, 5
    args = (torch.randn(b, 1, h, dn), torch.randn(b, 1, h, r), torch.randn(b, 1, c + r), torch.randn(b, t, c + r),
            torch.tensor([1, 4]), torch.randn(h * (dn + dv), c))
    ep = torch.export.export(Attn(), args)
    monkeypatch.setenv(TRITON_OPS_ENV, "0")
    lowered, how = lower_program(ep, "cuda", "decode")
    assert how["dsv3::mla_attention"].startswith("ATen decomposition")
    assert not any("dsv3" in str(n.target) for n in lowered.graph.nodes if n.op == "call_function")
    assert rel_err(lowered.module()(*args), Attn()(*args)) < TOLERANCES["fp32_structural"]
