"""diff's reference is checked to be the engine's model before it is built or loaded.

A 16b preset against a tiny engine drew (or, from a checkpoint, loaded) the whole fp32 model first:
on a 24 GB host the process was OOM-killed (exit 137, no message) before the mismatch was seen.
Here building any Transformer fails the test, so the refusal must come from the ModelArgs alone."""

from __future__ import annotations

import json

import pytest

import dsv3_export.checkpoint as checkpoint_pkg
from dsv3_export.manifest import Manifest
from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.model import Transformer
from dsv3_export.reports.reference import ReferenceError, load_reference


def _tiny_manifest() -> Manifest:
    return Manifest(model=ModelArgs.preset("tiny").to_dict(), backend="onnxruntime", precision="fp32", device="cpu",
                    inputs=[], outputs=[], kv_cache={}, source={"preset": "tiny", "seed": 0})


@pytest.fixture
def nothing_built(monkeypatch):
    """Any model construction or weight load fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference model was built before the model check")

    monkeypatch.setattr(Transformer, "__init__", refuse)
    monkeypatch.setattr(checkpoint_pkg, "preset_model", refuse)
    monkeypatch.setattr(checkpoint_pkg, "load_checkpoint", refuse)


def test_preset_of_another_model_is_refused_before_drawing_it(nothing_built):
    with pytest.raises(ReferenceError, match=r"another model than the engine's \(.*dim: reference 2048 vs engine 192"):
        load_reference(_tiny_manifest(), preset="16b")


def test_checkpoint_of_another_model_is_refused_before_loading_it(nothing_built, tmp_path):
    """Only config.json exists: the check reads it alone, no weight file is opened. Control: a config
    that differs in runtime sizes only (max_seq_len, max_batch_size) passes the check and reaches the load."""
    other, same = tmp_path / "other", tmp_path / "same"
    for path, args in ((other, ModelArgs.preset("tiny").replace(n_layers=5)),
                       (same, ModelArgs.preset("tiny").replace(max_seq_len=512, max_batch_size=1))):
        path.mkdir()
        (path / "config.json").write_text(json.dumps(args.to_dict()))
    with pytest.raises(ReferenceError, match=r"another model than the engine's \(n_layers: reference 5 vs engine 3\)"):
        load_reference(_tiny_manifest(), checkpoint=other)
    with pytest.raises(AssertionError, match="was built"):
        load_reference(_tiny_manifest(), checkpoint=same)
