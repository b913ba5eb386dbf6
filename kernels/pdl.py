"""Programmatic dependent launch (PDL, sm_90+): which of our kernels may start before their producer ends.

On by default where it can run: a build on an sm_90+ GPU compiles the kernels with the wait (GDC, DSV3_TRITON_GDC)
and the manifest lists them; the torch runtime makes the decode graph's edges into them programmatic
(DSV3_TORCH_PDL=programmatic, engines/torch.py). GDC_ENV's comment has the H200 figures.

A batch-1 decode step is ~360 short kernels replayed from one CUDA graph; with plain graph edges a
kernel's blocks are only scheduled after the previous kernel has finished and flushed, so each
boundary costs the launch ramp of the next kernel on top of the ~0.4 us gap (session 9's replay
timeline). A *programmatic* edge (engines/cuda_graph_pdl.py rewrites the captured graph) lets the
next kernel be scheduled early, while its first instruction, `griddepcontrol.wait`, holds it until
the producer grid has completed and its writes are visible. That is only safe for a kernel that
waits before it touches any memory a predecessor writes, in every program that touches memory.

So a kernel opts in with `@waits_for_producer` on top of `@triton.jit`, and its body's first
statement must be `wait_for_producer()`; the decorator checks that at import and records the
kernel's name in CHECKED_KERNELS, with GDC on the only names the graph rewrite gives programmatic edges to.
Because every such kernel completes only after its producer completed, completion stays transitive
along the graph; Inductor's kernels join (DSV3_TORCH_INDUCTOR_PDL, auto) only where their source shows the
same (engines/torch_inductor_pdl.py), and the others (cuBLAS's) keep ordinary edges.

PTX documents `griddepcontrol.wait` as returning at once when the launch had no programmatic
dependency (eager calls, ordinary edges). The CPU interpreter has no such instruction, so there it is left out (GDC).

torch's tracing of a user Triton kernel (torch.export / AOTInductor, triton_kernel_wrap) finds the
tensors it writes by reading its TTIR, and gives up on inline assembly with side effects, which is
how Triton 3.6 emits the wait; it then assumes every input is written (functional copies of the
weights and caches; the first 16b package built that way died with an illegal memory access on the
H200). The analysis reads the kernel compiled with GDC off (the same loads and stores, no wait):
GDC is registered with kernels/mutation_analysis.py, whose wrapper of torch's TTIR generator does that. Where
the wrapper cannot be installed (a torch without it), GDC stays off and no kernel is offered programmatic edges.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import textwrap
from types import ModuleType
from typing import Any

import triton
import triton.language as tl

from dsv3_export.kernels._common import is_interpreted
from dsv3_export.kernels.mutation_analysis import hidden_from_mutation_analysis
from dsv3_export.kernels.wait_first_source import INDEX_CALLS, called_names


@triton.jit
def _interpreter_probe():
    pass


# DSV3_TRITON_GDC (read at import): `1` compiles the kernels with the wait, `0` without, `auto` (default) with it
# when this process sees CUDA GPUs of compute capability 9.0 or later (griddepcontrol's minimum; a package is
# built for the GPU it is compiled on). On by default since session 26: on the H200 (27-layer 16b fp8 decode, one
# build per arm, benchmarks/RESULTS.md) the programmatic port replayed the batch-1 step in 1.793 ms against 1.911
# as captured with Inductor's kernels too (a prefix list, since replaced by engines/torch.py INDUCTOR_PDL_ENV's source
# check), and with ours alone 1.877 / 1.843 / 1.841 against 1.901 / 1.904 / 1.891 in three builds, logits
# bit-identical in every form: 2.88x its floor over those three builds against main's 2.996x over four builds
# without the wait (1.904-1.995 ms). Session 27 made Inductor's checked kernels join by default (1.724 ms,
# 2.68x: engines/torch.py INDUCTOR_PDL_ENV's comment). Without a CUDA graph, builds with our kernels' wait alone
# ran 2.35-2.38 ms per batch-1 step against 2.40 (session 10's slowdown did not recur).
GDC_ENV = "DSV3_TRITON_GDC"
GDC_CHOICES = {"auto": "the wait where the GPUs here are sm_90+", "1": "the wait", "0": "no wait"}


def gdc_wanted(choice: str, capabilities: list[tuple[int, int]]) -> bool:
    """Whether GDC_ENV's `choice` compiles the wait, given the compute capabilities of the GPUs this process sees."""
    if choice not in GDC_CHOICES:
        raise ValueError(f"{GDC_ENV}={choice!r}: expected one of {sorted(GDC_CHOICES)}")
    if choice == "auto":
        return bool(capabilities) and min(capabilities) >= (9, 0)
    return choice == "1"


def _visible_capabilities() -> list[tuple[int, int]]:
    """The compute capabilities of the CUDA GPUs torch sees (none on a CPU build or a machine without GPUs)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _gdc_choice() -> str:
    choice = os.environ.get(GDC_ENV, "auto") or "auto"
    gdc_wanted(choice, [])  # checked at import also under the interpreter, where GDC is off whatever it says
    return choice


# griddepcontrol exists on sm_90 and later; the interpreter (TRITON_INTERPRET=1) has none.
_GDC_CHOICE = _gdc_choice()
GDC = tl.constexpr(not is_interpreted(_interpreter_probe)
                   and gdc_wanted(_GDC_CHOICE, [] if _GDC_CHOICE == "0" else _visible_capabilities())
                   and hidden_from_mutation_analysis(globals(), "GDC"))


# DSV3_TRITON_GDC_TRIGGER (read at import; with GDC on): `1` (default) each kernel signals
# `griddepcontrol.launch_dependents` as soon as its wait returns, so that under the "programmatic" port
# (engines/cuda_graph_pdl.py) the next kernel's blocks are launched while this one runs (without it they launch when
# this one's blocks exit) and issue what they may before their own wait: L2 prefetches of their weights
# (PRE_WAIT_CALLS). `0` no signal. Timed with it on in every session-26 build above (and session 25's 4-layer one).
GDC_TRIGGER_ENV = "DSV3_TRITON_GDC_TRIGGER"


def _trigger_choice() -> bool:
    value = os.environ.get(GDC_TRIGGER_ENV, "1") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{GDC_TRIGGER_ENV}={value!r}: expected '1' (signal after the wait) or '0'")
    return value == "1"


GDC_TRIGGER = tl.constexpr(_trigger_choice())


@triton.jit
def wait_for_producer():
    """Block until the grids this launch depends on have completed and their writes are visible (with
    GDC_TRIGGER, then let the grids that depend on this one launch)."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        if GDC_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()


# Names (as the CUDA driver reports them: the @triton.jit function's name) of the kernels checked to
# start with wait_for_producer(); with GDC on, the graph rewrite's allow-list.
CHECKED_KERNELS: set[str] = set()


# Kernels that never run inside a captured graph, with the reason (registered by @eager_only): they need no wait,
# and are never offered a programmatic edge (they are not in CHECKED_KERNELS).
EAGER_ONLY_KERNELS: dict[str, str] = {}


def eager_only(reason: str):
    """Register a kernel that cannot be traced into an engine's program (its launcher refuses tracing), so it never
    sits behind a programmatic graph edge: e.g. a Gluon kernel, which takes host-side TMA descriptors and has no
    wait_for_producer() (a Triton function) to call."""
    def register(kernel: Any) -> Any:
        name = getattr(kernel, "fn", kernel).__name__
        if name in CHECKED_KERNELS:
            raise TypeError(f"@eager_only: kernel {name} is also registered as waiting for its producer")
        EAGER_ONLY_KERNELS[name] = reason
        return kernel
    return register


def waiting_kernel_names() -> frozenset[str]:
    """The kernels compiled here that wait first, every kernel family imported (what an engine build
    records): CHECKED_KERNELS with GDC on, none without (the interpreter; a torch the analysis wrapper
    does not fit)."""
    import_kernel_families()
    return frozenset(CHECKED_KERNELS) if GDC else frozenset()


def import_kernel_families() -> list[ModuleType]:
    """Every module of dsv3_export.kernels, imported (each kernel registers itself when its module loads)."""
    import dsv3_export.kernels as package

    return [importlib.import_module(f"{package.__name__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)]


# What a kernel may call before wait_for_producer(): index arithmetic and L2 prefetches. A prefetch brings no value
# into a register and L2 is where every grid's writes land, so a line prefetched before the producer wrote it is
# updated there, never read stale; nothing here loads, stores or calls a helper that might.
PRE_WAIT_CALLS = INDEX_CALLS | {"prefetch_l2", "static_assert"}


def _is_wait(stmt: ast.stmt) -> bool:
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "wait_for_producer"


def waits_for_producer(kernel: Any) -> Any:
    """Register a @triton.jit kernel whose body calls `wait_for_producer()` before any memory access (checked here:
    only PRE_WAIT_CALLS before it, in statements of the body's top level)."""
    fn = getattr(kernel, "fn", kernel)
    name = fn.__name__
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    at = next((i for i, stmt in enumerate(body) if _is_wait(stmt)), None)
    if at is None:
        raise TypeError(f"@waits_for_producer: kernel {name} must call wait_for_producer() in its body's top level "
                        "before any memory access: a programmatic graph edge would let it read its producer's "
                        "outputs early")
    if any(isinstance(node, ast.Return) for stmt in body[:at] for node in ast.walk(stmt)):
        raise TypeError(f"@waits_for_producer: kernel {name} may return before wait_for_producer(): a launch whose "
                        "programs all return would complete before its producer, and a kernel after it, waiting only "
                        "for this one, could read the producer's outputs early")
    early = sorted(called_names(body[:at]) - PRE_WAIT_CALLS)
    if early:
        raise TypeError(f"@waits_for_producer: kernel {name} calls {early} before wait_for_producer(); only "
                        f"{sorted(PRE_WAIT_CALLS)} may come first (a load there could read a producer's output early)")
    CHECKED_KERNELS.add(name)
    return kernel
