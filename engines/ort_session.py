"""ONNX Runtime session options for an engine: what ORT folds when the session is created.

    options = session_options(manifest.device, model_path)   # the loader's; tests use it too

The graph dequantizes every fp8 weight with DequantizeLinear -> Cast (engines/onnx_fp8.py). What
happens to that at session creation is the only difference between the targets:

cpu:  ORT's defaults. Its level-1 constant folding skips DequantizeLinear (it keeps QDQ node
      units for its quantized kernels), so the weights stay fp8 in memory, dequantized where used.

cuda: every DequantizeLinear -> Cast on a weight is folded into a bf16 initializer, so an fp8
      engine runs the bf16 engine's graph over the same bf16 weights (fp8 on disk only):
  session.disable_quant_qdq = 1
      ORT's level-1 ConstantFolding is built with skip_dequantize_linear = !disable_quant_qdq
      (onnxruntime/core/optimizer/graph_transformer_utils.cc). The CUDA graph has no
      QuantizeLinear, so there are no QDQ units to keep.
  optimization.constant_folding_max_output_size_in_bytes
      ORT >= 1.27 (microsoft/onnxruntime#28055) skips folding any node whose output it estimates
      above 1 GiB, logging "Skipping constant folding for <op> node ... exceeds the limit". The
      fp32 DequantizeLinear output of the 16b model's stacked experts, [64, 2816, 2048], is
      1.48 GB: unfolded, it was recomputed every step (fp8 decode 117 ms vs 32 ms for bf16 on an
      H200; 44-48 ms once folded, session 3). The limit is raised to the fp32 size of the largest
      fp8 initializer and never below ORT's default, so the guard stays on for anything larger
      than our own dequantization.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx

from dsv3_export.engines.onnx_graph import read_proto

DISABLE_QDQ = "session.disable_quant_qdq"
FOLD_LIMIT = "optimization.constant_folding_max_output_size_in_bytes"
ORT_DEFAULT_FOLD_LIMIT = 1 << 30  # kDefaultConstantFoldingMaxOutputSizeInBytes, constant_folding.cc
_FP32_BYTES = 4  # DequantizeLinear's output has its fp32 scale's type


def largest_fp8_elements(model_path: Path) -> int:
    """Elements of the largest FLOAT8E4M3FN initializer (0 if none), read without loading data."""
    proto = read_proto(model_path)
    return max((math.prod(t.dims) for t in proto.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT8E4M3FN), default=0)


def fold_limit(model_path: Path) -> int:
    """Bytes: the largest fp8 weight's fp32 dequantization, or ORT's default if that is larger."""
    return max(ORT_DEFAULT_FOLD_LIMIT, _FP32_BYTES * largest_fp8_elements(model_path))


def session_config(device: str, model_path: Path) -> dict[str, str]:
    """The session config entries (key -> value) for an engine built for `device`."""
    if device != "cuda":
        return {}
    return {DISABLE_QDQ: "1", FOLD_LIMIT: str(fold_limit(model_path))}


def session_options(device: str, model_path: Path):
    """onnxruntime.SessionOptions: all graph optimizations, plus session_config's entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in session_config(device, model_path).items():
        options.add_session_config_entry(key, value)
    return options
