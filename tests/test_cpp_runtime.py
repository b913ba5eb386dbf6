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


def _grow_vocab(m: dict, logits_too: bool) -> None:
    m["model"]["vocab_size"] += 1000
    if logits_too:
        next(s for s in m["outputs"] if s["name"] == "logits")["shape"][-1] += 1000


def _set_layers(m: dict, n: int) -> None:
    m["model"]["n_layers"] = n
    m["kv_cache"]["shape"][1] = n


_LONG_PROMPT = ("--prompt-ids", ",".join(str(i % 1000) for i in range(300)), "--max-new-tokens", "4")
_MANIFEST_EDITS = {  # id: (edit of manifest.json, dsv3-run's arguments, the key named, what the message says of it)
    # sizes beyond the payload's tables: the package indexed past them (exit 134) or ran with a wrong bound
    "vocab_vs_logits": (lambda m: _grow_vocab(m, False), ("--prompt-ids", "1500,2"), "model.vocab_size",
                        "is 2000 but the 'logits' output's last dimension is 1000"),
    "vocab_vs_embedding": (lambda m: _grow_vocab(m, True), ("--prompt-ids", "1500,2"), "model.vocab_size",
                           "is 2000 but the payload's embedding"),
    "max_seq_len_vs_rope": (lambda m: m["model"].update(max_seq_len=512), _LONG_PROMPT, "model.max_seq_len",
                            "is 512 but the payload's rope table"),
    "n_layers_vs_weights": (lambda m: _set_layers(m, 3), (), "model.n_layers", "is 3 but the payload's weights"),
    "width_vs_cache_spec": (lambda m: m["model"].update(kv_lora_rank=32), (), "kv_cache.shape",
                            "width 80 differs from the model's latent cache width 48"),
    "cache_dtype_vs_input": (lambda m: m["kv_cache"].update(dtype="bfloat16"), (), "kv_cache.dtype",
                             "is \"bfloat16\" but the packages' 'kv_cache' input is \"float32\""),
    # wrong JSON types
    "n_layers_string": (lambda m: m["model"].update(n_layers="2"), (), "model.n_layers",
                        "must be an integer, got \"2\""),
    "max_seq_len_float": (lambda m: m["model"].update(max_seq_len=256.0), (), "model.max_seq_len",
                          "must be an integer, got 256.0"),
    "vocab_bool": (lambda m: m["model"].update(vocab_size=True), (), "model.vocab_size",
                   "must be an integer, got true"),
    "cache_dtype_int": (lambda m: m["kv_cache"].update(dtype=32), (), "kv_cache.dtype", "must be a string, got 32"),
    "model_list": (lambda m: m.update(model=[1]), (), "model", "must be an object, got [1]"),
    # missing keys
    "model_key_missing": (lambda m: m["model"].pop("kv_lora_rank"), (), "model", "lacks key(s) ['kv_lora_rank']"),
    "packages_key_missing": (lambda m: m["backend_info"]["packages"].pop("decode"), (), "backend_info.packages",
                             "lacks key(s) ['decode']"),
    # out of range
    "max_seq_len_negative": (lambda m: m["model"].update(max_seq_len=-1), (), "model.max_seq_len",
                             "must be >= 1, got -1"),
    "n_layers_negative": (lambda m: m["model"].update(n_layers=-2), (), "model.n_layers", "must be >= 1, got -2"),
    "max_batch_size_negative": (lambda m: m["model"].update(max_batch_size=-1), (), "model.max_batch_size",
                                "must be >= 1, got -1"),
    "file_size_negative": (lambda m: m["files"]["decode.pt2"].update(size=-1), (), "files.decode.pt2.size",
                           "must be >= 0, got -1"),
    "format_version_zero": (lambda m: m.update(format_version=0), (), "format_version", "must be >= 1, got 0"),
    # a payload file the manifest does not list (and so does not verify)
    "weights_unlisted": (lambda m: m["backend_info"].update(weights="../engine/weights.safetensors"), (),
                         "backend_info.weights",
                         "names \"../engine/weights.safetensors\", which 'files' does not list"),
}


@pytest.mark.parametrize("case", list(_MANIFEST_EDITS))
def test_cpp_refuses_edited_manifest(dsv3_run, engine_dir, tmp_path, case):
    """manifest.json is not hashed: an edited key is refused on one line naming manifest.json, the key and the value
    found (exit 1, as for any bad engine directory), never an abort (134) or a libtorch error from inside a package."""
    edit, args, key, says = _MANIFEST_EDITS[case]
    bad = _copy(engine_dir, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    done = _run(dsv3_run, bad, *(args or ("--prompt-ids", "1,2")))
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and done.stdout == "", done.stderr[-2000:]
    assert done.stderr.startswith(f"dsv3-run: error: {bad / 'manifest.json'}: '{key}' {says}"), done.stderr
