"""Engine directory: atomic writing, and every way loading must refuse a directory, naming the file."""

from __future__ import annotations

import json
import os

import pytest

from dsv3_export.manifest import (FORMAT_VERSION, MANIFEST_NAME, EngineDirError, Manifest, kv_cache_layout,
                                  read_manifest, verify_engine_dir, write_engine_dir)
from dsv3_export.reference import ModelArgs


def manifest() -> Manifest:
    args = ModelArgs.preset("tiny")
    return Manifest(model=args.to_dict(), backend="onnxruntime", precision="fp32", device="cpu",
                    inputs=[{"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"]}],
                    outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", args.vocab_size]}],
                    kv_cache=kv_cache_layout(args, "float32"))


def fill_payload(tmp):
    (tmp / "model.onnx").write_bytes(b"graph" * 100)
    (tmp / "model.onnx.data").write_bytes(os.urandom(4096))
    return manifest()


@pytest.fixture
def engine(tmp_path):
    out = tmp_path / "engine"
    write_engine_dir(out, fill_payload)
    return out


def test_written_dir_holds_manifest_and_payload_only(engine):
    assert sorted(p.name for p in engine.iterdir()) == [MANIFEST_NAME, "model.onnx", "model.onnx.data"]
    m = verify_engine_dir(engine)
    assert m.format_version == FORMAT_VERSION and set(m.files) == {"model.onnx", "model.onnx.data"}
    assert m.files["model.onnx"].size == 500 and len(m.files["model.onnx"].sha256) == 64
    assert m.versions["torch"] and "tensorrt" in m.versions and m.created
    assert m.kv_cache["shape"][-1] == 80 and m.model["vocab_size"] == 1000


def test_failed_build_leaves_nothing(tmp_path):
    def broken(tmp):
        (tmp / "model.onnx").write_bytes(b"half")
        raise RuntimeError("backend failed")

    with pytest.raises(RuntimeError, match="backend failed"):
        write_engine_dir(tmp_path / "engine", broken)
    assert list(tmp_path.iterdir()) == []  # no engine, no temporary directory


def test_rebuild_replaces_an_engine_but_not_other_directories(engine, tmp_path):
    first = verify_engine_dir(engine).files["model.onnx.data"].sha256
    write_engine_dir(engine, fill_payload)
    assert verify_engine_dir(engine).files["model.onnx.data"].sha256 != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    precious = tmp_path / "mydata"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(EngineDirError, match="not an engine directory"):
        write_engine_dir(precious, fill_payload)
    assert (precious / "notes.txt").read_text() == "keep"


def test_flipped_byte_is_refused(engine):
    data = engine / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1234] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(EngineDirError, match=r"model\.onnx\.data: sha256 .* does not match"):
        verify_engine_dir(engine)


def test_resized_file_is_refused_before_hashing(engine):
    with open(engine / "model.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(EngineDirError, match=r"model\.onnx: size 501 differs"):
        verify_engine_dir(engine, check_hashes=False)


def test_missing_file_is_refused(engine):
    (engine / "model.onnx.data").unlink()
    with pytest.raises(EngineDirError, match=r"model\.onnx\.data: missing"):
        verify_engine_dir(engine)


def test_extra_file_is_refused(engine):
    (engine / "evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(EngineDirError, match=r"evil\.so: unexpected file"):
        verify_engine_dir(engine)


def test_nested_directory_is_refused(engine):
    (engine / "sub").mkdir()
    with pytest.raises(EngineDirError, match=r"sub: unexpected directory"):
        verify_engine_dir(engine)


def test_symlinked_payload_is_refused(engine, tmp_path):
    outside = tmp_path / "outside.data"
    (engine / "model.onnx.data").rename(outside)
    (engine / "model.onnx.data").symlink_to(outside)  # same bytes, so the hash would match
    with pytest.raises(EngineDirError, match=r"model\.onnx\.data: is a symlink"):
        verify_engine_dir(engine)


def _edit_manifest(engine, change):
    path = engine / MANIFEST_NAME
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def test_newer_format_version_is_refused(engine):
    _edit_manifest(engine, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(EngineDirError, match=rf"manifest\.json: format version {FORMAT_VERSION + 1} is newer"):
        read_manifest(engine)


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", ".hidden", MANIFEST_NAME])
def test_payload_names_outside_the_directory_are_refused(engine, name):
    _edit_manifest(engine, lambda d: d["files"].update({name: {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(EngineDirError, match="invalid payload file name"):
        verify_engine_dir(engine)


def test_malformed_manifests_are_refused(engine, tmp_path):
    _edit_manifest(engine, lambda d: d.update(surprise=1))
    with pytest.raises(EngineDirError, match=r"unknown manifest key\(s\) \['surprise'\]"):
        read_manifest(engine)
    (engine / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(EngineDirError, match="cannot parse"):
        read_manifest(engine)
    with pytest.raises(EngineDirError, match=r"manifest\.json: missing"):
        read_manifest(tmp_path)


# manifest.json is not hashed: an edit that leaves every payload hash valid is refused, naming the key ----------------

def _refused(engine, change, match):
    """The edited manifest is refused with `match` naming manifest.json; the original is put back after."""
    original = (engine / MANIFEST_NAME).read_text()
    _edit_manifest(engine, change)
    with pytest.raises(EngineDirError, match=match) as info:
        verify_engine_dir(engine)
    assert MANIFEST_NAME in str(info.value)
    (engine / MANIFEST_NAME).write_text(original)


def _set_model(key, value):
    return lambda d: d["model"].update({key: value})


def test_vocab_size_beyond_the_logits_width_is_refused(engine):
    """Was: a torch CPU engine aborted the process (exit 134) on an id in [1000, 5000)."""
    _refused(engine, _set_model("vocab_size", 5000), r"'model\.vocab_size' is 5000 but the 'logits' output's last "
                                                   r"dimension is 1000")


def test_deleted_model_key_is_refused(engine):
    """Was: inspect's raw KeyError: 'vocab_size' (ModelArgs filled in the 16b default)."""
    _refused(engine, lambda d: d["model"].pop("vocab_size"), r"'model' lacks key\(s\) \['vocab_size'\]")


@pytest.mark.parametrize("key, value, match", [
    ("vocab_size", "1000", r"'model\.vocab_size' must be an integer"),
    ("rope_theta", "1e4", r"'model\.rope_theta' must be a number"),
    ("n_layers", True, r"'model\.n_layers' must be an integer"),
    ("attn_impl", "fast", r"'model' is not a valid model: .*attn_impl='fast'"),
    ("surprise", 1, r"'model' is not a valid model: .*unknown key\(s\) \['surprise'\]"),
])
def test_model_fields_are_type_checked(engine, key, value, match):
    _refused(engine, _set_model(key, value), match)


@pytest.mark.parametrize("key, value, match", [
    ("files", [], r"'files' must be an object, got \[\]"),
    ("model", None, r"'model' must be an object, got None"),
    ("kv_cache", None, r"'kv_cache' must be an object, got None"),
    ("inputs", None, r"'inputs' must be a list, got None"),
    ("outputs", {}, r"'outputs' must be a list"),
    ("backend", 1, r"'backend' must be a string"),
    ("compute_capability", 9.0, r"'compute_capability' must be a string or null"),
    ("format_version", True, r"'format_version' must be an integer"),
])
def test_top_level_types_are_checked(engine, key, value, match):
    """Was: AttributeError ('list' object has no attribute 'items'), TypeErrors, or inspect half printed."""
    _refused(engine, lambda d: d.update({key: value}), match)


@pytest.mark.parametrize("key, value, match", [
    ("device", "tpu", r"'device' is 'tpu', not one of \['cpu', 'cuda'\]"),
    ("precision", "fp4", r"'precision' is 'fp4', not one of \['fp32', 'bf16', 'fp8'\]"),
    ("backend", "tvm", r"'backend' is 'tvm', not one of \['onnxruntime', 'torch', 'tensorrt'\]"),
    ("format_version", 0, rf"'format_version' must be in \[1, {FORMAT_VERSION}\], got 0"),
    ("format_version", -1, rf"'format_version' must be in \[1, {FORMAT_VERSION}\], got -1"),
])
def test_values_outside_the_accepted_ones_are_refused(engine, key, value, match):
    """Was: KeyError: 'tpu' in the ONNX backend; the others accepted silently."""
    _refused(engine, lambda d: d.update({key: value}), match)


@pytest.mark.parametrize("entry, match", [
    ({"size": "500", "sha256": "0" * 64}, r"'files\.model\.onnx\.size' must be an integer, got '500'"),
    ({"size": -1, "sha256": "0" * 64}, r"'files\.model\.onnx\.size' must be >= 0"),
    ({"size": 500, "sha256": "xyz"}, r"'files\.model\.onnx\.sha256' must be 64 lowercase hex digits"),
    ({"size": 500}, r"'files\.model\.onnx' must have exactly the keys"),
    ("500", r"'files\.model\.onnx' must be an object"),
])
def test_file_entries_are_checked(engine, entry, match):
    """Was: 'size 500 differs from the manifest's 500' for a string size."""
    _refused(engine, lambda d: d["files"].update({"model.onnx": entry}), match)


def test_specs_are_checked_against_the_model(engine):
    def drop_logits(d):
        d["outputs"] = [s for s in d["outputs"] if s["name"] != "logits"]

    _refused(engine, drop_logits, r"'outputs' has no 'logits' output")
    _refused(engine, lambda d: d["outputs"].append({"name": "x", "dtype": "float32", "shape": [-1]}),
             r"'outputs\[1\]\.shape' must hold sizes >= 0 or names")
    _refused(engine, lambda d: d["inputs"][0].pop("dtype"), r"'inputs\[0\]' lacks key\(s\) \['dtype'\]")


def test_kv_cache_layout_is_checked_against_the_model(engine):
    _refused(engine, lambda d: d["kv_cache"]["shape"].__setitem__(3, 81),
             r"'kv_cache\.shape' width 81 differs from the model's latent cache width 80")
    _refused(engine, lambda d: d["kv_cache"]["shape"].__setitem__(1, 2),
             r"'kv_cache\.shape' layers 2 differ from model\.n_layers=3")
    _refused(engine, lambda d: d["kv_cache"].update(shape=None), r"'kv_cache\.shape' must be a list of 4")
    _refused(engine, lambda d: d["kv_cache"].update(dtype="float99"), r"'kv_cache\.dtype' is not a torch dtype")
    # was accepted, then a raw error inside the backend (dsv3-run refuses it too: runtime/cpp/src/manifest_checks.cpp)
    def cache_fed_as_float32(d):
        d["inputs"].append({"name": "kv_cache", "dtype": "float32", "shape": ["batch", 3, "cache_len", 80]})
        d["kv_cache"]["dtype"] = "bfloat16"

    _refused(engine, cache_fed_as_float32, r"'kv_cache\.dtype' is 'bfloat16' but the 'kv_cache' input is 'float32'")
    _refused(engine, _set_model("kv_lora_rank", 32), r"'kv_cache\.shape' width 80 differs .* width 48")


def test_bad_manifest_makes_inspect_exit_1_with_the_key_named(engine, capsys):
    from dsv3_export.cli import main

    _edit_manifest(engine, lambda d: d.update(inputs=None))
    assert main(["inspect", str(engine)]) == 1
    err = capsys.readouterr().err
    assert "manifest.json" in err and "'inputs' must be a list" in err


# the model's sizes against the payload's tables (the manifest's own specs edited to agree) --------------------------

def _tables(args):
    import torch

    half = args.qk_rope_head_dim // 2
    return {"embed.weight": torch.zeros(args.vocab_size, 4), "rope_cos": torch.zeros(args.max_seq_len, half),
            "rope_sin": torch.zeros(args.max_seq_len, half)}


def _fill_torch(tmp):
    from safetensors.torch import save_file

    m = manifest()
    save_file(_tables(ModelArgs.from_dict(m.model)), str(tmp / "weights.safetensors"))
    m.backend, m.backend_info = "torch", {"weights": "weights.safetensors"}
    return m


def _fill_onnx(tmp):
    import onnx
    from onnx import helper, numpy_helper

    m = manifest()
    tables = _tables(ModelArgs.from_dict(m.model))
    inits = [numpy_helper.from_array(tables["embed.weight"].numpy(), "embed.weight"),
             numpy_helper.from_array(tables["rope_cos"].numpy(), "val_7"),
             numpy_helper.from_array(tables["rope_sin"].numpy(), "val_15")]
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["val_7"], ["y"])], "g", [], [out], inits)
    onnx.save_model(helper.make_model(graph), str(tmp / "model.onnx"))
    return m


@pytest.mark.parametrize("fill", [_fill_torch, _fill_onnx], ids=["torch", "onnxruntime"])
def test_model_sizes_beyond_the_payload_tables_are_refused(tmp_path, fill):
    """Was: raw GatherND / C++ errors past the rope tables, a process abort past the embedding."""
    engine = tmp_path / "engine"
    write_engine_dir(engine, fill)
    assert verify_engine_dir(engine).model["max_seq_len"] == 256
    _refused(engine, _set_model("max_seq_len", 4096),
             r"'model\.max_seq_len' is 4096 but the payload's rope tables have 256 positions")

    def vocab_5000(d):
        d["model"]["vocab_size"] = d["outputs"][0]["shape"][-1] = 5000

    _refused(engine, vocab_5000, r"'model\.vocab_size' is 5000 but the payload's embedding has 1000 rows")
