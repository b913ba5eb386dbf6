"""torch's mutation analysis of our Triton kernels, shown each kernel without its side-effecting inline assembly.

torch.export and AOTInductor find the tensors a user Triton kernel writes by reading its TTIR
(torch/_higher_order_ops/triton_kernel_wrap.py, generate_ttir). An inline-assembly op with side effects makes that
analysis give up and assume every input is written, and then:
- AOTInductor copies the weights and caches around the kernel (session 10: the first 16b package built with PDL's
  wait died with an illegal memory access on the H200);
- or its post-grad pass fails outright. Session 22: merge_uv's L2 prefetch (DSV3_TORCH_MERGE_UV_PREFETCH=1) stopped
  both 27-layer H200 builds with `InductorError: AssertionError` in decompose_triton_kernel_wrapper_functional.

Our inline assembly never writes memory (griddepcontrol.wait, prefetch.global.L2). So the analysis may read the
kernel compiled without it:
- each such asm sits behind a module-global `tl.constexpr` switch registered here (hidden_from_mutation_analysis);
- the wrapped TTIR generator turns every registered switch off while it runs, and restores it after.
The kernels compiled for running read the switches as they are. Two things keep the window closed to them:
- Triton memoizes a JIT function's cache key, and with it the globals it read (checked at each eager launch: "Global
  variable ... has changed since we compiled this kernel"). TTIR generation hashes every callee, so a callee first
  hashed inside the window would keep the switch at False for good (a session 22 review reproduced it on the real
  lowering). The wrapper computes the analysed kernel's key, its callees' with it, before it turns the switches off.
- Calls from several threads share one window (a lock and a depth count): the switches go off at the first entry
  and come back at the last exit. Other threads must not compile our kernels while a program is being traced.
Inductor copies a kernel's source and its constexpr globals when it generates code, outside the window, so the
AOTInductor packages get the switches' real values.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import triton
import triton.language as tl

_SWITCHES: list[tuple[dict[str, Any], str]] = []  # (a module's globals, the switch's name in them)
_WINDOW = threading.RLock()
_window = {"depth": 0, "saved": []}  # open analyses, the switches' values before the first


def hidden_from_mutation_analysis(namespace: dict[str, Any], name: str) -> bool:
    """Register namespace[name], a boolean tl.constexpr global (assigned by the caller after this returns), to read
    False while torch's analysis generates a kernel's TTIR. Returns False, registering nothing, where torch has no
    generator to wrap; the caller then keeps its assembly off."""
    if not _install():
        return False
    if not any(ns is namespace and n == name for ns, n in _SWITCHES):
        _SWITCHES.append((namespace, name))
    return True


def hidden_switches() -> list[str]:
    """The registered switches as module.NAME: what the analysis compiles off."""
    return [f"{ns.get('__name__', '?')}.{name}" for ns, name in _SWITCHES]


def _install() -> bool:
    """Wrap torch's TTIR generator for its kernel mutation analysis (once)."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap
    except ImportError:
        return False
    original = getattr(triton_kernel_wrap, "generate_ttir", None)
    if original is None:
        return False
    if getattr(original, "hides_side_effect_asm", False):
        return True

    @functools.wraps(original)
    def generate_ttir(kernel, *args, **kwargs):
        with _WINDOW:
            if _window["depth"] == 0:  # (a nested call's kernel would be hashed inside the window: none nests)
                _hash_first(kernel)
                _window["saved"] = [(ns, name, ns[name]) for ns, name in _SWITCHES if name in ns]
                for ns, name, _ in _window["saved"]:
                    ns[name] = tl.constexpr(False)
            _window["depth"] += 1
            try:
                return original(kernel, *args, **kwargs)
            finally:
                _window["depth"] -= 1
                if _window["depth"] == 0:
                    for ns, name, value in _window["saved"]:
                        ns[name] = value

    generate_ttir.hides_side_effect_asm = True
    generate_ttir.__wrapped__ = original
    triton_kernel_wrap.generate_ttir = generate_ttir
    return True


def _hash_first(kernel: Any) -> None:
    """The kernel's Triton cache key (through an Autotuner's or Heuristics' .fn), computed with the switches as they
    are: it memoizes its callees' keys and the globals they read (the module docstring)."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel.cache_key  # noqa: B018 - computed for its memoization
