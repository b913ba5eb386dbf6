"""Which of Inductor's kernels the decode graph edit may give programmatic edges (engines/torch_inductor_pdl.py):
the source check on kernels written as Inductor writes them with torch's triton.enable_pdl, and the recording hook.
Inductor's PDL code itself is generated only for an sm_90+ GPU: benchmarks/torch_16b.py reports its count there."""

from __future__ import annotations

import pytest

from dsv3_export.engines.torch_inductor_pdl import InductorKernels, recording, waits_first, why_not_first

HEADER = '''
import triton
import triton.language as tl

from torch._inductor.runtime import triton_helpers, triton_heuristics
triton_helpers.set_driver_to_gpu()

@triton_heuristics.persistent_reduction(
    size_hints={'x': 1, 'r0_': 2048},
    filename=__file__,
    triton_meta={'signature': {'in_ptr0': '*bf16', 'out_ptr0': '*bf16'}, 'device': DeviceProperties.create(0)},
)
@triton.jit
def KERNEL_NAME(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK : tl.constexpr):
    xnumel = 1
    r0_numel = 2048
    R0_BLOCK: tl.constexpr = 2048
    xoffset = tl.program_id(0) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)[:, None]
    xmask = tl.full([XBLOCK, R0_BLOCK], True, tl.int1)
    r0_index = tl.arange(0, R0_BLOCK)[None, :]
    r0_0 = r0_index
'''
LOAD = "    tmp0 = tl.load(in_ptr0 + (r0_0), None).to(tl.float32)\n"
WAIT = "    tl.extra.cuda.gdc_wait()\n"
STORE = "    tl.store(out_ptr0 + (r0_0), tmp0, None)\n"
LAUNCH = "    tl.extra.cuda.gdc_launch_dependents()\n"


def test_a_kernel_that_waits_before_its_first_access_qualifies():
    assert waits_first(HEADER + WAIT + LOAD + LAUNCH + STORE)


@pytest.mark.parametrize("body, why", [
    (LOAD + WAIT + LAUNCH + STORE, "a load before the wait (Inductor waits only for the node it scheduled before)"),
    (STORE.replace("tmp0", "0.0"), "no wait at all (a fill kernel: it could finish before its producer)"),
    ("    if xoffset < 1:\n    " + WAIT + LOAD + STORE, "the wait under a branch: not every program waits"),
    ("    for r0_offset in range(0, r0_numel, R0_BLOCK):\n    " + WAIT + LOAD + STORE, "the wait in a loop"),
    ("    tmp9 = tl.atomic_add(out_ptr0, 1)\n" + WAIT + LOAD + STORE, "an atomic before the wait"),
    ("    tmp9 = triton_helpers.promote_to_tensor(xindex)\n" + WAIT + LOAD + STORE, "an unknown call before the wait"),
])
def test_a_kernel_that_may_access_memory_before_waiting_does_not(body, why):
    assert not waits_first(HEADER + body), why


def test_sources_that_are_not_one_jit_kernel_do_not():
    assert why_not_first("def (").startswith("source does not parse")
    assert why_not_first(HEADER + LOAD) == "before any wait: tmp0 = tl.load(in_ptr0 + r0_0, None).to(tl.float32)"
    assert why_not_first(HEADER) == "no top-level gdc_wait"
    assert not waits_first("import triton\n")
    two = HEADER + WAIT + LOAD + "\n@triton.jit\ndef other(p):\n    tl.extra.cuda.gdc_wait()\n"
    assert not waits_first(two)


def test_a_name_qualifies_only_if_every_definition_waits_first():
    kernels = InductorKernels()
    kernels.add("triton_per_fused_a_0", HEADER + WAIT + LOAD + STORE)
    kernels.add("triton_per_fused_b_1", HEADER + WAIT + LOAD + STORE)
    kernels.add("triton_per_fused_b_1", HEADER + LOAD + WAIT + STORE)  # the same name in the other package
    kernels.add("triton_poi_fused_c_2", HEADER + STORE.replace("tmp0", "0.0"))
    assert kernels.waiting() == ["triton_per_fused_a_0"]
    assert kernels.refused() == {
        "triton_per_fused_b_1": "before any wait: tmp0 = tl.load(in_ptr0 + r0_0, None).to(tl.float32)",
        "triton_poi_fused_c_2": "before any wait: tl.store(out_ptr0 + r0_0, 0.0, None)"}
    assert kernels.summary().startswith("not recorded")
    kernels.recorded = True
    assert kernels.summary() == "1 of 3 Inductor kernels wait before any memory access"


def test_recording_wraps_define_kernel_for_the_block_only(monkeypatch):
    from torch._inductor.codegen.triton import TritonScheduling

    calls = []

    def fake_define_kernel(self, src_code, node_schedule, kernel):
        calls.append(src_code)
        return f"triton_poi_fused_{len(calls)}"

    monkeypatch.setattr(TritonScheduling, "define_kernel", fake_define_kernel)
    kernels = InductorKernels()
    with recording(kernels):
        assert TritonScheduling.define_kernel(None, HEADER + WAIT + LOAD, [], None) == "triton_poi_fused_1"
        assert TritonScheduling.define_kernel(None, HEADER + LOAD, [], None) == "triton_poi_fused_2"
    assert TritonScheduling.define_kernel is fake_define_kernel  # restored
    TritonScheduling.define_kernel(None, HEADER + WAIT, [], None)  # after the block: not recorded
    assert kernels.recorded and kernels.waiting() == ["triton_poi_fused_1"] and len(kernels.definitions) == 2


def test_recording_restores_define_kernel_after_an_error():
    from torch._inductor.codegen.triton import TritonScheduling

    before = TritonScheduling.__dict__.get("define_kernel")
    with pytest.raises(RuntimeError, match="compile failed"):
        with recording(InductorKernels()):
            raise RuntimeError("compile failed")
    assert TritonScheduling.__dict__.get("define_kernel") is before


def test_the_kernels_inductor_writes_with_pdl_code_are_recorded_and_checked(monkeypatch):
    """Inductor's own codegen, as in a CUDA package built with triton.enable_pdl, run here on the CPU: Triton as
    its CPU backend, its PDL switch forced on (it asks for an sm_90+ GPU), and the compile stopped where Inductor would
    compile the kernels (no Triton CPU driver here). Three kernels: a looped RMSNorm (waits first, hoisted above its
    loops), the sum of a small vector (its load depends on no kernel Inductor scheduled, so it loads before waiting)
    and an add of that sum (waits first). What define_kernel is given is not Python as it is (its name is a
    placeholder): the check must parse it."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen.triton import TritonKernel

    if not hasattr(inductor_config.triton, "enable_pdl") or not hasattr(TritonKernel, "_enable_pdl_codegen"):
        pytest.skip(f"torch {torch.__version__}: no Inductor PDL codegen")
    monkeypatch.setattr(TritonKernel, "_enable_pdl_codegen", staticmethod(lambda: True))
    monkeypatch.setattr(torch.utils._triton, "triton_hash_with_backend", lambda: "no-driver-here")
    torch._dynamo.reset()

    def norm_sum(x, residual, weight, small):
        h = x.float() + residual.float()
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
        return normed.bfloat16(), h.bfloat16(), torch.zeros(4, 7) + small.sum()

    kernels, backend = InductorKernels(), inductor_config.cpu_backend
    args = (torch.randn(1, 2048, dtype=torch.bfloat16), torch.randn(1, 2048, dtype=torch.bfloat16),
            torch.randn(2048), torch.randn(3))
    # inductor_config.patch, not monkeypatch: monkeypatch's undo deletes a config entry (every later Inductor
    # compile in the process failed: "cpu_backend does not exist"). Caches off: a cached graph (this test run
    # before) is loaded without Inductor defining any kernel, and nothing would be recorded.
    with inductor_config.patch({"cpu_backend": "triton", "force_disable_caches": True}), recording(kernels), \
            pytest.raises(Exception):  # no Triton driver for the CPU: stops at the kernels' compile
        torch.compile(norm_sum, backend="inductor")(*args)
    torch._dynamo.reset()
    assert inductor_config.cpu_backend == backend  # the process's later compiles see Inductor's config as it was
    names = sorted(kernels.definitions)
    assert len(names) == 3, names
    norm, = (n for n in names if "rsqrt" in n)
    total, = (n for n in names if n.endswith("sum_1"))
    add, = (n for n in names if "zeros" in n)
    assert kernels.waiting() == sorted([norm, add]) and total not in kernels.waiting()


@pytest.mark.parametrize("switch, device_kind, record, recorded, kind", [
    ("1", "sm_90", True, True, "decode"),  # a CUDA package with Inductor's PDL code: its kernels recorded
    ("0", "sm_90", True, False, "decode"),  # no PDL code: nothing to list
    ("1", "cpu", True, False, "decode"),  # a CPU package: C++ kernels
    ("1", "sm_90", False, False, "decode"),  # no record asked for
    ("1", "sm_90", True, False, "prefill"),  # no PDL code in a prefill package (no CUDA graph edit there)
])
def test_compile_package_records_inductors_kernels_only_with_pdl_code_on_cuda(monkeypatch, tmp_path, switch,
                                                                             device_kind, record, recorded, kind):
    import torch
    from torch._inductor.codegen.triton import TritonScheduling

    from dsv3_export.engines import torch as te

    monkeypatch.setattr("dsv3_export.kernels.pdl.GDC", True)  # our kernels wait (an sm_90+ GPU)
    monkeypatch.setattr(torch._inductor.config.triton, "enable_pdl", False, raising=False)
    monkeypatch.setenv(te.INDUCTOR_PDL_ENV, switch)
    monkeypatch.setattr(TritonScheduling, "define_kernel", lambda self, src_code, *args: "triton_poi_fused_0")
    monkeypatch.setattr(te, "persistent_norms_switch", lambda info: None)
    configs = []

    def aoti_compile_and_package(ep, package_path, inductor_configs):  # Inductor defines one kernel, waiting first
        configs.append(inductor_configs)
        TritonScheduling.define_kernel(None, HEADER + WAIT + LOAD + STORE, [], None)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", aoti_compile_and_package)
    kernels = te.InductorKernels()
    te.compile_package(None, kind, tmp_path / f"{kind}.pt2", {"device_kind": device_kind},
                       inductor=kernels if record else None)
    assert kernels.waiting() == (["triton_poi_fused_0"] if recorded else [])
    assert configs[0].get("triton.enable_pdl") is (True if switch == "1" and device_kind != "cpu" and kind == "decode"
                                                    else None)
