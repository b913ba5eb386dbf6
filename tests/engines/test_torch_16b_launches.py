"""The 16b fp8 decode program's kernels per layer, as the torch backend lowers it for CUDA.

Traced on the CPU (meta weights, 2 layers: the dense layer 0 and one MoE layer), lowered as
engines/torch.py lower_program does on CUDA and decomposed as AOTInductor decomposes the
triton_ops, so every launch of our kernels is a node. Structural, not a timing: it pins the
batch-1 decode launch structure the GPU profile was read from (session 5: ~35 kernels per MoE
layer, 6 of them act_quant), and how each switch changes it. Inductor's own kernels (the glue
between these) only exist after an AOTInductor compile for a GPU and are not counted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r'''
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)  # traced kernels must be real JITFunctions for wrap_triton
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from triton.runtime.jit import JITFunction
from dsv3_export.engines.torch_attn_norm import attn_norm_into_gemv
from dsv3_export.engines.torch_kv_row import kv_row_as_where
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_q_rope import q_rope_into_attention
from dsv3_export.engines.torch_router import fuse_router
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.export import export_step
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.graph_utils import count_calls
from dsv3_export.passes.pipeline import PASS_NAMES, run_pipeline
from dsv3_export.reference import ModelArgs, Transformer

settings = json.loads(sys.argv[1])  # [[skip_passes, {env}], ...]: one export per skip set, one lowering per setting
base_env = dict(os.environ)
programs, results = {}, []
for skip_passes, env in settings:
    if skip_passes not in programs:
        skip = set(filter(None, skip_passes.split(",")))
        with torch.device("meta"):
            model = Transformer(ModelArgs.preset("16b").replace(n_layers=2, dtype="fp8"), dtype=torch.bfloat16)
        programs[skip_passes], _ = run_pipeline(export_step(model, "decode"), PassConfig(precision="fp8"),
                                                passes=[n for n in PASS_NAMES if n not in skip])
    os.environ.clear()
    os.environ.update({**base_env, **env})  # the switches are read when a program is rewritten and lowered
    program, _ = fuse_router(programs[skip_passes])  # engines/torch.py lower_program's order
    program, _ = attn_norm_into_gemv(program, "decode", True)  # (the program has the GEMV: traced at batch 64)
    norms = count_calls(program.graph, [torch.ops.aten.rms_norm.default])
    program, _ = kv_row_as_where(program, "decode")
    lowered, how = lower_dsv3_ops(program, "cuda", triton_lowerings("decode"))
    kv_rows = [str(n.args[2].target) for n in lowered.graph.nodes  # before the query's RoPE moves the arguments
               if n.op == "call_function" and "mla_attention" in str(n.target)]
    lowered, _ = q_rope_into_attention(lowered, "decode")
    rope_q = sum("mla_attention_rope_q" in str(n.target) for n in lowered.graph.nodes)
    kernels = lowered.run_decompositions({}, decompose_custom_triton_ops=True)
    names, incomplete, tuned_among, prefetch_w = [], {}, {}, []
    for n in kernels.graph.nodes:
        if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
            k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            fn = k
            while not isinstance(fn, JITFunction):  # an Autotuner (or heuristics) around it
                fn = fn.fn
            names.append(fn.__name__)
            tuned_among[fn.__name__] = len(getattr(k, "configs", None) or [None])  # 1: a bare kernel
            constants = kernel_side_table.get_constant_args(n.kwargs["constant_args_idx"])
            if fn.__name__ in ("_mla_merge_uv_kernel", "_fp8_gemv_kernel"):
                prefetch_w.append((fn.__name__, {**n.kwargs["kwargs"], **constants}.get("PREFETCH_W")))
            passed = set(n.kwargs["kwargs"]) | set(constants)
            passed |= set(k.configs[0].kwargs) if getattr(k, "configs", None) else set()
            missing = sorted(set(fn.arg_names) - passed)
            if missing:
                incomplete[fn.__name__] = missing
    extern = [str(n.target) for n in kernels.graph.nodes if n.op == "call_function"
              and getattr(n.target, "_opname", None) in ("topk", "sort", "mm", "bmm", "addmm", "linear")]
    results.append({"kernels": {k: names.count(k) for k in set(names)}, "extern": extern, "incomplete": incomplete,
                    "tuned_among": tuned_among, "kv_rows": kv_rows, "rope_q": rope_q, "prefetch_w": prefetch_w,
                    "norms": norms})
print(json.dumps(results))
'''


# Every switch setting the checks read: (passes left out, build switches). One subprocess traces them all
# (one 16b export per pass set, then a rewrite + lowering per setting): ~7 separate processes took
# ~330 s of the suite on 2 cores, each paying the export and the passes' pattern tracing again.
SETTINGS = {
    "defaults": ("", {}),
    "all off": ("fuse_shared_experts", dict(DSV3_TORCH_ROUTER="0", DSV3_TORCH_ABSORB_GEMM="0",
                                            DSV3_TORCH_DECODE_GEMV="0", DSV3_TORCH_DECODE_GEMM="tile")),
    # the GEMV off takes W_UV's head_gemv and (DSV3_TORCH_SPLIT_K_SUM=auto) the split-K sum kernel with it
    "decode gemv off": ("", dict(DSV3_TORCH_DECODE_GEMV="0")),
    "head gemv off": ("", dict(DSV3_TORCH_HEAD_GEMV="0")),
    "gate split off": ("", dict(DSV3_TORCH_GATE_SPLIT="0")),
    "merge uv off": ("", dict(DSV3_TORCH_MERGE_UV="0")),
    "mla all configs": ("", dict(DSV3_TORCH_MLA_CONFIGS="all")),
    "kv row cat": ("", dict(DSV3_TORCH_KV_ROW="cat")),
    "q rope inductor": ("", dict(DSV3_TORCH_Q_ROPE="inductor")),
    "q rope kernel": ("", dict(DSV3_TORCH_Q_ROPE="kernel")),
    "merge uv prefetch": ("", dict(DSV3_TORCH_MERGE_UV_PREFETCH="1")),
    "moe direct configs": ("", dict(DSV3_TORCH_MOE_DIRECT_CONFIGS="up=32:4:5,down=64:4:4")),
    "attn norm": ("", dict(DSV3_TORCH_ATTN_NORM="gemv")),
    "gemv prefetch": ("", dict(DSV3_TORCH_GEMV_PREFETCH="1")),
}


def _trace(settings: list[tuple[str, dict]]) -> list[dict]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV3_TORCH_")}  # only the settings' switches
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(settings)], check=False, capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    # Every traced launch names every kernel argument, defaulted constexprs too: torch's triton_op
    # tracing (identify_mutated_tensors, which only runs where a GPU driver is) otherwise assumes each
    # input is mutated and AOTInductor copies them around the kernel -- the KV cache at every layer
    # (session 8: the split kernel's new TMA / EARLY flags, caught on the H200 by the warning alone).
    for result in results:
        assert not result["incomplete"], result["incomplete"]
    return results


def _check_defaults(launches: dict[str, dict]):
    """Layer 0 (dense MLP) + layer 1 (MoE) with the defaults. The norms are Inductor's (the fused RMSNorm
    + act_quant kernel, the top-k kernel, the gate GEMM in the router and the router + moe_align kernel
    were removed in session 14, measured slower on the H200)."""
    default = launches["defaults"]
    k = default["kernels"]
    # fp8 GEMMs: wq+wkv_a and wo per layer and the dense layer's w2 by the tile kernel (K split); the dense layer's
    # w1 and w3 (10944 rows: not concatenated; K not split) by kernels/fp8_gemm_decode.py, its swapped and its
    # direct tile each (gated by the batch, DSV3_TORCH_DECODE_GEMM); the MoE's shared experts are experts of its
    # grouped GEMMs now (fuse_shared_experts)
    assert k["_fp8_gemm_kernel"] == 2 * 2 + 1 and k["_fp8_gemm_decode_kernel"] == 2 * 2, k
    # act_quant: one per fp8 GEMM (dense layer 5, MoE layer 2) + the MoE's h (its x's: the gate kernel's)
    assert k.get("_act_quant_kernel", 0) + k.get("_act_quant_ieee_kernel", 0) == 5 + 3, k
    assert k["_grouped_gemm_kernel"] == 2 and k["_moe_align_kernel"] == 1, k
    # the router: softmax, top-k, weights and the shared experts' columns in one kernel; the gate GEMM as
    # K-split partials (kernels/router_gate.py) that it sums: the one ATen linear is the LM head
    assert k["_router_kernel"] == 1 and k["_gate_partials_kernel"] == 1, k
    assert sum(".linear." in e for e in default["extern"]) == 1, default["extern"]
    assert not any(".topk." in e or ".sort." in e for e in default["extern"]), default["extern"]
    # MLA's absorbed W_UK and W_UV per layer: kernels/mla_absorb.py head_gemm, no einsum's bmm; W_UK's launch is
    # kernels/mla_query.py's, which also rotates the query's q_pe (DSV3_TORCH_Q_ROPE=absorb, _check_q_rope)
    assert k["_head_gemm_kernel"] == k["_head_gemm_rope_kernel"] == 2, k
    assert not any(".bmm." in e for e in default["extern"]), default["extern"]
    assert k["_mla_decode_split_kernel"] == k["_mla_decode_reduce_kernel"] == 2, k
    # + per layer the GEMV of wq+wkv_a and wo and W_UV's head_gemv (_check_decode_gemv), and
    # the split-K sums of wq+wkv_a, wo and w2 (_check_decode_gemv)
    # the gate kernel in, the MoE x's act_quant out; w1 and w3 two launches each
    assert sum(k.values()) == 28 + 2 * 2 + 2 + 5 + 2, k


def _check_all_switches_off(launches: dict[str, dict]):
    """The router kernel, head_gemm, the decode GEMV and the split-K sum kernel off, fuse_shared_experts left out
    (then the MoE layer also runs torch's top-k, 2 launches, and the Inductor kernels of the softmax, gather
    and the shared experts' SwiGLU, add and split-K sums, not counted here)."""
    old = launches["all off"]
    k_old = old["kernels"]
    assert not {"_router_kernel", "_head_gemm_kernel"} & set(k_old), k_old
    assert k_old["_fp8_gemm_kernel"] == 2 * 2 + 3 + 2, k_old  # + the shared experts' w1+w3 and w2
    # one per fp8 GEMM (dense layer 5, MoE layer 4) + the MoE's x and h: session 5's 6 per MoE layer
    assert k_old.get("_act_quant_kernel", 0) + k_old.get("_act_quant_ieee_kernel", 0) == 5 + 6, k_old
    assert sum(".topk." in e for e in old["extern"]) == 1, old["extern"]
    assert sum(".linear." in e for e in old["extern"]) == 2, old["extern"]  # the LM head and the gate
    assert sum(k_old.values()) == 27, k_old


def _check_decode_gemv(launches: dict[str, dict]):
    """DSV3_TORCH_DECODE_GEMV (default auto: on, the program traced at batch 64; session 13, default since
    session 16): wq+wkv_a and wo of each layer also launch kernels/fp8_gemv.py, beside act_quant + the tile
    GEMM (each side's grid empty at the batches of the other); the dense MLP's Linears (45 MB, K=10944) do
    not. With it, DSV3_TORCH_HEAD_GEMV (default 1, session 18): each layer's W_UV also launches head_gemv.
    DSV3_TORCH_SPLIT_K_SUM (default auto, session 18): with the GEMV, each decode fp8 GEMM that splits K
    (wq+wkv_a and wo per layer, the dense MLP's w2: N tiles that leave SMs idle) also launches the sum kernel,
    gated like the tile GEMM; without it Inductor's reduction sums (no user-kernel launch). The GEMV off
    takes all three off, DSV3_TORCH_HEAD_GEMV=0 head_gemv alone: nothing else changes. DSV3_TORCH_MERGE_UV (default
    1, session 19): W_UV's head_gemv is kernels/mla_merge_uv.py's kernel, which also merges the split partials (the
    reduce kernel stays in the program, gated to batches above 2); =0 restores head_gemv."""
    default, k_off = dict(launches["defaults"]["kernels"]), launches["decode gemv off"]["kernels"]
    k_head_off = launches["head gemv off"]["kernels"]
    k_merge_off = dict(launches["merge uv off"]["kernels"])
    assert k_merge_off.pop("_head_gemv_kernel") == 2, k_merge_off
    assert default.pop("_mla_merge_uv_kernel") == 2, default
    assert k_merge_off == default, (k_merge_off, default)
    assert k_head_off == default, (k_head_off, default)
    assert default.pop("_fp8_gemv_kernel") == 2 * 2, default
    assert default.pop("_split_k_sum_kernel") == 2 * 2 + 1, default
    assert k_off == default, (k_off, default)


def _check_gate_split(launches: dict[str, dict]):
    """DSV3_TORCH_GATE_SPLIT (default 1, session 19): the MoE layer's gate GEMM (cuBLAS, an ATen linear) is
    kernels/router_gate.py's partials kernel inside the router op, which also writes the fp8 MoE's act_quant
    of x: one act_quant launch fewer. =0 restores the linear and the act_quant; nothing else changes."""
    off, default = launches["gate split off"], launches["defaults"]
    k, want = dict(default["kernels"]), dict(off["kernels"])
    assert k.pop("_gate_partials_kernel") == 1, k
    quant = "_act_quant_kernel" if "_act_quant_kernel" in want else "_act_quant_ieee_kernel"  # meta: not CUDA
    want[quant] -= 1
    assert k == want, (k, want)
    assert sum(".linear." in e for e in off["extern"]) == 2, off["extern"]  # the gate's and the LM head's


def _check_mla_configs(launches: dict[str, dict]):
    """DSV3_TORCH_MLA_CONFIGS=best (the default since session 20): the MLA split kernel's autotuner chooses among
    kernels/mla_decode.py BEST_DECODE_CONFIGS (2); `all`: among every config of DECODE_CONFIGS; the launches are
    the same."""
    from dsv3_export.kernels import mla_decode as kd

    every, default = launches["mla all configs"], launches["defaults"]
    assert every["kernels"] == default["kernels"], (every["kernels"], default["kernels"])
    assert every["tuned_among"]["_mla_decode_split_kernel"] == len(kd.DECODE_CONFIGS) > 2, every["tuned_among"]
    assert default["tuned_among"]["_mla_decode_split_kernel"] == len(kd.BEST_DECODE_CONFIGS) == 2, \
        default["tuned_among"]
    assert default["tuned_among"]["_gate_partials_kernel"] == 1, default["tuned_among"]  # pinned (one config)
    # the router pinned, act_quant tuned without BLOCK_M 32 (kernels/topk.py, kernels/fp8_quant.py: the picks at the
    # decode program's tuning batch, 64, that cost batch 1 the most)
    tuned = default["tuned_among"]
    assert tuned["_router_kernel"] == 1, tuned
    assert tuned.get("_act_quant_kernel", tuned.get("_act_quant_ieee_kernel")) == 2, tuned


def _check_kv_row(launches: dict[str, dict]):
    """DSV3_TORCH_KV_ROW=where (session 20, the default since session 21): each layer's kv_new reaches mla_attention
    as a where instead of a cat (engines/torch_kv_row.py); `cat` restores the cat; our kernels' launches are the
    same."""
    cat, default = launches["kv row cat"], launches["defaults"]
    assert cat["kernels"] == default["kernels"], (cat["kernels"], default["kernels"])
    assert default["kv_rows"] == ["aten.where.self"] * 2, default["kv_rows"]
    assert cat["kv_rows"] == ["aten.cat.default"] * 2, cat["kv_rows"]


def _check_q_rope(launches: dict[str, dict]):
    """DSV3_TORCH_Q_ROPE=absorb (session 21's opt-in, the default since session 22): each layer's query RoPE matched
    and moved into W_UK's head_gemm launch, which becomes kernels/mla_query.py's (every kernel argument named: _trace).
    `kernel` (session 21's default) moves it into the split kernel instead and keeps head_gemm; `inductor` leaves it
    to Inductor, with the same launches as `kernel`."""
    inductor, kernel, default = launches["q rope inductor"], launches["q rope kernel"], launches["defaults"]
    assert inductor["kernels"] == kernel["kernels"], (inductor["kernels"], kernel["kernels"])
    assert (default["rope_q"], kernel["rope_q"], inductor["rope_q"]) == (2, 2, 0), \
        (default["rope_q"], kernel["rope_q"], inductor["rope_q"])
    k = dict(kernel["kernels"])
    k["_head_gemm_kernel"] -= 2
    k["_head_gemm_rope_kernel"] = 2
    assert default["kernels"] == k, (default["kernels"], k)
    # every other setting rewrites both layers too: with merge_uv off the traced call drops that defaulted argument,
    # which the match once missed (unseen while the rewrite launched nothing of its own)
    rewritten = {name: r["rope_q"] for name, r in launches.items() if name != "q rope inductor"}
    assert set(rewritten.values()) == {2}, rewritten


def _check_moe_direct_configs(launches: dict[str, dict]):
    """DSV3_TORCH_MOE_DIRECT_CONFIGS (opt-in, session 21): each of the MoE layer's two grouped GEMMs is two launches,
    the tuned one gated to two tokens and more, the pinned one to one token; every argument named (_trace)."""
    pinned, k = launches["moe direct configs"]["kernels"], dict(launches["defaults"]["kernels"])
    k["_grouped_gemm_kernel"] *= 2
    assert pinned == k, (pinned, k)


def _check_merge_uv_prefetch(launches: dict[str, dict]):
    """DSV3_TORCH_MERGE_UV_PREFETCH=1: merge_uv's launches (one per layer) prefetch W_UV's rows (PREFETCH_W), the
    default's here do not (`auto` follows the wait, which the CPU compiles out); the launches are the same."""
    prefetch, default = launches["merge uv prefetch"], launches["defaults"]
    assert prefetch["kernels"] == default["kernels"], (prefetch["kernels"], default["kernels"])
    merge_uv = [[on for name, on in r["prefetch_w"] if name == "_mla_merge_uv_kernel"] for r in (default, prefetch)]
    assert merge_uv == [[False] * 2, [True] * 2], merge_uv


def _check_gemv_prefetch(launches: dict[str, dict]):
    """DSV3_TORCH_GEMV_PREFETCH=1: the decode GEMV's launches (wq + wkv_a and wo of both layers) prefetch their
    weight rows before their wait (PREFETCH_W), the default's here do not (`auto` follows the wait, which the CPU
    compiles out); the launches are the same, every argument named (_trace)."""
    prefetch, default = launches["gemv prefetch"], launches["defaults"]
    assert prefetch["kernels"] == default["kernels"], (prefetch["kernels"], default["kernels"])
    gemv = [[on for name, on in r["prefetch_w"] if name == "_fp8_gemv_kernel"] for r in (default, prefetch)]
    assert gemv == [[False] * 4, [True] * 4], gemv


def _check_attn_norm(launches: dict[str, dict]):
    """DSV3_TORCH_ATTN_NORM=gemv (opt-in, session 23): the MoE layer's attention norm computed by the wq + wkv_a
    GEMV's prologue, and above the GEMV's batches by kernels/rms_norm.py (engines/torch_attn_norm.py): its rms_norm
    leaves the program (layer 0's, of the embedding, stays); our launches gain the norm kernel (gated), the rest the
    same, every argument named (_trace)."""
    norm, default = launches["attn norm"], launches["defaults"]
    k = dict(norm["kernels"])
    assert k.pop("_add_rms_norm_kernel") == 1, k
    assert k == default["kernels"], (k, default["kernels"])
    assert default["norms"] - norm["norms"] == 1, (default["norms"], norm["norms"])


@pytest.mark.slow  # ~75-85 s on 2 cores: one 16b export on meta per pass set, the passes, a lowering per setting
def test_16b_decode_launches():
    """One test for every setting's checks: the settings share one trace (pytest-xdist would split separate
    tests over workers and trace in each; its loadgroup did not keep a group on one worker here)."""
    launches = dict(zip(SETTINGS, _trace(list(SETTINGS.values()))))
    _check_defaults(launches)
    _check_all_switches_off(launches)
    _check_decode_gemv(launches)
    _check_gate_split(launches)
    _check_mla_configs(launches)
    _check_kv_row(launches)
    _check_q_rope(launches)
    _check_merge_uv_prefetch(launches)
    _check_moe_direct_configs(launches)
    _check_attn_norm(launches)
    _check_gemv_prefetch(launches)
