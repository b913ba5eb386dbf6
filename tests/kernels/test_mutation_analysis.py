"""torch's kernel mutation analysis finds exactly the tensors our kernels write, prefetch asm and all.

Why: with inline asm in a kernel's TTIR the analysis assumes every input is written; session 22's two H200 builds with
merge_uv's L2 prefetch then died in AOTInductor's post-grad pass (kernels/mutation_analysis.py). The analysis reads
TTIR, which Triton's frontend makes without a GPU: here it is run for an sm_90 target in a subprocess that compiles
(no TRITON_INTERPRET), on each kernel whose asm is on in the traced decode program.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = r'''
import json, os
from unittest import mock
import torch, triton
from triton.backends.compiler import GPUTarget
from torch._higher_order_ops import triton_kernel_wrap as tkw
from dsv3_export.kernels import mla_decode_kernels as mdk, mla_merge_uv as mu
from dsv3_export.kernels.mla_variants import VARIANT_FLAGS


class Sm90:  # the driver's one method the TTIR generator calls
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def written(kernel, kwargs):
    """The tensors torch's analysis says kernel writes (torch 2.11 and 2.13 spell it differently)."""
    if hasattr(tkw, "identify_accessed_tensors"):
        return sorted(d.name for d in tkw.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes)
    return sorted(tkw.identify_mutated_tensors(kernel, kwargs, {}))


def launch_args(kernel, dtypes, constexprs, floats=()):
    """Every argument: pointers as small tensors of their dtype, ints 16, floats 0.5, the constexprs given."""
    args = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            args[name] = constexprs[name]
        elif name.endswith("_ptr"):
            args[name] = torch.empty(8, dtype=dtypes.get(name, torch.bfloat16))
        else:
            args[name] = 0.5 if name in floats else 16
    return args


f32, i64 = torch.float32, torch.int64
merge_uv = launch_args(mu._mla_merge_uv_kernel, dict(o_part_ptr=f32, lse_ptr=f32, seqlens_ptr=i64),
                       dict(C=512, BLOCK_C=512, BLOCK_S=32, SPLIT_TARGET=264, MIN_SPLITS=8, MIN_KEYS=64, BLOCK_N=32,
                            PREFETCH_W=True))
split = launch_args(mdk._mla_decode_split_kernel,
                    dict(o_part_ptr=f32, lse_ptr=f32, seqlens_ptr=i64, pos_ptr=i64, cos_ptr=f32, sin_ptr=f32),
                    dict(C=512, R=64, BLOCK_C=512, BLOCK_R=64, HAS_NEW=True, UPCAST=False, SPLIT_TARGET=264,
                         MIN_SPLITS=8, MIN_KEYS=64, BLOCK_H=16, BLOCK_N=32, PREFETCH=3, ROPE_Q=True, PREFETCH_BULK=0,
                         **VARIANT_FLAGS["pointer"]),
                    floats=("scale_log2",))
split_bulk = dict(split, PREFETCH=0, PREFETCH_BULK=2)  # cp.async.bulk.prefetch (kernels/l2_prefetch.py)
cases = {"merge_uv PREFETCH_W": (mu._mla_merge_uv_kernel, merge_uv),
         "split PREFETCH=3": (mdk._mla_decode_split_kernel, split),
         "split PREFETCH_BULK=2": (mdk._mla_decode_split_kernel, split_bulk)}
out = {}
with mock.patch.object(triton.runtime.driver, "_active", Sm90()):
    for name, (kernel, kwargs) in cases.items():
        wrapped = tkw.generate_ttir
        out[name] = {"hidden": written(kernel, kwargs)}
        tkw.generate_ttir = wrapped.__wrapped__  # torch's own generator: the asm in the TTIR
        try:
            out[name]["seen"] = written(kernel, kwargs)
        finally:
            tkw.generate_ttir = wrapped
# Triton memoizes each JIT function's key with the globals it read, checked at every eager launch: none may have kept
# a switch at the value the analysis gave it
from dsv3_export.kernels import l2_prefetch, pdl
stale = []
for fn in (mu._mla_merge_uv_kernel, mdk._mla_decode_split_kernel, l2_prefetch.prefetch_l2, l2_prefetch.prefetch_l2_bulk,
           pdl.wait_for_producer):
    fn.cache_key
    stale += [f"{fn.__name__}.{name}" for (name, _), (value, scope) in fn.used_global_vals.items()
              if scope.get(name) != value]
out["stale globals"] = stale
print(json.dumps(out))
'''


def test_the_analysis_finds_only_the_outputs_of_kernels_with_prefetch_asm():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV3_TRITON_GDC")}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["merge_uv PREFETCH_W"]["hidden"] == ["out_ptr"], got
    assert got["split PREFETCH=3"]["hidden"] == ["lse_ptr", "o_part_ptr"], got
    assert got["split PREFETCH_BULK=2"]["hidden"] == ["lse_ptr", "o_part_ptr"], got
    assert got.pop("stale globals") == [], got  # the keys were computed before the switches went off
    for name, result in got.items():  # the cases do carry the asm: torch's own generator gives up on it
        assert len(result["seen"]) > len(result["hidden"]), (name, result)


def test_every_inline_asm_sits_behind_a_switch_the_analysis_turns_off():
    kernels = Path(__file__).resolve().parents[2] / "kernels"
    raw = {p.name for p in kernels.glob("*.py") if re.search(r"inline_asm_elementwise|gdc_wait", p.read_text())}
    # l2_prefetch.PREFETCH_ASM and pdl.GDC are registered with kernels/mutation_analysis.py
    assert raw == {"l2_prefetch.py", "pdl.py"}, raw
