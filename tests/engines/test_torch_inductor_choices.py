"""engines/torch_inductor_choices.py and DSV3_TORCH_PERSISTENT_NORMS: inner reductions up to 4096 elements
persistent in CUDA packages, Inductor's own answer everywhere else, and the build told how many it changed.

Inductor's modules (choices, sizevars, virtualized, codegen) import triton, which must not load before
tests/kernels' conftest sets TRITON_INTERPRET: they are imported inside the tests."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import sympy

from dsv3_export.engines.torch import (PERSISTENT_INNER_MAX, PERSISTENT_NORMS_ENV, compile_package,
                                       persistent_norms_note, persistent_norms_switch)

CUDA = {"device_kind": "cuda"}
CPU = {"device_kind": "cpu", "march": None}


class _Features:
    """What should_use_persistent_reduction reads of Inductor's SIMDKernelFeatures (numel: the rows, which a
    cooperative reduction's threshold depends on)."""

    def __init__(self, reduction_numel: int, hint_name: str = "INNER", rows: int = 64):
        from torch._inductor.runtime.hints import ReductionHint

        self.reduction_numel = sympy.Integer(reduction_numel)
        self.numel = sympy.Integer(rows)
        self.hint = ReductionHint[hint_name]

    def get_reduction_hint(self):
        return self.hint


@pytest.fixture
def graph():
    """A graph handler with Inductor's real size arithmetic: all the decision reads of V.graph."""
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V

    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
        yield


def _both(features: _Features, cooperative: bool = False) -> tuple[bool, bool, int]:
    """(Inductor's answer, ours, how many kernels ours counts as promoted)."""
    from torch._inductor.choices import InductorChoices

    from dsv3_export.engines.torch_inductor_choices import PersistentNorms

    ours = PersistentNorms(PERSISTENT_INNER_MAX)
    answer = ours.should_use_persistent_reduction(features, cooperative_reduction=cooperative)
    return InductorChoices.should_use_persistent_reduction(features, cooperative), answer, len(ours.promoted)


def test_hidden_size_inner_reduction_made_persistent(graph):
    assert _both(_Features(2048)) == (False, True, 1)  # the 16b model's RMSNorm: looped by Inductor
    assert _both(_Features(4096)) == (False, True, 1)


def test_inductors_own_persistent_reductions_are_not_counted(graph):
    assert _both(_Features(512)) == (True, True, 0)  # the kv_norm: persistent already


@pytest.mark.parametrize("width, hint", [(8192, "INNER"), (2048, "OUTER"), (2048, "OUTER_TINY"), (2048, "DEFAULT")])
def test_other_reductions_left_to_inductor(graph, width, hint):
    inductors, ours, promoted = _both(_Features(width, hint))
    assert (ours, promoted) == (inductors, 0)


@pytest.mark.parametrize("rows", [1, 64])  # Inductor: persistent at 1 row (threshold x32), looped at 64
def test_cooperative_reductions_left_to_inductor(graph, rows):
    inductors, ours, promoted = _both(_Features(2048, rows=rows), cooperative=True)
    assert (ours, promoted) == (inductors, 0)


def test_symbolic_reduction_size_left_to_inductor(graph):
    features = _Features(2048)
    features.reduction_numel = sympy.Symbol("s0", integer=True, positive=True)  # not known to be <= 4096
    assert _both(features) == (False, False, 0)


def test_nothing_persistent_where_inductor_turns_persistent_reductions_off(graph):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.persistent_reductions": False}):
        assert _both(_Features(2048)) == (False, False, 0)
        assert _both(_Features(512)) == (False, False, 0)


def test_a_kernel_asked_about_twice_counts_once(graph):
    from dsv3_export.engines.torch_inductor_choices import PersistentNorms

    choices, features = PersistentNorms(PERSISTENT_INNER_MAX), _Features(2048)
    for _ in range(2):
        assert choices.should_use_persistent_reduction(features, False)
    assert len(choices.promoted) == 1
    assert choices.should_use_persistent_reduction(_Features(3072), cooperative_reduction=False)
    assert len(choices.promoted) == 2


def test_handler_installed_for_the_duration_then_restored():
    from torch._inductor.virtualized import V

    from dsv3_export.engines.torch_inductor_choices import PersistentNorms, persistent_norms

    before = V.choices
    with persistent_norms(PERSISTENT_INNER_MAX) as choices:
        assert V.choices is choices and isinstance(choices, PersistentNorms)
    assert V.choices is before
    with pytest.raises(KeyError), persistent_norms(PERSISTENT_INNER_MAX):  # a failed compile restores it too
        raise KeyError
    assert V.choices is before
    assert choices.uuid() == f"dsv3_export.PersistentNorms/inner<={PERSISTENT_INNER_MAX}"


def _compile_recording(monkeypatch, tmp_path: Path, info: dict, promoted: dict) -> type:
    """compile_package with AOTInductor replaced by a recorder: the choices handler's type during the compile.
    The recorder asks it about one 2048-wide inner reduction, as Inductor would."""
    import torch
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V

    seen = []

    def aoti_compile_and_package(ep, package_path, inductor_configs):
        seen.append(type(V.choices))
        with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
            V.choices.should_use_persistent_reduction(_Features(2048), cooperative_reduction=False)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", aoti_compile_and_package)
    assert compile_package(None, "decode", tmp_path / "decode.pt2", info, promoted) == tmp_path / "decode.pt2"
    return seen[0]


def test_cuda_packages_compile_with_persistent_norms_by_default(monkeypatch, tmp_path):
    from torch._inductor.virtualized import V

    from dsv3_export.engines.torch_inductor_choices import PersistentNorms

    monkeypatch.delenv(PERSISTENT_NORMS_ENV, raising=False)
    before, promoted = V.choices, {}
    assert _compile_recording(monkeypatch, tmp_path, CUDA, promoted) is PersistentNorms
    assert promoted == {"decode": 1} and V.choices is before
    note = persistent_norms_note(persistent_norms_switch(CUDA), promoted)
    assert note.startswith(f"on ({PERSISTENT_NORMS_ENV}=1)") and note.endswith("decode 1")


@pytest.mark.parametrize("info, value", [(CUDA, "0"), (CPU, None), (CPU, "1")], ids=["cuda-off", "cpu", "cpu-on"])
def test_switch_off_and_cpu_packages_keep_inductors_choices(monkeypatch, tmp_path, info, value):
    from torch._inductor.choices import InductorChoices

    if value is None:
        monkeypatch.delenv(PERSISTENT_NORMS_ENV, raising=False)
    else:
        monkeypatch.setenv(PERSISTENT_NORMS_ENV, value)
    promoted: dict = {}
    assert _compile_recording(monkeypatch, tmp_path, info, promoted) is InductorChoices
    assert promoted == {}
    note = persistent_norms_note(persistent_norms_switch(info), promoted)
    assert note is None if info is CPU else note.startswith(f"off ({PERSISTENT_NORMS_ENV}=0")


def test_switch_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(PERSISTENT_NORMS_ENV, "yes")
    with pytest.raises(ValueError, match=PERSISTENT_NORMS_ENV):
        persistent_norms_switch(CUDA)


def _rmsnorm_kernel(width: int, on: bool) -> tuple[bool, str, set]:
    """(persistent?, kernel signature, promoted) of the Triton kernel Inductor generates for a residual add +
    RMSNorm of `width`, with PersistentNorms installed or not.

    No CUDA here: Inductor's Triton backend for CPU tensors (cpu_backend="triton") goes through the same
    scheduling and TritonKernel, and so asks V.choices the same question. Triton has no CPU driver to hash
    its backend by, so that hash is stubbed, and the compile is stopped once the kernel's source is written."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen.triton import TritonKernel

    from dsv3_export.engines.torch_inductor_choices import persistent_norms

    class KernelWritten(Exception):
        pass

    kernels = []
    codegen = TritonKernel.codegen_kernel

    def recorded(self, *args, **kwargs):
        source = codegen(self, *args, **kwargs)
        kernels.append((self.persistent_reduction, next(line for line in source.splitlines() if "def " in line)))
        raise KernelWritten

    def rmsnorm(x, r, w):
        h = x + r
        return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype) * w

    x, r, w = torch.randn(4, width), torch.randn(4, width), torch.randn(width)
    with inductor_config.patch({"cpu_backend": "triton"}), \
            pytest.MonkeyPatch.context() as mp, \
            (persistent_norms(PERSISTENT_INNER_MAX) if on else contextlib.nullcontext()) as choices:
        mp.setattr(torch.utils._triton, "triton_hash_with_backend", lambda: "no-cpu-driver")
        mp.setattr(TritonKernel, "codegen_kernel", recorded)
        torch._dynamo.reset()
        with pytest.raises(Exception, match=KernelWritten.__name__):  # wrapped in Inductor's InductorError
            torch.compile(rmsnorm, fullgraph=True)(x, r, w)
        torch._dynamo.reset()
    assert len(kernels) == 1, kernels
    return kernels[0][0], kernels[0][1], choices.promoted if choices is not None else set()


def test_inductor_generates_the_persistent_kernel_with_the_handler_installed():
    persistent, signature, promoted = _rmsnorm_kernel(2048, on=True)
    assert persistent and "R0_BLOCK" not in signature and len(promoted) == 1  # no loop over the row
    persistent, signature, promoted = _rmsnorm_kernel(2048, on=False)
    assert not persistent and "R0_BLOCK" in signature  # Inductor's own: a loop of R0_BLOCK-wide chunks
