"""Programmatic edges in the decode CUDA graph: the switch, the manifest record it trusts, the edit's checks.
The edit itself needs a GPU and a CUDA 12.3+ driver (benchmarks/pdl_probe.py and benchmarks/torch_16b.py
check it there: bit-identical logits, replay times)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dsv3_export.engines.cuda_graph_pdl import PORTS, PdlPlan, add_programmatic_edges
from dsv3_export.engines.torch import PDL_ENV, decode_pdl

INFO = {"pdl_waiting_kernels": ["_fp8_gemm_kernel", "_act_quant_kernel"]}


@pytest.mark.parametrize("port", sorted(PORTS))
def test_switch_selects_the_port_over_the_manifests_kernels(monkeypatch, port):
    monkeypatch.setenv(PDL_ENV, port)
    assert decode_pdl(INFO) == PdlPlan(port, frozenset(INFO["pdl_waiting_kernels"]))


def test_by_default_the_programmatic_port_over_the_manifests_kernels(monkeypatch):
    monkeypatch.delenv(PDL_ENV, raising=False)
    assert decode_pdl(INFO) == PdlPlan("programmatic", frozenset(INFO["pdl_waiting_kernels"]))
    assert decode_pdl({"pdl_waiting_kernels": []}) is None  # built where the kernels do not wait: as captured


def test_off_by_switch_and_for_engines_without_the_record(monkeypatch):
    monkeypatch.setenv(PDL_ENV, "0")
    assert decode_pdl(INFO) is None
    monkeypatch.setenv(PDL_ENV, "launch")
    assert decode_pdl({}) is None  # built before the record: its kernels may not wait
    assert decode_pdl({"pdl_waiting_kernels": []}) is None  # a CPU build


def test_bad_switch_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(PDL_ENV, "yes")
    with pytest.raises(ValueError, match=f"{PDL_ENV}='yes'.*launch"):
        decode_pdl(INFO)


def test_programmatic_edges_need_decode_graphs():
    from dsv3_export.engines.torch_step import AOTIStep

    step = AOTIStep(prefill=lambda *a: a, decode=lambda *a: a, device="cpu", cache_dtype=torch.bfloat16)
    assert step.pdl is None and step.pdl_edges is None
    with pytest.raises(ValueError, match="need decode CUDA graphs"):
        step.set_decode_pdl(PdlPlan("launch", frozenset({"_fp8_gemm_kernel"})))


def test_unknown_port_is_refused_before_any_driver_call():
    with pytest.raises(ValueError, match="port='early'"):
        add_programmatic_edges(0, {"_fp8_gemm_kernel"}, "early")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the edit is on a captured CUDA graph")
def test_edited_graph_replays_the_same_result():
    from dsv3_export.kernels.fp8_quant import act_quant
    from dsv3_export.kernels.pdl import waiting_kernel_names

    if not waiting_kernel_names():
        pytest.skip("kernels compiled without griddepcontrol.wait (set DSV3_TRITON_GDC=1 before they are imported)")
    x = torch.randn(3, 300, device="cuda", dtype=torch.bfloat16)
    want = [t.clone() for t in act_quant(x)]
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        outs = [act_quant(x) for _ in range(4)]
    edges = add_programmatic_edges(graph.raw_cuda_graph(), waiting_kernel_names(), "launch")
    graph.instantiate()
    graph.replay()
    torch.cuda.synchronize()
    assert edges.converted >= 1
    for q, s in outs:
        assert torch.equal(q.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(s, want[1])


def _compiled(code: str, **env: str) -> str:
    """Run `code` with compiled (not interpreted) triton and the given environment; its stdout."""
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV3_TRITON_GDC")} | env
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_with_the_switch_compiled_kernels_wait_and_torch_analyses_them_without_it():
    # every checked kernel is offered, and torch's kernel mutation analysis is shown the kernels without the
    # wait's inline asm, which would make it assume every input is written
    out = _compiled("""
import torch._higher_order_ops.triton_kernel_wrap as tkw
from dsv3_export.kernels.pdl import CHECKED_KERNELS, GDC, waiting_kernel_names
names = waiting_kernel_names()
assert GDC and {"_fp8_gemm_kernel", "_mla_decode_split_kernel"} <= names and names == frozenset(CHECKED_KERNELS), (GDC, sorted(names))
from dsv3_export.kernels.mutation_analysis import hidden_switches
assert tkw.generate_ttir.hides_side_effect_asm and "dsv3_export.kernels.pdl.GDC" in hidden_switches(), hidden_switches()
print("ok", len(names))
""", DSV3_TRITON_GDC="1")
    assert out.startswith("ok")


_NO_WAIT = """
from dsv3_export.kernels.mutation_analysis import hidden_switches
from dsv3_export.kernels.pdl import GDC, waiting_kernel_names
assert not GDC and waiting_kernel_names() == frozenset()
assert hidden_switches() == ["dsv3_export.kernels.l2_prefetch.PREFETCH_ASM"], hidden_switches()
print("ok")
"""


def test_switched_off_no_kernel_waits_and_the_analysis_hides_no_wait():
    # torch's analysis is still wrapped, for the L2 prefetch's asm (kernels/mutation_analysis.py)
    assert _compiled(_NO_WAIT, DSV3_TRITON_GDC="0").startswith("ok")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto compiles the wait where an sm_90+ GPU is visible")
def test_by_default_no_kernel_waits_without_a_gpu():
    assert _compiled(_NO_WAIT).startswith("ok")


def test_auto_waits_only_where_every_visible_gpu_is_sm90_or_later():
    from dsv3_export.kernels.pdl import gdc_wanted

    assert gdc_wanted("auto", [(9, 0)]) and gdc_wanted("auto", [(10, 0), (9, 0)])
    assert not gdc_wanted("auto", []) and not gdc_wanted("auto", [(8, 0)]) and not gdc_wanted("auto", [(9, 0), (8, 9)])
    assert gdc_wanted("1", []) and not gdc_wanted("0", [(9, 0)])
    with pytest.raises(ValueError, match="DSV3_TRITON_GDC='yes'"):
        gdc_wanted("yes", [(9, 0)])


@pytest.mark.parametrize("interpreted", [False, True])
def test_a_bad_switch_value_fails_the_import_naming_the_variable(interpreted):
    for name in ("DSV3_TRITON_GDC", "DSV3_TRITON_GDC_TRIGGER"):
        full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {name: "yes"}
        if interpreted:  # the wait is compiled out there, the value is still checked
            full["TRITON_INTERPRET"] = "1"
        done = subprocess.run([sys.executable, "-c", "import dsv3_export.kernels.pdl"], env=full,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and f"{name}='yes'" in done.stderr, done.stderr[-500:]


def _edge(from_port: int = 0, kind: int = 0):
    from dsv3_export.engines.cuda_graph_pdl import _EdgeData

    return _EdgeData(from_port, 0, kind)


def test_only_kernel_to_waiting_kernel_default_edges_are_chosen():
    from dsv3_export.engines.cuda_graph_pdl import programmatic_candidates

    # 1 -> 2 -> 3 -> 4 -> 5 -> 6 in stream order, 7 a second producer of 6
    names = {1: "_act_quant_kernel", 2: "_fp8_gemm_kernel", 3: None, 4: "_fp8_gemm_kernel",
             5: "triton_poi_fused_add_0", 6: "_act_quant_kernel", 7: "nvjet_sm90_tst"}
    edges = [(1, 2, _edge()),  # kernel -> waiting kernel: chosen
             (2, 3, _edge()),  # into a memcpy node: kept
             (3, 4, _edge()),  # from a memcpy node: kept (programmatic edges join kernels only)
             (4, 5, _edge()),  # into an Inductor kernel that does not wait: kept
             (5, 6, _edge()),  # Inductor kernel -> waiting kernel: chosen
             (7, 6, _edge()),  # cuBLAS -> waiting kernel: chosen
             (1, 4, _edge(from_port=1, kind=1))]  # already programmatic: left as it is
    chosen = programmatic_candidates(names, edges, iter(["_act_quant_kernel", "_fp8_gemm_kernel"]))
    assert [(a, b) for a, b, _ in chosen] == [(1, 2), (5, 6), (7, 6)]
    assert programmatic_candidates(names, edges, []) == []
    # with Inductor's PDL code the manifest also lists the Inductor kernels that wait first: 4 -> 5 is chosen too
    chosen = programmatic_candidates(names, edges, ["_act_quant_kernel", "_fp8_gemm_kernel", "triton_poi_fused_add_0"])
    assert [(a, b) for a, b, _ in chosen] == [(1, 2), (4, 5), (5, 6), (7, 6)]


def test_the_allow_list_matches_exact_names_only():
    from dsv3_export.engines.cuda_graph_pdl import waits

    allow = ["triton_per_fused_add_mean_7", "_router_kernel"]
    assert waits("triton_per_fused_add_mean_7", allow) and waits("_router_kernel", allow)
    assert not waits("_router_kernel_2", allow) and not waits("triton_per_fused_add_mean_70", allow)
    assert not waits("triton_per_*", ["triton_per_*x"]) and not waits(None, allow) and not waits("triton_per_", [])


def test_inductor_pdl_follows_our_kernels_wait_in_decode_packages_and_lists_only_the_recorded_kernels_that_wait(
        monkeypatch):
    from dsv3_export.engines import torch as te
    from dsv3_export.engines.torch_inductor_pdl import InductorKernels

    from dsv3_export.kernels.pdl import waiting_kernel_names

    recorded = InductorKernels()
    recorded.recorded = True  # as engines/torch_inductor_pdl.py recording() marks it
    recorded.add("triton_per_fused_norm_0", "@triton.jit\ndef k(p):\n    tl.extra.cuda.gdc_wait()\n")
    recorded.add("triton_poi_fused_fill_1", "@triton.jit\ndef k(p):\n    tl.store(p, 0)\n")
    monkeypatch.delenv(te.INDUCTOR_PDL_ENV, raising=False)  # default auto: off while our kernels do not wait
    assert not te.inductor_pdl_on() and "triton.enable_pdl" not in te.inductor_configs(
        "decode", {"device_kind": "sm_90"})
    monkeypatch.setenv(te.INDUCTOR_PDL_ENV, "auto")  # off while our kernels do not wait
    assert te.pdl_waiting_kernels("cuda", recorded) == ["triton_per_fused_norm_0"]  # ours: none (interpreted)
    assert not te.inductor_pdl_on() and "triton.enable_pdl" not in te.inductor_configs(
        "decode", {"device_kind": "sm_90"})
    assert "without griddepcontrol.wait" in te.pdl_note(recorded)
    monkeypatch.setenv(te.INDUCTOR_PDL_ENV, "1")
    assert te.pdl_waiting_kernels("cpu", recorded) == []  # CPU packages: C++ kernels, no PDL
    with pytest.raises(ValueError, match="DSV3_TORCH_INDUCTOR_PDL=1 needs our kernels to wait"):
        te.inductor_pdl_on()  # the kernels here are interpreted: compiled without the wait
    monkeypatch.setattr("dsv3_export.kernels.pdl.GDC", True)
    monkeypatch.setenv(te.INDUCTOR_PDL_ENV, "auto")
    ours = sorted(waiting_kernel_names())
    assert ours and te.pdl_waiting_kernels("cuda", recorded) == ours + ["triton_per_fused_norm_0"]
    has_flag = hasattr(torch._inductor.config.triton, "enable_pdl")
    assert te.inductor_pdl_on() is has_flag
    configs = te.inductor_configs("decode", {"device_kind": "sm_90"})
    assert configs.get("triton.enable_pdl") is (True if has_flag else None)
    # the prefill package runs without a CUDA graph, so without programmatic edges: no PDL code there
    assert "triton.enable_pdl" not in te.inductor_configs("prefill", {"device_kind": "sm_90"})
    assert te.pdl_note(recorded).endswith("1 of 2 Inductor kernels wait before any memory access") or not has_flag
    monkeypatch.delenv(te.INDUCTOR_PDL_ENV)  # the default, auto: on where ours wait and torch has the flag
    assert te.inductor_pdl_on() is has_flag
    monkeypatch.setenv(te.INDUCTOR_PDL_ENV, "0")
    assert not te.inductor_pdl_on() and "without PDL code" in te.pdl_note(recorded)
    monkeypatch.setenv(te.INDUCTOR_PDL_ENV, "yes")
    with pytest.raises(ValueError, match=te.INDUCTOR_PDL_ENV):
        te.inductor_pdl_on()


class _FakeDriver:
    """libcuda's graph calls over a 3-kernel chain A -> B -> C (B and C wait), answering through the same
    ctypes arguments the real driver fills; add_edges fails with `add_result` for programmatic edge data."""

    NAMES = {11: b"_rmsnorm_kernel", 12: b"_act_quant_kernel", 13: b"_fp8_gemm_kernel"}

    def __init__(self, add_result: int = 0):
        self.edges = [(11, 12, 0), (12, 13, 0)]  # (from, to, dependency type)
        self.calls: list[str] = []
        self.add_result = add_result
        self.kernel_name = None

    def get_nodes(self, graph, nodes, count):
        if nodes is not None:
            for i, node in enumerate(self.NAMES):
                nodes[i] = node
        count._obj.value = len(self.NAMES)
        return 0

    def node_type(self, node, kind):
        kind._obj.value = 0  # CU_GRAPH_NODE_TYPE_KERNEL
        return 0

    def kernel_params(self, node, params):
        params._obj.func = node.value  # the node id doubles as its CUfunction
        return 0

    def func_name(self, name, func):
        name._obj.value = self.NAMES[func.value]
        return 0

    def get_edges(self, graph, src, dst, data, count):
        if src is not None:
            for i, (a, b, kind) in enumerate(self.edges):
                src[i], dst[i] = a, b
                data[i].type = kind
        count._obj.value = len(self.edges)
        return 0

    def remove_edges(self, graph, src, dst, data, n):
        self.calls.append("remove")
        pairs = {(src[i], dst[i]) for i in range(n.value)}
        self.edges = [e for e in self.edges if (e[0], e[1]) not in pairs]
        return 0

    def add_edges(self, graph, src, dst, data, n):
        programmatic = data[0].type == 1
        self.calls.append("add programmatic" if programmatic else "add default")
        if programmatic and self.add_result:
            return self.add_result
        self.edges += [(src[i], dst[i], data[i].type) for i in range(n.value)]
        return 0


def test_edit_through_the_driver_calls(monkeypatch):
    from dsv3_export.engines import cuda_graph_pdl

    fake = _FakeDriver()
    monkeypatch.setattr(cuda_graph_pdl, "_driver", lambda: fake)
    done = add_programmatic_edges(1, {"_act_quant_kernel", "_fp8_gemm_kernel"}, "launch")
    assert (done.edges, done.kernels, done.converted, done.waiting_kernels) == (2, 3, 2, 2)
    assert sorted(fake.edges) == [(11, 12, 1), (12, 13, 1)] and fake.calls == ["remove", "add programmatic"]
    assert cuda_graph_pdl.kernel_names(1) == ["_rmsnorm_kernel", "_act_quant_kernel", "_fp8_gemm_kernel"]


def test_a_refused_edit_puts_the_captured_edges_back(monkeypatch):
    from dsv3_export.engines import cuda_graph_pdl

    fake = _FakeDriver(add_result=801)  # CUDA_ERROR_NOT_SUPPORTED
    monkeypatch.setattr(cuda_graph_pdl, "_driver", lambda: fake)
    with pytest.raises(RuntimeError, match="cuGraphAddDependencies failed with CUresult 801"):
        add_programmatic_edges(1, {"_fp8_gemm_kernel"}, "programmatic")
    assert fake.edges == [(11, 12, 0), (12, 13, 0)]  # as captured: nothing may run early
    assert fake.calls == ["remove", "add programmatic", "add default"]
