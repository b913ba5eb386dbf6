"""Loading an ONNX Runtime engine refuses external data that leaves the engine directory.

The manifest's hashes cannot catch this: a malicious directory comes with a manifest that matches
its own files. So each case below rewrites model.onnx AND re-hashes the manifest, and loading
must still refuse, before any session is created, naming model.onnx, the tensor and why.
"""

from __future__ import annotations

import shutil

import onnx
import pytest

from dsv3_export.engines.onnx_graph import DATA_FILE, MODEL_FILE
from dsv3_export.manifest import MANIFEST_NAME, EngineDirError
from dsv3_export.runtime import load_engine
from tests.engines._ort_engines import copy_engine, fp32_engine_dir, rehash


def relocate_first_weight(engine_dir, location: str) -> str:
    model_path = engine_dir / MODEL_FILE
    proto = onnx.load(str(model_path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, str(model_path))
    rehash(engine_dir)
    return tensor.name


@pytest.mark.parametrize("location", [f"../{DATA_FILE}", "/etc/hostname", MANIFEST_NAME, f"sub/../{DATA_FILE}"])
def test_external_data_outside_the_payload_is_refused(tmp_path, location):
    engine = copy_engine(fp32_engine_dir(), tmp_path / "engine")
    shutil.copy(engine / DATA_FILE, tmp_path / DATA_FILE)  # what '..' would reach
    tensor = relocate_first_weight(engine, location)
    with pytest.raises(ValueError, match=rf"model\.onnx: tensor '{tensor}' has external-data location") as info:
        load_engine(engine)
    assert repr(location)[1:-1] in str(info.value)


def test_symlinked_data_file_is_refused(tmp_path):
    engine = copy_engine(fp32_engine_dir(), tmp_path / "engine")
    outside = tmp_path / "elsewhere.data"
    shutil.move(engine / DATA_FILE, outside)
    (engine / DATA_FILE).symlink_to(outside)
    with pytest.raises(EngineDirError, match=r"model\.onnx\.data: is a symlink"):
        load_engine(engine)


def test_tampered_graph_is_refused_by_hash(tmp_path):
    engine = copy_engine(fp32_engine_dir(), tmp_path / "engine")
    raw = bytearray((engine / MODEL_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x40
    (engine / MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(EngineDirError, match=r"model\.onnx: sha256"):
        load_engine(engine)


def test_truncated_model_with_matching_hashes_is_named(tmp_path):
    """A model.onnx written wrong (intact by its hash: the manifest was made from it) is refused naming the file, not
    with onnxruntime's bare InvalidProtobuf."""
    engine = copy_engine(fp32_engine_dir(), tmp_path / "engine")
    model_path = engine / MODEL_FILE
    model_path.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    rehash(engine)
    with pytest.raises(EngineDirError, match=rf"{MODEL_FILE}: (not a readable ONNX model|onnxruntime cannot load it)"):
        load_engine(engine)


def _drop_model_file(engine_dir) -> None:
    import json

    (engine_dir / MODEL_FILE).unlink()
    d = json.loads((engine_dir / MANIFEST_NAME).read_text())
    del d["files"][MODEL_FILE]
    (engine_dir / MANIFEST_NAME).write_text(json.dumps(d))


@pytest.mark.parametrize("case", ["outside", "no_model"])
def test_refused_engine_is_a_failure_not_a_usage_error(tmp_path, capsys, case):
    """The loader's refusals (external data outside the directory, no model.onnx listed) were plain ValueErrors, which
    generate / profile / diff report as usage errors (exit 2); a bad engine directory is a failure (exit 1), as every
    other refusal of one is (EngineDirError)."""
    from dsv3_export.cli import main

    engine = copy_engine(fp32_engine_dir(), tmp_path / "engine")
    if case == "outside":
        relocate_first_weight(engine, "/etc/hostname")
    else:
        _drop_model_file(engine)
    with pytest.raises(EngineDirError, match=MODEL_FILE.replace(".", r"\.")):
        load_engine(engine)
    assert main(["generate", str(engine), "--prompt-ids", "1,2", "--max-new-tokens", "1"]) == 1
    assert MODEL_FILE in capsys.readouterr().err


def test_loading_parses_model_onnx_once_and_an_altered_one_again(tmp_path, monkeypatch):
    """verify_engine_dir's payload-size check and the loader's external-data check each parsed model.onnx (without
    its data); they now share one parse. The shared parse must not hide a change: a model.onnx rewritten after a load
    is read again, so the next load's checks see the new file."""
    from dsv3_export.engines import onnx_graph

    engine = copy_engine(fp32_engine_dir(), tmp_path / "engine")
    real, calls = onnx.load, []

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", counting)
    monkeypatch.setattr(onnx, "load_model", counting)
    onnx_graph._read_proto.cache_clear()
    load_engine(engine)
    assert calls == [str((engine / MODEL_FILE).resolve())]
    tensor = relocate_first_weight(engine, "/etc/hostname")  # (its own onnx.load is counted too)
    with pytest.raises(EngineDirError, match=rf"tensor '{tensor}' has external-data location '/etc/hostname'"):
        load_engine(engine)
