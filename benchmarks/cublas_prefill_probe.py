"""Can the prefill program's fp8 Linears run blockwise torch._scaled_mm (cuBLAS) inside an AOTInductor package?

The packages run dsv3::fp8_linear as act_quant + the Triton fp8 GEMM (engines/torch_triton.py), which at prefill M
reaches 0.46-0.66x of blockwise torch._scaled_mm on the H200; the faster Gluon kernel cannot enter a package
(Inductor compiles user kernels as @triton.jit). On one GPU, in one run:
  1. layouts   engines/torch_scaled_mm.py fp8_linear_cublas at the 16b model's fp8 Linear shapes and M in MS
               (weights whose K is not a multiple of 512 zero-padded first, x per call): raised, or its mean rel.
               error against fp8_gemm_ref (< 5e-3: right)
  2. package   fp8_linear_cublas inside a triton_op (act_quant by our kernel, then _scaled_mm) exported with a
               symbolic M and compiled by AOTInductor: its C++ wrapper's calls and the package's output at
               several M against the reference
  3. timing    at M=4096 (and 1024), from CUDA graphs in alternation (benchmarks/_timing.py interleaved_ms):
               the package's current act_quant + Triton GEMM, fp8_linear_cublas, act_quant + the Gluon kernel;
               speedups against the Triton path
    python benchmarks/cublas_prefill_probe.py [--out DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _timing, kbench

from _timing import interleaved_ms  # noqa: E402
from kbench.common import mean_rel  # noqa: E402

# The 16b model's fp8 Linears in a prefill step: name -> (N, K)
SHAPES = {"wq": (3072, 2048), "wkv_a": (576, 2048), "wo": (2048, 2048), "w1/w3": (10944, 2048),
          "w2": (2048, 10944), "shared w1/w3": (2816, 2048), "shared w2": (2048, 2816)}
MS = (1, 5, 16, 100, 4095, 4096)
TOL = 5e-3  # mean rel. error against the fp32 reference: bf16 rounding is ~1.4e-3, a misread scale ~1


def _operands(m: int, n: int, k: int, seed: int):
    from dsv3_export.reference import fp8 as R

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w, w_s = R.weight_quant(torch.randn(n, k, device="cuda", generator=g) / k**0.5)
    return x, w, w_s


def _k_padded(w: torch.Tensor, w_s: torch.Tensor):
    """w [N, K], w_s -> K zero-padded to a multiple of 512 (unit scales on the new blocks), as a build step would."""
    from dsv3_export.engines.torch_scaled_mm import K_MULTIPLE
    from kbench.fp8 import _pad_k

    w_p = _pad_k(w, K_MULTIPLE)
    return w_p, torch.nn.functional.pad(w_s, (0, w_p.shape[1] // 128 - w_s.shape[1]), value=1.0)


def cublas_linear(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, w_padded=None) -> torch.Tensor:
    """engines/torch_scaled_mm.py fp8_linear_cublas; for a K it does not take, x zero-padded to the pre-padded
    weight's K first (a copy per call)."""
    from dsv3_export.engines.torch_scaled_mm import cublas_suits, fp8_linear_cublas

    if cublas_suits(*w.shape):
        return fp8_linear_cublas(x, w, w_s)
    w_p, w_s_p = w_padded
    return fp8_linear_cublas(torch.nn.functional.pad(x, (0, w_p.shape[1] - x.shape[1])), w_p, w_s_p)


def check_layouts() -> list[dict]:
    """fp8_linear_cublas against the reference at every shape and M (K-padded weights where K % 512 != 0)."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.reference import fp8 as R

    rows = []
    for name, (n, k) in SHAPES.items():
        for m in MS:
            x, w, w_s = _operands(m, n, k, seed=m + n + k)
            a, a_s = R.act_quant(x)
            ref = G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32)
            try:
                out = cublas_linear(x, w, w_s, _k_padded(w, w_s))
                torch.cuda.synchronize()
                err, status = mean_rel(out, ref), None
            except Exception as e:  # noqa: BLE001 - the probe records what cuBLAS / torch refuse
                err, status = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            ok = status is None and err < TOL and tuple(out.shape) == (m, n)
            rows.append(dict(shape=name, m=m, n=n, k=k, err=err, raised=status, ok=ok))
            what = status or f"mean rel. error {err:.2e}"
            print(f"  {name} M={m}: {what} {'ok' if ok else 'WRONG'}", flush=True)
    return rows


def check_package(workdir: str) -> list[dict]:
    """fp8_linear_cublas inside a triton_op (act_quant by our kernel through wrap_triton, then _scaled_mm), exported
    with a symbolic M and compiled by AOTInductor; run at several M against the reference."""
    from torch.export import Dim
    from torch.library import triton_op

    from dsv3_export.engines.torch_cxx import select_cxx
    from dsv3_export.engines.torch_scaled_mm import fp8_linear_cublas
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.reference import fp8 as R

    cxx = select_cxx().path  # as the build does (session 3: the machine's $CXX built packages that crash on load)

    @triton_op("dsv3_probe::fp8_linear_cublas", mutates_args={})
    def linear(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
        return fp8_linear_cublas(x, w, w_s)

    class Linear(torch.nn.Module):
        def __init__(self, w, w_s):
            super().__init__()
            self.register_buffer("w", w)
            self.register_buffer("w_s", w_s)

        def forward(self, x):
            return linear(x, self.w, self.w_s)

    rows = []
    for name in ("wkv_a", "w1/w3"):
        n, k = SHAPES[name]
        x, w, w_s = _operands(64, n, k, seed=7)
        ep = torch.export.export(Linear(w, w_s), (x,), dynamic_shapes={"x": {0: Dim("m", min=1, max=16384)}})
        path = os.path.join(workdir, f"{name.replace('/', '_')}.pt2")
        torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs={"cpp.cxx": (None, cxx)})
        with zipfile.ZipFile(path) as z:
            sources = [z.read(f).decode(errors="replace") for f in z.namelist() if f.endswith((".cpp", ".h"))]
        calls = sorted({line.strip()[:160] for src in sources for line in src.splitlines() if "scaled_mm" in line})
        runner = torch._inductor.aoti_load_package(path)
        for m in (1, 7, 300, 4096):
            xm = _operands(m, n, k, seed=m)[0]
            out = runner(xm)
            a, a_s = R.act_quant(xm)
            err = mean_rel(out, G.fp8_gemm_ref(a, a_s, w, w_s, torch.float32))
            ok = err < TOL and tuple(out.shape) == (m, n)
            rows.append(dict(shape=name, m=m, err=err, ok=ok, wrapper_calls=calls[:6]))
            print(f"package {name} M={m}: err {err:.2e} {'ok' if ok else 'WRONG'}", flush=True)
        print(f"  its C++ wrapper's _scaled_mm lines: {calls[:6]}", flush=True)
    return rows


def time_paths(rounds: int) -> list[dict]:
    """act_quant + each GEMM from CUDA graphs, in alternation; speedups against the packages' Triton path."""
    from dsv3_export.kernels import fp8_gemm as G
    from dsv3_export.kernels.fp8_quant import act_quant
    from kbench.common import _graph_of

    rows = []
    for m in (4096, 1024):
        for name, (n, k) in SHAPES.items():
            x, w, w_s = _operands(m, n, k, seed=3)
            padded = _k_padded(w, w_s)

            def triton_path():
                a, a_s = act_quant(x)
                return G.fp8_gemm(a, a_s, w, w_s, shape_class="prefill")

            def gluon_path():
                a, a_s = act_quant(x)
                return G.fp8_gemm(a, a_s, w, w_s, variant="gluon")

            fns = {"act_quant + triton fp8_gemm (packages now)": triton_path,
                   "fp8_linear_cublas" + ("" if k % 512 == 0 else " (x padded to K=512n per call)"):
                       lambda: cublas_linear(x, w, w_s, padded),
                   "act_quant + gluon": gluon_path}
            graphs = {}
            for label, fn in fns.items():
                try:
                    fn()  # autotune / compile outside the capture
                    graphs[label] = _graph_of(fn).replay
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} M={m} {label}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            times = interleaved_ms(graphs, "read", rounds=rounds)
            base = times.get("act_quant + triton fp8_gemm (packages now)")
            for label, ms in times.items():
                ratios = sorted(b / t for b, t in zip(base or ms, ms))
                tflops = 2 * m * n * k / (statistics.median(ms) * 1e-3) / 1e12
                rows.append(dict(m=m, shape=name, n=n, k=k, path=label, ms=statistics.median(ms), tflops=tflops,
                                 speedup_median=statistics.median(ratios), speedup_min=ratios[0],
                                 speedup_max=ratios[-1]))
                print(f"  M={m} {name:13s} {label:45s} {statistics.median(ms) * 1e3:8.1f} us {tflops:6.0f} TFLOP/s "
                      f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: layouts, package, timing")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for part, run in (("layouts", check_layouts), ("package", lambda: check_package(tempfile.mkdtemp())),
                      ("timing", lambda: time_paths(args.rounds))):
        if part in skip:
            continue
        print(f"-- {part}", flush=True)
        try:
            result[part] = run()
        except Exception:  # noqa: BLE001 - report, then go on to the next part
            traceback.print_exc()
            result[f"{part}_error"] = traceback.format_exc()[-3000:]
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "cublas_prefill_probe.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
