"""`profile --trace` on ONNX Runtime profiles a second session of the engine's model: it must be
created with the engine's own session options, or a CUDA fp8 engine's trace would time the
per-step fp8 dequantization that the engine's session folds away (engines/ort_session.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from dsv3_export.engines import ort_session
from dsv3_export.reports import trace


class _Captured(Exception):
    pass


def test_traced_session_uses_the_engines_session_options(tmp_path, monkeypatch):
    weight = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [4, 4], np.zeros(16, np.float32).tolist())
    graph = helper.make_graph([helper.make_node("Cast", ["w"], ["y"], to=TensorProto.FLOAT)], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "model.onnx"))
    session = SimpleNamespace(get_provider_options=lambda: {}, get_providers=lambda: ["CPUExecutionProvider"])
    engine = SimpleNamespace(step=SimpleNamespace(session=session), path=tmp_path,
                             manifest=SimpleNamespace(device="cuda"))
    seen = {}

    def capture(path, options, providers):
        seen.update({key: options.get_session_config_entry(key)
                     for key in ort_session.session_config("cuda", tmp_path / "model.onnx")})
        seen["profiling"] = options.enable_profiling
        raise _Captured

    monkeypatch.setattr(ort, "InferenceSession", capture)
    with pytest.raises(_Captured):
        trace._trace_ort(engine, torch.zeros(1, 1, dtype=torch.int64), SimpleNamespace(decode_steps=1),
                         tmp_path / "trace.json")
    assert seen == {**ort_session.session_config("cuda", tmp_path / "model.onnx"), "profiling": True}
    assert seen[ort_session.DISABLE_QDQ] == "1"
