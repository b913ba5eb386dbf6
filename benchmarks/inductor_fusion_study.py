"""Which Inductor kernels a CUDA decode package of the 16b preset holds, found without a GPU.

    python benchmarks/inductor_fusion_study.py --layers 10 --out /tmp/fusion10    # ~100 s on 2 cores

Why: the batch-1 decode step is bound by its ~450 kernel launches, and the Inductor-generated ones (norms, RoPE,
the kv row, copies) are only visible in an H200 profile. This runs the engine's own flow (meta export -> passes ->
engines/torch_router.py fuse_router -> engines/torch_kv_row.py -> lower_dsv3_ops with the CUDA triton_ops ->
engines/torch_q_rope.py -> aoti_compile_and_package under the engine's Inductor configs and choices) with
Inductor's Triton code generation for CPU tensors (`cpu_backend="triton"`), records every kernel Inductor defines and the scheduler's post-fusion
order, and stops when Triton would compile (no CPU driver). Session 20's 27-layer run reproduced the H200 profile's
kernel names and counts; its findings are in benchmarks/RESULTS.md.

What it changes in torch 2.13's Inductor to get CUDA's grouping (each a guess that held for that run):
  - ir.is_cpu / SchedulerNode.is_cpu answer False, and lowering.cat's `cpu_device` test is patched out: on the CPU
    Inductor never fuses a cat into one pointwise kernel and uses CPU realize and loop-reorder rules;
  - a stub Triton driver targeting sm_90: torch's user-kernel mutation analysis builds TTIR for it, as on the H200
    (without it every input of our kernels is assumed mutated and cloned);
  - Triton's backend hash is stubbed (no CPU backend).
Combo kernels (DSV3_TORCH_COMBO_KERNELS=1) cannot be studied this way: Inductor skips CPU devices when it forms them.
Outputs in --out: lowered.txt (the lowered program), order.json (post-fusion scheduler nodes), kernels.json (name,
nodes, origins, source of each kernel) and kernels.txt (one line per kernel launch, with its origin ops).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import textwrap
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # traced kernels must be real JITFunctions for wrap_triton

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class StubDriver:
    """Enough of a Triton driver for torch's mutation analysis to build sm_90 TTIR."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(f"stub driver: {name}")


def lowered_decode_program(layers: int):
    """The 16b fp8 decode program, lowered for CUDA as engines/torch.py lower_program does, on CPU tensors."""
    import torch.utils._pytree as pytree
    from torch.export.passes import move_to_device_pass

    from dsv3_export.engines.torch_decode_gemv import program_decode_gemv
    from dsv3_export.engines.torch_kv_row import kv_row_as_where
    from dsv3_export.engines.torch_lower import lower_dsv3_ops
    from dsv3_export.engines.torch_q_rope import q_rope_into_attention
    from dsv3_export.engines.torch_router import fuse_router
    from dsv3_export.engines.torch_triton import triton_lowerings
    from dsv3_export.export import export_step
    from dsv3_export.passes.base import PassConfig
    from dsv3_export.passes.pipeline import PASS_NAMES, run_pipeline
    from dsv3_export.reference import ModelArgs, Transformer

    with torch.device("meta"):
        model = Transformer(ModelArgs.preset("16b").replace(n_layers=layers, dtype="fp8"), dtype=torch.bfloat16)
    ep, _ = run_pipeline(export_step(model, "decode"), PassConfig(precision="fp8"), passes=list(PASS_NAMES))
    gemv = program_decode_gemv(ep, "decode")
    for table in (ep._state_dict, ep._constants):  # values do not matter for scheduling: empty CPU tensors
        for k, v in list(table.items()):
            if isinstance(v, torch.Tensor) and v.device.type == "meta":
                e = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cpu")
                table[k] = torch.nn.Parameter(e, requires_grad=False) if isinstance(v, torch.nn.Parameter) else e
    if ep.example_inputs is not None:
        ep._example_inputs = pytree.tree_map_only(
            torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.device.type == "meta" else t,
            ep.example_inputs)
    ep = move_to_device_pass(ep, "cpu")
    ep, _ = fuse_router(ep, "decode")
    ep, _ = kv_row_as_where(ep, "decode")
    lowered, _ = lower_dsv3_ops(ep, "cuda", triton_lowerings("decode", gemv))
    return q_rope_into_attention(lowered, "decode")[0]


def use_cuda_heuristics() -> None:
    """Inductor's CUDA rules for CPU tensors (see the module docstring)."""
    import torch._inductor.ir as ir_mod
    import torch._inductor.lowering as lowering
    import torch._inductor.scheduler as scheduler

    ir_mod.is_cpu = lambda x: False
    scheduler.BaseSchedulerNode.is_cpu = lambda self: False
    src = textwrap.dedent(inspect.getsource(lowering.cat))
    src = "\n".join(line for line in src.splitlines() if not line.startswith("@"))
    marker = 'cpu_device = inputs[0].get_device().type == "cpu"'
    if marker not in src:
        raise RuntimeError(f"torch {torch.__version__}: lowering.cat has no `{marker}` to patch")
    namespace: dict = {}
    exec(compile(src.replace(marker, "cpu_device = False"), lowering.__file__, "exec"), lowering.__dict__, namespace)
    lowering.cat.__wrapped__.__code__ = namespace["cat"].__code__


def record_kernels(kernels: list, order: list) -> None:
    """Append each kernel Inductor defines, and the post-fusion node order, to the lists as it generates code."""
    from torch._inductor.codegen.triton import TritonScheduling
    from torch._inductor.scheduler import Scheduler
    from torch._inductor.utils import aggregate_origins

    define, codegen = TritonScheduling.define_kernel, Scheduler.codegen

    def recorded_define(self, src_code, node_schedule, kernel):
        name = define(self, src_code, node_schedule, kernel)
        origins = sorted(o.name for o in aggregate_origins(node_schedule) if o.op == "call_function")
        kernels.append({"name": name, "nodes": [n.get_name() for n in node_schedule if hasattr(n, "get_name")],
                        "origins": origins, "src": src_code})
        return name

    def recorded_codegen(self):
        for n in self.nodes:
            order.append({"type": type(n).__name__, "name": n.get_name(), "extern": n.is_extern(),
                          "kernel": getattr(getattr(n, "node", None), "python_kernel_name", None)})
        return codegen(self)

    TritonScheduling.define_kernel = recorded_define
    Scheduler.codegen = recorded_codegen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="16b layers (27: the full model, ~5 min)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/inductor_fusion"))
    parser.add_argument("--cpu-heuristics", action="store_true", help="keep Inductor's CPU rules")
    parser.add_argument("--no-stub-driver", action="store_true", help="no sm_90 mutation analysis")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not args.no_stub_driver:
        triton.runtime.driver.set_active(StubDriver())
    lowered = lowered_decode_program(args.layers)
    (args.out / "lowered.txt").write_text(str(lowered.graph))
    from dsv3_export.engines.torch import _choices_handler, inductor_configs, persistent_norms_switch

    if not args.cpu_heuristics:
        use_cuda_heuristics()
    import torch.utils._triton

    torch.utils._triton.triton_hash_with_backend = lambda: "no-cpu-driver"
    kernels, order = [], []
    record_kernels(kernels, order)
    info = {"device_kind": "cuda"}
    configs = {k: v for k, v in inductor_configs("decode", info).items() if k != "aot_inductor.package_constants_in_so"}
    configs["cpu_backend"] = "triton"
    try:
        with _choices_handler(persistent_norms_switch(info)):
            torch._inductor.aoti_compile_and_package(lowered, package_path=str(args.out / "decode.pt2"),
                                                     inductor_configs=configs)
    except Exception as e:  # noqa: BLE001 - expected: Triton has no CPU backend to compile the kernels with
        print(f"compile stopped (expected, no CPU Triton backend): {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    (args.out / "kernels.json").write_text(json.dumps(kernels, indent=1))
    (args.out / "order.json").write_text(json.dumps(order, indent=1))
    (args.out / "kernels.txt").write_text("".join(f"{k['name']}  <- {' '.join(k['origins'])[:300]}\n" for k in kernels))
    print(f"{len(kernels)} Inductor kernel launches, {len(order)} scheduler nodes, {time.time() - t0:.0f} s; "
          f"{args.out}/kernels.txt")
    return 0 if kernels else 1


if __name__ == "__main__":
    sys.exit(main())
