"""Which of Inductor's Triton kernels may sit at the far end of a programmatic edge: those that wait first.

With torch's `triton.enable_pdl` (DSV3_TORCH_INDUCTOR_PDL, engines/torch.py) Inductor writes
`tl.extra.cuda.gdc_wait()` into its kernels, but only before the first access that depends on the node it
scheduled just before (torch/_inductor/codegen/triton.py `_handle_pdl_before_access`), and a kernel without loads
may have no wait at all. The decode graph edit (engines/cuda_graph_pdl.py) asks more of a kernel it gives a
programmatic edge: every program waits, before any load or store. A kernel that never waits could finish before
its producer, and the kernel after it, which waits only for its own producer, could then read outputs still being
written; a load before the wait could read a buffer from a kernel further back that is still running. Our kernels
are checked for that at import (kernels/pdl.py waits_for_producer); Inductor's are checked here, from their source.

So while a CUDA package compiles, InductorKernels records every kernel Inductor defines (around
TritonScheduling.define_kernel, which names it), and `waiting()` gives the names whose every definition waits
first: the manifest's pdl_waiting_kernels beside ours. The rest keep the edges the capture recorded. Where the
hook cannot be installed (a torch without that method), nothing is recorded and no Inductor kernel is listed.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
from typing import Any, Iterator

from dsv3_export.kernels.wait_first_source import INDEX_CALLS, called_names

log = logging.getLogger(__name__)

# What Inductor's kernels compute before their first load: offsets, index ranges and masks (tl.full for an
# all-true mask). Nothing here reads or writes memory (ours may also prefetch: kernels/pdl.py PRE_WAIT_CALLS).
INDUCTOR_PRE_WAIT_CALLS = INDEX_CALLS | {"full", "zeros", "where", "broadcast_to", "reshape"}
# Statements that run in every program: no branch, loop or return before the wait.
_STRAIGHT_LINE = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr)


def _is_gdc_wait(stmt: ast.stmt) -> bool:
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "gdc_wait"
            and ast.unparse(call.func) in ("tl.extra.cuda.gdc_wait", "triton.language.extra.cuda.gdc_wait"))


def _jit_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    return [f for f in tree.body if isinstance(f, ast.FunctionDef)
            and any(ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in f.decorator_list)]


# define_kernel sees the source before the kernel is named: `def Placeholder.KERNEL_NAME(` (torch 2.13), not Python
_KERNEL_DEF = re.compile(r"^def\s+[\w.]+\s*\(", re.MULTILINE)


def why_not_first(source: str) -> str | None:
    """None if the one @triton.jit kernel in `source` (an Inductor kernel module) calls gdc_wait as a top-level
    statement of its body with only straight-line index arithmetic (INDUCTOR_PRE_WAIT_CALLS) before it; else why not
    (the statement that comes first), for the build's record."""
    try:
        kernels = _jit_functions(ast.parse(_KERNEL_DEF.sub("def kernel(", source)))
    except SyntaxError as e:
        return f"source does not parse ({e.msg}, line {e.lineno})"
    if len(kernels) != 1:
        return f"{len(kernels)} @triton.jit functions, not one"
    for stmt in kernels[0].body:
        if _is_gdc_wait(stmt):
            return None
        if not isinstance(stmt, _STRAIGHT_LINE) or called_names([stmt]) - INDUCTOR_PRE_WAIT_CALLS:
            return f"before any wait: {ast.unparse(stmt).splitlines()[0][:100]}"
    return "no top-level gdc_wait"


def waits_first(source: str) -> bool:
    """Whether the kernel in `source` waits before any memory access, in every program (why_not_first)."""
    return why_not_first(source) is None


class InductorKernels:
    """The Triton kernels Inductor defined while packages compiled: name -> why each definition does not wait first
    (None where it does; one name can be defined more than once)."""

    def __init__(self) -> None:
        self.definitions: dict[str, set[str | None]] = {}
        self.recorded = False  # the hook was installed for at least one compile

    def add(self, name: str, source: str) -> None:
        self.definitions.setdefault(name, set()).add(why_not_first(source))

    def waiting(self) -> list[str]:
        """The names every definition of which waits first: safe targets of a programmatic edge."""
        return sorted(name for name, why in self.definitions.items() if why == {None})

    def refused(self) -> dict[str, str]:
        """The other names, each with why (the first reason of its definitions)."""
        return {name: sorted(w for w in why if w is not None)[0]
                for name, why in sorted(self.definitions.items()) if why != {None}}

    def summary(self) -> str:
        if not self.recorded:
            return "not recorded (this torch has no TritonScheduling.define_kernel to record them at)"
        return f"{len(self.waiting())} of {len(self.definitions)} Inductor kernels wait before any memory access"


@contextlib.contextmanager
def recording(kernels: InductorKernels) -> Iterator[InductorKernels]:
    """Record into `kernels` every Triton kernel Inductor defines in this block (this process)."""
    try:
        from torch._inductor.codegen.triton import TritonScheduling
    except ImportError:
        TritonScheduling = None
    original = getattr(TritonScheduling, "define_kernel", None)
    if original is None:
        log.warning("torch: %s", kernels.summary())
        yield kernels
        return
    had_own = "define_kernel" in TritonScheduling.__dict__

    def define_kernel(self: Any, src_code: str, *args: Any, **kwargs: Any) -> Any:
        name = original(self, src_code, *args, **kwargs)
        if isinstance(name, str) and isinstance(src_code, str):
            kernels.add(name, src_code)
        return name

    TritonScheduling.define_kernel = define_kernel
    kernels.recorded = True
    try:
        yield kernels
    finally:
        if had_own:
            TritonScheduling.define_kernel = original
        else:
            del TritonScheduling.define_kernel
