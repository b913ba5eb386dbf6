"""A guard around an AOTInductor C++ wrapper bug that failed one 16b package build in four (H200, session 19).

CppWrapperCpu.codegen_int_array_var caches each size/stride array it declares by the id of the writer it
was declared with: id(writeline) in torch 2.11 (a bound method, a new object at every attribute access),
id(writeline.__self__) in 2.13. Memory planning generates the wrapper twice and writes each pass into its
own buffer, so that a second-pass array is declared again in the code that is kept. But an id outlives
nothing: once a writer is freed, a later one can be allocated at its address, and the cache then hands
back a variable whose declaration went into another (perhaps discarded) buffer. The C++ compile fails
(`error: 'int_array_585' was not declared in this scope`), or not, depending on where Python's allocator
placed the objects. Both key forms reproduce the stale hit on the CPU every time
(tests/engines/test_torch_int_arrays.py); a 16b fp8 decode build hit it on the H200 with torch 2.11.

unique_int_array_writers() keeps every writer the cache has seen (the bound method, and with it its buffer)
alive while it is active, so that no two writers share an id and the cache only returns a declaration to
the writer that wrote it. With 2.11's key that means no reuse at all: each call declares its array afresh.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

KEPT = "_dsv3_int_array_writers"


@contextlib.contextmanager
def unique_int_array_writers() -> Iterator[None]:
    """Patch CppWrapperCpu.codegen_int_array_var for the duration (a no-op where torch lacks it)."""
    try:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    except ImportError:
        yield
        return
    original = CppWrapperCpu.__dict__.get("codegen_int_array_var")
    if original is None or getattr(original, KEPT, False):  # absent, or already patched (nested use)
        yield
        return

    @functools.wraps(original)
    def codegen_int_array_var(self, int_array, writeline, *args, **kwargs):
        self.__dict__.setdefault(KEPT, []).append(writeline)  # holds writeline.__self__ too
        return original(self, int_array, writeline, *args, **kwargs)

    setattr(codegen_int_array_var, KEPT, True)
    CppWrapperCpu.codegen_int_array_var = codegen_int_array_var
    try:
        yield
    finally:
        CppWrapperCpu.codegen_int_array_var = original
