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
The kernels compiled for running read the switches as they are.
"""

from __future__ import annotations

import functools
from typing import Any

import triton.language as tl

_SWITCHES: list[tuple[dict[str, Any], str]] = []  # (a module's globals, the switch's name in them)


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
    def generate_ttir(*args, **kwargs):
        saved = [(ns, name, ns[name]) for ns, name in _SWITCHES if name in ns]
        for ns, name, _ in saved:
            ns[name] = tl.constexpr(False)
        try:
            return original(*args, **kwargs)
        finally:
            for ns, name, value in saved:
                ns[name] = value

    generate_ttir.hides_side_effect_asm = True
    triton_kernel_wrap.generate_ttir = generate_ttir
    return True
