"""Inductor's choices with wider persistent reductions: the hidden-size RMSNorms of CUDA packages in registers.

Inductor emits a row reduction either persistent (`triton_per_*`: the row stays in registers, its inputs
are read once) or looped (`triton_red_*`: one loop sums the squares, a second reads the inputs again to
normalize). torch/_inductor/choices.py `InductorChoices.should_use_persistent_reduction` takes the persistent
form for inner reductions of at most 1024 elements only, so the 16b model's 2048-wide RMSNorms (fused with
the residual add, and after the MoE with the combine's adds) are looped: 2.87 and 1.74 us per call in the
H200 batch-1 decode profile, ~110 us per step over 49 calls, against 1.1 us for the persistent 512-wide
kv_norm. PersistentNorms makes inner reductions of up to `inner_max` elements persistent as well; engines/torch.py
installs it with 4096 while a CUDA package compiles (DSV3_TORCH_PERSISTENT_NORMS=1, the default; 0: Inductor's own
heuristic). On the H200 (session 20, benchmarks/RESULTS.md) the two hidden-size norm kernels of the 16b batch-1 step
became persistent: 53.5 and 37 us per step against 69 and 44.

Installed for one compile with V.set_choices_handler (thread-local, the previous handler restored after), not
through config.inductor_choices_class: Inductor builds that class once per thread, the first time it asks for
V.choices, so a later config patch would not reach a thread that has compiled before. AOTInductor does not use
the FX graph cache (compile_fx: `not aot_mode`), so a package cannot be served kernels chosen without it.
The CPU C++ backend never asks this question.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V


class PersistentNorms(InductorChoices):
    """Inductor's choices, with inner reductions of up to `inner_max` elements persistent.

    `promoted`: the kernels it made persistent that Inductor would have looped, by their nodes' names
    (Inductor may ask more than once for one kernel), for the build to report."""

    def __init__(self, inner_max: int) -> None:
        super().__init__()
        self.inner_max = inner_max
        self.promoted: set[Any] = set()

    def uuid(self) -> str:
        """A cache key, should this class ever be set as config.inductor_choices_class."""
        return f"dsv3_export.PersistentNorms/inner<={self.inner_max}"

    # An instance method (a staticmethod in torch) so it can count; Inductor calls it on V.choices with the
    # same arguments, `cooperative_reduction` by keyword in places (codegen/simd.py).
    def should_use_persistent_reduction(self, features: Any, cooperative_reduction: bool) -> bool:  # type: ignore[override]
        inductors = super().should_use_persistent_reduction(features, cooperative_reduction)
        if inductors or not self._widened(features, cooperative_reduction):
            return inductors
        self.promoted.add(_kernel_key(features))
        return True

    def _widened(self, features: Any, cooperative_reduction: bool) -> bool:
        """Our rule: a non-cooperative inner reduction over at most inner_max elements, where persistent
        reductions are on at all."""
        return bool(torch._inductor.config.triton.persistent_reductions
                    and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, self.inner_max))


def _kernel_key(features: Any) -> Any:
    """One kernel's identity: its scheduler nodes' names (SIMDKernelFeatures), else the object itself."""
    nodes = getattr(features, "scheduler_nodes", None)
    return tuple(n.get_name() for n in nodes()) if callable(nodes) else features


@contextlib.contextmanager
def persistent_norms(inner_max: int) -> Iterator[PersistentNorms]:
    """PersistentNorms as Inductor's choices handler for the duration (this thread), the previous one after."""
    install = getattr(V, "set_choices_handler", None)
    if install is None or not callable(getattr(InductorChoices, "should_use_persistent_reduction", None)):
        raise RuntimeError(f"persistent norms: torch {torch.__version__} has no V.set_choices_handler or no "
                           "InductorChoices.should_use_persistent_reduction; build with DSV3_TORCH_PERSISTENT_NORMS=0")
    choices = PersistentNorms(inner_max)
    with install(choices):
        yield choices
