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
