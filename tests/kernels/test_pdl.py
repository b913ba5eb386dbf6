"""kernels/pdl.py: only kernels that wait before touching memory are offered programmatic graph edges.
These run interpreted (tests/kernels/conftest.py), where the wait is compiled out (GDC off)."""

from __future__ import annotations

import inspect

import pytest
import torch
import triton

from dsv3_export.kernels.pdl import (CHECKED_KERNELS, EAGER_ONLY_KERNELS, GDC, import_kernel_families,
                                     waiting_kernel_names, waits_for_producer)


def _kernels():
    for module in import_kernel_families():  # every module of the package: a new family is covered too
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and inspect.getmodule(obj.fn) is module:
                yield name


def test_every_kernel_waits_for_its_producer():
    # the graph rewrite covers every kernel of the package: a new kernel without the wait fails here
    kernels = set(_kernels())
    assert {"_fp8_gemm_kernel", "_grouped_gemm_kernel", "_mla_decode_split_kernel", "_fp8_gemv_kernel"} <= kernels  # discovery works
    assert kernels <= CHECKED_KERNELS | set(EAGER_ONLY_KERNELS), sorted(kernels - CHECKED_KERNELS)
    assert not CHECKED_KERNELS & set(EAGER_ONLY_KERNELS)  # an eager-only kernel is never offered a programmatic edge


class _GluonGemm(torch.nn.Module):
    def forward(self, a, a_s, b, b_s):
        from dsv3_export.kernels.fp8_gemm_gluon import fp8_gemm_gluon

        return fp8_gemm_gluon(a, a_s, b, b_s)


def test_eager_only_kernels_are_the_gluon_ones_and_refuse_tracing():
    import_kernel_families()
    assert set(EAGER_ONLY_KERNELS) == {"_fp8_gemm_gluon_kernel", "_fp8_gemm_gluon_ws_kernel"}
    assert not set(EAGER_ONLY_KERNELS) & waiting_kernel_names()
    operands = (torch.zeros(4, 128, dtype=torch.float8_e4m3fn), torch.ones(4, 1),
                torch.zeros(128, 128, dtype=torch.float8_e4m3fn), torch.ones(1, 1))
    with pytest.raises(Exception, match="eager-only"):  # so they can never sit behind a programmatic graph edge
        torch.export.export(_GluonGemm(), operands)


def test_interpreted_kernels_are_not_offered_programmatic_edges():
    assert not GDC  # the interpreter has no griddepcontrol: the kernels here do not wait
    assert waiting_kernel_names() == frozenset()


def test_a_kernel_that_reads_before_waiting_is_refused():
    @triton.jit
    def _early_read_kernel(x_ptr):
        """Reads, then waits: a programmatic edge would let the read see stale data."""
        x = tl.load(x_ptr)  # noqa: F841, F821
        wait_for_producer()  # noqa: F821

    with pytest.raises(TypeError, match=r"_early_read_kernel calls \['load'\] before wait_for_producer"):
        waits_for_producer(_early_read_kernel)
    assert "_early_read_kernel" not in CHECKED_KERNELS


def test_a_kernel_without_the_wait_at_its_top_level_is_refused():
    @triton.jit
    def _nested_wait_kernel(x_ptr, FLAG: tl.constexpr):  # noqa: F821
        if FLAG:
            wait_for_producer()  # noqa: F821
        tl.store(x_ptr, 1)  # noqa: F821

    with pytest.raises(TypeError, match="_nested_wait_kernel must call wait_for_producer"):
        waits_for_producer(_nested_wait_kernel)


def test_a_kernel_that_may_return_before_waiting_is_refused():
    @triton.jit
    def _early_exit_kernel(x_ptr, n):
        """Programs past n return without waiting: with none before n (n = 0) the launch never waits."""
        if tl.program_id(0) >= n:  # noqa: F821
            return
        wait_for_producer()  # noqa: F821
        tl.store(x_ptr, 1)  # noqa: F821

    with pytest.raises(TypeError, match="_early_exit_kernel may return before wait_for_producer"):
        waits_for_producer(_early_exit_kernel)
    assert "_early_exit_kernel" not in CHECKED_KERNELS


def test_a_helper_that_might_load_is_refused_before_the_wait():
    @triton.jit
    def _helper_first_kernel(x_ptr):
        if x_ptr is not None:
            v = _clamped_load(x_ptr, 0, 1)  # noqa: F841, F821
        wait_for_producer()  # noqa: F821

    with pytest.raises(TypeError, match="_clamped_load"):
        waits_for_producer(_helper_first_kernel)


def test_index_arithmetic_and_l2_prefetches_may_come_before_the_wait():
    """kernels/pdl.py PRE_WAIT_CALLS: a prefetch reads nothing into registers (the GEMV's weight rows, merge_uv's)."""
    @triton.jit
    def _prefetch_first_kernel(w_ptr, N, PREFETCH: tl.constexpr):  # noqa: F821
        if PREFETCH:
            rows = tl.minimum(tl.program_id(0) * 16 + tl.arange(0, 16), N - 1)  # noqa: F821
            prefetch_l2(w_ptr + rows.to(tl.int64) * 128)  # noqa: F821
        wait_for_producer()  # noqa: F821

    _assert_registered(_prefetch_first_kernel)


def test_the_wait_may_follow_the_docstring():
    @triton.jit
    def _docstring_first_kernel(x_ptr):
        """Docstring, then the wait."""
        wait_for_producer()  # noqa: F821

    _assert_registered(_docstring_first_kernel)


def _assert_registered(kernel):
    """waits_for_producer accepts the kernel and registers its name (taken out again: the registry is global)."""
    name = kernel.fn.__name__
    try:
        waits_for_producer(kernel)
        assert name in CHECKED_KERNELS
    finally:
        CHECKED_KERNELS.discard(name)
