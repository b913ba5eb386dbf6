"""Programmatic dependent launch (PDL, sm_90+): which of our kernels may start before their producer ends.

A batch-1 decode step is ~720 short kernels replayed from one CUDA graph; with plain graph edges a
kernel's blocks are only scheduled after the previous kernel has finished and flushed, so each
boundary costs the launch ramp of the next kernel on top of the ~0.4 us gap (session 9's replay
timeline). A *programmatic* edge (engines/cuda_graph_pdl.py rewrites the captured graph) lets the
next kernel be scheduled early, while its first instruction, `griddepcontrol.wait`, holds it until
the producer grid has completed and its writes are visible. That is only safe for a kernel that
waits before it touches any memory a predecessor writes, in every program that touches memory.

So a kernel opts in with `@waits_for_producer` on top of `@triton.jit`, and its body's first
statement must be `wait_for_producer()`; the decorator checks that at import and records the
kernel's name in WAITING_KERNELS, the only names the graph rewrite gives programmatic edges to.
Because every such kernel completes only after its producer completed, completion stays transitive
along the graph and kernels that never wait (Inductor's, cuBLAS's) keep ordinary edges.

`griddepcontrol.wait` is a no-op when the launch had no programmatic dependency (eager calls,
ordinary edges); the CPU interpreter has no such instruction, so there it is left out (GDC).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import triton
import triton.language as tl

from dsv3_export.kernels._common import is_interpreted


@triton.jit
def _interpreter_probe():
    pass


# griddepcontrol exists on sm_90 and later; the interpreter (TRITON_INTERPRET=1) has none.
GDC = tl.constexpr(not is_interpreted(_interpreter_probe))


@triton.jit
def wait_for_producer():
    """Block until the grids this launch depends on have completed and their writes are visible."""
    if GDC:
        tl.extra.cuda.gdc_wait()


# Names (as the CUDA driver reports them: the @triton.jit function's name) of the kernels that wait
# first: the graph rewrite's allow-list.
WAITING_KERNELS: set[str] = set()


def waiting_kernel_names() -> frozenset[str]:
    """WAITING_KERNELS once every kernel family is imported (what an engine build records)."""
    from dsv3_export.kernels import (fp8_gemm, fp8_gemm_persistent, fp8_quant, mla_absorb, mla_decode,  # noqa: F401
                                     mla_prefill, mla_tail, moe, moe_align, rmsnorm, router_align, topk)
    return frozenset(WAITING_KERNELS)


def waits_for_producer(kernel: Any) -> Any:
    """Register a @triton.jit kernel whose first statement is `wait_for_producer()` (checked here)."""
    fn = getattr(kernel, "fn", kernel)
    name = fn.__name__
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    first = body[0] if body else None
    call = first.value if isinstance(first, ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "wait_for_producer"):
        raise TypeError(f"@waits_for_producer: kernel {name} must start with wait_for_producer() (after its "
                        "docstring): a programmatic graph edge would let it read its producer's outputs early")
    WAITING_KERNELS.add(name)
    return kernel
