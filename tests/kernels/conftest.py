"""Kernel tests run the Triton kernels on the CPU through the interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels (at import of
dsv3_export.kernels.*), so it is set here, at conftest import time, before any test module of
this folder imports them. Each test module skips itself when triton is not installed.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    # triton.language's own jit helpers (tl.cdiv, ...) were built for the compiler, so every interpreted
    # kernel calling one would fail with "Cannot call @triton.jit'd outside of the scope of a kernel".
    raise RuntimeError("tests/kernels: triton was imported before this conftest set TRITON_INTERPRET=1; a test "
                       "module collected earlier imports it at module level (import it inside the tests)")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every torch.empty inside a test returns NaN-filled memory (ints: a huge sentinel).

    The launchers allocate their outputs and workspaces with torch.empty, so an element a kernel
    forgets to write stays NaN and fails the comparison (or the explicit no-NaN checks).
    """
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    yield


@pytest.fixture(autouse=True)
def _interpreted_kernels():
    """Fail loudly if dsv3_export.kernels was imported (compiled mode) before this conftest ran."""
    from dsv3_export.kernels._common import is_interpreted
    from dsv3_export.kernels.fp8_quant import _act_quant_kernel

    if not is_interpreted(_act_quant_kernel):
        pytest.fail("dsv3_export.kernels was imported before TRITON_INTERPRET=1 was set; set it in the "
                    "root tests/conftest.py or run tests/kernels on its own")
