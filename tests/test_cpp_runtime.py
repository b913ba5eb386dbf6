"""runtime/cpp (dsv3-run): builds with CMake against the torch wheel and matches the Python runtime.

Skipped, with the reason, when cmake or a C++ compiler is missing. The build (~40-90 s on two
cores) and the tiny engine (tests/engines/_torch_engine.py) are made once per test run, shared by the
pytest-xdist workers (tests/_shared_build.py: a module fixture alone built it once in each worker).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dsv3_export.runtime import load_engine
from tests._shared_build import built_once
from tests.engines._torch_engine import tiny_torch_engine

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "cpp"


def _missing_tools() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++/g++) on PATH"
    return None


def _cmake_build(build: Path) -> None:
    configure = ["cmake", "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def dsv3_run(tmp_path_factory) -> Path:
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    exe = built_once(tmp_path_factory, "cpp_build", _cmake_build) / "dsv3-run"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def engine_dir() -> Path:
    return tiny_torch_engine()


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cpp_tokens_match_python_runtime(dsv3_run, engine_dir, seed):
    g = torch.Generator().manual_seed(seed)
    engine = load_engine(engine_dir)
    prompt = torch.randint(0, engine.args.vocab_size, (7,), generator=g).tolist()
    done = _run(dsv3_run, engine_dir, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", 32)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"tokens": engine.generate(prompt, max_new_tokens=32)}


def test_cpp_single_token_prompt_uses_decode_package(dsv3_run, engine_dir):
    engine = load_engine(engine_dir)
    done = _run(dsv3_run, engine_dir, "--prompt-ids", "42", "--max-new-tokens", 5)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] == engine.generate([42], max_new_tokens=5)


def test_cpp_fills_max_seq_len_exactly(dsv3_run, engine_dir):
    """A prompt of max_seq_len tokens still gets its one new token (the last token is not fed back: L + N - 1
    positions), as in the Python runtime; one more is refused with the sizes named."""
    engine = load_engine(engine_dir)
    prompt = ",".join(str((7 * i + 3) % engine.args.vocab_size) for i in range(engine.args.max_seq_len))
    done = _run(dsv3_run, engine_dir, "--prompt-ids", prompt, "--max-new-tokens", 1)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] == engine.generate(list(map(int, prompt.split(","))), max_new_tokens=1)
    done = _run(dsv3_run, engine_dir, "--prompt-ids", prompt, "--max-new-tokens", 2)
    assert done.returncode == 1 and f"and be <= max_seq_len {engine.args.max_seq_len}" in done.stderr


def _copy(engine_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "engine"
    shutil.copytree(engine_dir, out)
    return out


def test_cpp_refuses_altered_file(dsv3_run, engine_dir, tmp_path):
    bad = _copy(engine_dir, tmp_path)
    weights = bad / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # same size, one bit of one weight changed
    weights.write_bytes(bytes(data))
    done = _run(dsv3_run, bad, "--prompt-ids", "1,2")
    assert done.returncode == 1
    assert "weights.safetensors: sha256" in done.stderr and "does not match" in done.stderr


def test_cpp_refuses_unlisted_file(dsv3_run, engine_dir, tmp_path):
    bad = _copy(engine_dir, tmp_path)
    (bad / "extra.bin").write_bytes(b"x")
    done = _run(dsv3_run, bad, "--prompt-ids", "1,2")
    assert done.returncode == 1 and "extra.bin: unexpected file" in done.stderr


def test_cpp_refuses_cpu_without_required_flags(dsv3_run, engine_dir, tmp_path):
    bad = _copy(engine_dir, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["backend_info"]["cpu_flags_required"].append("avx10_99")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    done = _run(dsv3_run, bad, "--prompt-ids", "1,2")
    assert done.returncode == 1 and "this CPU lacks avx10_99" in done.stderr


def test_cpp_checks_constants_against_the_build_record(dsv3_run, engine_dir, tmp_path):
    """A constant whose recorded shape or dtype disagrees with the weights file is refused, naming it
    (the package would index it blindly); an unrecorded one too."""
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    records = manifest["backend_info"]["constants"]
    fqn = next(name for name, r in records.items() if len(r["shape"]) == 2)
    for i, edit in enumerate((lambda r: r[fqn].update(shape=[r[fqn]["shape"][0] + 1, r[fqn]["shape"][1]]),
                              lambda r: r[fqn].update(dtype="float16"),
                              lambda r: r.pop(fqn))):
        bad = _copy(engine_dir, tmp_path / str(i))
        m = json.loads((bad / "manifest.json").read_text())
        edit(m["backend_info"]["constants"])
        (bad / "manifest.json").write_text(json.dumps(m))
        done = _run(dsv3_run, bad, "--prompt-ids", "1,2")
        assert done.returncode == 1 and f"'{fqn}'" in done.stderr, done.stderr
        assert ("did not record" if i == 2 else "the package was compiled for") in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cpp_refuses_cuda_engine_with_cpu_libtorch(dsv3_run, engine_dir, tmp_path):
    bad = _copy(engine_dir, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["backend_info"].update(device_kind="cuda", compute_capability="9.0")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    done = _run(dsv3_run, bad, "--prompt-ids", "1,2")
    assert done.returncode == 1 and "built for CUDA" in done.stderr


def test_cpp_rejects_other_backends_and_bad_usage(dsv3_run, engine_dir, tmp_path):
    bad = _copy(engine_dir, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["backend"] = "onnxruntime"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    done = _run(dsv3_run, bad, "--prompt-ids", "1,2")
    assert done.returncode == 1 and "runs only torch-backend engines" in done.stderr
    assert _run(dsv3_run, engine_dir).returncode == 2  # no --prompt-ids
    assert _run(dsv3_run, engine_dir, "--prompt-ids", "1,x").returncode == 2
    done = _run(dsv3_run, engine_dir, "--prompt-ids", "1,999999")
    assert done.returncode == 1 and "outside the vocabulary" in done.stderr
