"""engines/torch_int_arrays.py: AOTInductor's int-array declaration cache, keyed by a writer's id, must not
hand a later writer a declaration that went into a freed one. Without the guard the installed torch (2.13:
the buffer's id) and torch 2.11's key (the bound method's id) do so; with it, each writer gets its own
declaration. If a torch release fixes the key, the unguarded check fails and the guard can go."""

from __future__ import annotations

from itertools import count

import pytest

from dsv3_export.engines.torch_int_arrays import unique_int_array_writers


@pytest.fixture
def cpp_wrapper_cpu():
    """Inductor's C++ wrapper module, imported inside the tests: it imports triton, which must not load before
    tests/kernels' conftest sets TRITON_INTERPRET (that conftest refuses to run then)."""
    return pytest.importorskip("torch._inductor.codegen.cpp_wrapper_cpu")


class _Buffer:
    def __init__(self):
        self.lines = []

    def writeline(self, line):
        self.lines.append(line)


def _stale_declarations(cpp_wrapper_cpu, rounds: int = 50) -> int:
    """How often a writer created after another was freed gets no declaration of its array."""
    from torch.utils._ordered_set import OrderedSet

    wrapper = object.__new__(cpp_wrapper_cpu.CppWrapperCpu)  # only the cache's own state is needed
    wrapper.int_array_id, wrapper.declared_int_array_vars, wrapper.codegen_int_array_var_cache = \
        count(), OrderedSet(), {}
    stale = 0
    for _ in range(rounds):
        first = _Buffer()
        wrapper.codegen_int_array_var("{1, 2}", first.writeline)
        del first
        second = _Buffer()
        var = wrapper.codegen_int_array_var("{1, 2}", second.writeline)
        stale += not any(var in line for line in second.lines)
    return stale


def _keyed_by_bound_method(self, int_array, writeline, known_statically=False, graph=None):
    """torch 2.11's cache key (read from its source on the H200): the id of the bound method itself."""
    key = (int_array, id(writeline), known_statically, id(graph) if graph else None)
    if key not in self.codegen_int_array_var_cache:
        self.codegen_int_array_var_cache[key] = self._codegen_int_array_var_impl(int_array, writeline,
                                                                                 known_statically)
    return self.codegen_int_array_var_cache[key]


@pytest.mark.parametrize("key_form", ["installed", "torch 2.11"])
def test_each_writer_gets_its_declaration(monkeypatch, cpp_wrapper_cpu, key_form):
    if key_form == "torch 2.11":
        monkeypatch.setattr(cpp_wrapper_cpu.CppWrapperCpu, "codegen_int_array_var", _keyed_by_bound_method)
    assert _stale_declarations(cpp_wrapper_cpu) > 0  # the bug, unguarded (CPython reuses a freed object's address)
    with unique_int_array_writers():
        assert _stale_declarations(cpp_wrapper_cpu) == 0


def test_the_guard_restores_inductor_and_nests(cpp_wrapper_cpu):
    original = cpp_wrapper_cpu.CppWrapperCpu.__dict__["codegen_int_array_var"]
    with unique_int_array_writers():
        patched = cpp_wrapper_cpu.CppWrapperCpu.codegen_int_array_var
        with unique_int_array_writers():
            assert cpp_wrapper_cpu.CppWrapperCpu.codegen_int_array_var is patched
        assert cpp_wrapper_cpu.CppWrapperCpu.codegen_int_array_var is patched
    assert cpp_wrapper_cpu.CppWrapperCpu.__dict__["codegen_int_array_var"] is original
