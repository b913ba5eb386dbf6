"""ONNX Runtime backend: one ONNX graph (opset 21, external data) for the CPU or CUDA provider.

Build: the "prefill" program (dynamic batch, seq and cache_len) goes through
torch.onnx.export(dynamo=True) with a translation for every dsv3:: op it contains
(engines/onnx_ops.py: standard ONNX on the CPU, com.microsoft contrib ops on CUDA where they fit),
then the onnxscript optimizer (fp8 weights are never folded) and is saved as model.onnx + one
model.onnx.data holding every initializer.

One graph, not a prefill and a decode graph: decode is the same graph called with seq = 1. Two
graphs would store every weight twice (62 GB for the 16b model in bf16, more than the disk of
the machine that builds it) or need hand-shared external data; the decode-specific graph would
gain nothing ONNX Runtime does not already get from shapes at run time.

Load: the manifest has verified every file; the external-data locations are checked to stay in
the engine directory; then an InferenceSession is created with engines/ort_session.py's options
(on CUDA they make ORT fold every fp8 weight's dequantization into bf16 at creation). The step
function binds torch tensors by pointer (IOBinding) on both devices: on the CPU that is zero-copy
numpy, on CUDA the KV cache and the outputs stay on the GPU between steps.

CUDA streams: ONNX Runtime runs on a torch stream of its own (user_compute_stream), ordered after
the caller's current stream before each run and before it after. Passing torch's current stream
instead does not work: torch's default stream has handle 0, which ONNX Runtime reads as "no user
stream" and then runs on a non-blocking stream of its own, unordered with torch's kernels, so a
step could read start_pos / tokens / cache rows before the torch kernels writing them had run.

CUDA sizes: ONNX Runtime's CUDA kernels index with 32-bit ints, so a step whose tensors would
reach 2^31 elements (the [b, h, s, T + s] attention scores, the [b, s, V] logits of a large
prefill) is run over row chunks of the batch (engines/ort_cuda_limits.py).

Known cost: the graph reads layer i's cache as kv_cache[:, i], which ONNX (no views) computes as
a copy, so a decode step moves the whole cache once more than attention needs (~15% of a batch-64
step's bytes on the 16b model at context 1024; nothing at batch 1, where weights dominate).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch.export import ExportedProgram

from dsv3_export.engines import onnx_graph, onnx_ops, ort_session
from dsv3_export.engines.base import (BackendUnavailable, BuildOutput, Progress, Target, TensorSpec, compute_dtype,
                                      dtype_name, torch_dtype)
from dsv3_export.engines.ort_cuda_limits import CUDA_MAX_ELEMENTS, rows_per_run
from dsv3_export.export import INPUT_NAMES, OUTPUT_NAMES
from dsv3_export.reference.args import ModelArgs

if TYPE_CHECKING:
    from dsv3_export.manifest import Manifest

OPSET = 21
DIM_NAMES = {("tokens", 0): "batch", ("tokens", 1): "seq", ("kv_cache", 2): "cache_len"}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ONNX_TYPES = {torch.int64: 7, torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # TensorProto.DataType
_IR_TO_TORCH = {"INT64": torch.int64, "FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}


def _specs(values) -> list[TensorSpec]:
    out = []
    for v in values:
        dims = tuple(d if isinstance(d, int) else str(d) for d in v.shape)
        out.append(TensorSpec(v.name, dtype_name(_IR_TO_TORCH[v.dtype.name]), dims))
    return out


class OnnxRuntimeBackend:
    name = "onnxruntime"
    program_kinds = ("prefill",)

    def check_target(self, target: Target) -> str | None:
        if target.device == "cpu" and target.precision == "bf16":
            return ("ONNX Runtime's CPU provider has no bfloat16 compute (MatMul, Softmax: NOT_IMPLEMENTED); "
                    "build --precision fp32 or fp8 for --device cpu")
        return None

    def build(self, programs: Mapping[str, ExportedProgram], args: "ModelArgs", target: Target,
              out_dir: Path, progress: Progress | None = None) -> BuildOutput:
        import onnxruntime  # noqa: F401 - fail early, before a long export, when it is missing

        report = progress or (lambda msg: None)
        reason = self.check_target(target)
        if reason:
            raise BackendUnavailable(reason)
        program = programs["prefill"]
        lowerings = onnx_ops.check_program(program, target)  # raises, naming the node, if an op cannot lower
        report(f"torch.onnx.export (opset {OPSET}, {len(program.graph.nodes)} FX nodes)")
        t0 = time.perf_counter()
        with _quiet("torch.onnx._internal.exporter._registration"):  # "torchvision is not installed" x4
            onnx_program = torch.onnx.export(
                program, (), dynamo=True, opset_version=OPSET, input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES), custom_translation_table=onnx_ops.translation_table(target),
                optimize=False, verify=False, report=False)
        model = onnx_program.model
        report(f"exported in {time.perf_counter() - t0:.1f} s; optimizing")
        onnx_graph.name_dims(model, DIM_NAMES)
        onnx_graph.fold_constants(model)
        report("saving model.onnx + model.onnx.data")
        files = onnx_graph.save_with_external_data(model, out_dir)
        cache_dtype = dtype_name(compute_dtype(target))
        inputs, outputs = _specs(model.graph.inputs), _specs(model.graph.outputs)
        return BuildOutput(
            files=files, inputs=inputs, outputs=outputs, cache_dtype=cache_dtype,
            lowerings=lowerings, op_histogram=onnx_graph.op_histogram(model),
            extra={"opset": OPSET, "graphs": "one graph, dynamic seq (decode is seq = 1)",
                   "provider": PROVIDERS[target.device], "fp8_initializers": _count_fp8(model)})

    def load(self, engine_dir: Path, manifest: "Manifest") -> "OrtStep":
        import onnxruntime as ort

        provider = PROVIDERS[manifest.device]
        if provider not in ort.get_available_providers():
            raise BackendUnavailable(f"{engine_dir}: built for {provider}, which this onnxruntime "
                                     f"({ort.__version__}) does not have; available: {ort.get_available_providers()}")
        model_path = engine_dir / onnx_graph.MODEL_FILE
        if onnx_graph.MODEL_FILE not in manifest.files:
            from dsv3_export.manifest import EngineDirError

            raise EngineDirError(f"{engine_dir}: manifest.json lists no {onnx_graph.MODEL_FILE}")
        onnx_graph.check_external_data(model_path, engine_dir, set(manifest.files))
        options = ort_session.session_options(manifest.device, model_path)  # CUDA: fp8 dequant folded to bf16
        device = torch.device("cpu")
        provider_options: dict[str, str] = {}
        stream, max_elements = None, None
        if manifest.device == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
            stream = torch.cuda.Stream(device)  # a non-zero handle (module docstring: why not torch's current)
            max_elements = CUDA_MAX_ELEMENTS
            provider_options = {"device_id": str(device.index), "user_compute_stream": str(stream.cuda_stream),
                                "arena_extend_strategy": "kSameAsRequested"}  # no power-of-two slack on 31 GB
        try:
            session = ort.InferenceSession(str(model_path), options, providers=[(provider, provider_options)])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own types (InvalidProtobuf, Fail, ...) name no file
            from dsv3_export.manifest import EngineDirError

            raise EngineDirError(f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from e
        cache_dtype = torch_dtype(manifest.kv_cache["dtype"])
        return OrtStep(session, device, cache_dtype, ModelArgs.from_dict(manifest.model), stream=stream,
                       max_elements=max_elements)


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _count_fp8(model) -> int:
    return sum(1 for v in model.graph.initializers.values() if v.dtype is not None and v.dtype.name == "FLOAT8E4M3FN")


class OrtStep:
    """LatentCacheStep's contract over an InferenceSession, with torch tensors bound by pointer.

    stream: the CUDA stream the session was created with (its user_compute_stream), None on the CPU.
    max_elements: no run makes a tensor of this many elements or more; a larger batch is run over
    row chunks written into slices of the outputs (None: no limit, the CPU provider's case).
    """

    def __init__(self, session, device: torch.device, cache_dtype: torch.dtype, args: ModelArgs,
                 stream: "torch.cuda.Stream | None" = None, max_elements: int | None = None):
        self.session = session
        self.device = device
        self.cache_dtype = cache_dtype
        self.args = args
        self.vocab = args.vocab_size
        self.stream = stream
        self.max_elements = max_elements
        self._ort_device = ("cuda" if device.type == "cuda" else "cpu", device.index or 0)

    def with_session(self, session) -> "OrtStep":
        """The same step over another session of the same model (e.g. one with profiling on)."""
        return OrtStep(session, self.device, self.cache_dtype, self.args, self.stream, self.max_elements)

    def _bind(self, binding, name: str, t: torch.Tensor, output: bool = False) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(name, *self._ort_device, _ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def _run(self, tensors: dict[str, torch.Tensor]) -> None:
        binding = self.session.io_binding()
        for name, t in tensors.items():
            self._bind(binding, name, t, output=name in OUTPUT_NAMES)
        self.session.run_with_iobinding(binding)

    def __call__(self, tokens: torch.Tensor, start_pos: torch.Tensor,
                 kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = tokens.shape
        _, n_layers, cache_len, width = kv_cache.shape
        inputs = {"tokens": tokens.to(self.device, torch.int64).contiguous(),
                  "start_pos": start_pos.to(self.device, torch.int64).contiguous(),
                  "kv_cache": kv_cache.contiguous()}
        if inputs["kv_cache"].dtype != self.cache_dtype or inputs["kv_cache"].device != self.device:
            raise ValueError(f"kv_cache must be {self.cache_dtype} on {self.device}, got "
                             f"{kv_cache.dtype} on {kv_cache.device}")
        rows = b if self.max_elements is None else rows_per_run(self.args, s, cache_len, self.max_elements)
        logits = torch.empty(b, s, self.vocab, dtype=torch.float32, device=self.device)  # [b, s, V]
        new_kv = torch.empty(b, n_layers, s, width, dtype=self.cache_dtype, device=self.device)  # [b, L, s, w]
        tensors = {**inputs, "logits": logits, "new_kv": new_kv}
        caller = None
        if self.stream is not None:  # after the allocations: ORT must not write before the caller's reads
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)
            for t in tensors.values():
                t.record_stream(self.stream)
        for r0 in range(0, b, rows):  # batch rows are independent; dim 0 slices stay contiguous
            self._run({name: t[r0:r0 + rows] for name, t in tensors.items()})
        if caller is not None:
            caller.wait_stream(self.stream)
        return logits, new_kv


BACKEND = OnnxRuntimeBackend()
