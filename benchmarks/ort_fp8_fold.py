"""Does ONNX Runtime fold every fp8 weight dequantization of an engine when its session is created?

    python benchmarks/ort_fp8_fold.py ENGINE_DIR [--options loader|default] [--provider cpu|cuda]

Creates one session of ENGINE_DIR/model.onnx in a child process (its own peak RSS, ORT's log on
its stderr) at ORT's info log level and reports, from ORT's own output: how many FLOAT8E4M3FN
initializers its optimizations removed (each one folded into the dequantized weight), which are
left, the "Skipping constant folding ... exceeds the limit" warnings, the session's seconds and
the child's peak RSS (host memory of the folding). --options loader: the session options
load_engine uses (engines/ort_session.py); default: ORT's defaults (the CUDA loader before them).

On the CPU machine a CUDA fp8 engine's bf16 graph cannot run (no bf16 MatMul on ORT's CPU
provider): session creation fails after the level-1 optimizations, where the folding happens,
so the report is still the folding's. Measured there on `dsv3-export build --preset 16b
--device cuda --precision fp8` with n_layers=2 (config_overrides): the old Cast + Mul lowering
with ORT's defaults left layers.1.ffn.w13 unfolded with the H200's warnings; the DequantizeLinear
lowering with the loader's options folds all 14 fp8 weights at 4.8 GiB peak (n_layers=3: 8.2).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, resource, sys, time
from pathlib import Path
import onnxruntime as ort
from dsv3_export.engines.ort_session import session_config
model, options_kind, provider = sys.argv[1], sys.argv[2], sys.argv[3]
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
config = session_config("cuda", Path(model)) if options_kind == "loader" else {}
for key, value in config.items():
    options.add_session_config_entry(key, value)
options.log_severity_level = 1  # info: ORT logs each initializer it removes
start, error = time.perf_counter(), None
try:
    ort.InferenceSession(model, options, providers=[provider])
except Exception as e:  # noqa: BLE001 - reported, e.g. bf16 MatMul on the CPU provider
    error = str(e)[:300]
print(json.dumps({"config": config, "seconds": round(time.perf_counter() - start, 1), "error": error,
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def fold_report(engine_dir: Path, options: str = "loader", provider: str = "cpu") -> dict:
    import onnx

    model = engine_dir / "model.onnx"
    graph = onnx.load(str(model), load_external_data=False).graph
    fp8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(model), options, _PROVIDERS[provider]],
                           capture_output=True, text=True, check=False)
    if child.returncode != 0 or not child.stdout.strip():
        raise RuntimeError(f"session child failed ({child.returncode}): {child.stderr[-2000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    removed = set(re.findall(r"Removing initializer '([^']*)'", child.stderr))
    skipped = sorted(set(re.findall(r"Skipping constant folding for (\w+) node '([^']*)' because estimated "
                                    r"output size \((\d+) bytes\)", child.stderr)))
    return {"engine": str(engine_dir), "options": options, "provider": provider, **result,
            "fp8_initializers": len(fp8), "fp8_folded": len(fp8 & removed), "fp8_left": sorted(fp8 - removed),
            "skipped_folding": [{"op": op, "node": node, "bytes": int(size)} for op, node, size in skipped]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--options", choices=("loader", "default"), default="loader")
    parser.add_argument("--provider", choices=tuple(_PROVIDERS), default="cpu")
    args = parser.parse_args(argv)
    report = fold_report(args.engine_dir, args.options, args.provider)
    print(json.dumps(report, indent=1))
    return 0 if not report["fp8_left"] else 1


if __name__ == "__main__":
    sys.exit(main())
