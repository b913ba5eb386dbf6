"""What a kernel's source calls before its PDL wait: shared by the check of our kernels (kernels/pdl.py
waits_for_producer) and of Inductor's (engines/torch_inductor_pdl.py). No triton import: the engines' check runs
where the CPU tests configure Triton before any kernel module loads."""

from __future__ import annotations

import ast
from typing import Iterable

# Index arithmetic: offsets, ranges, bounds and casts, which read and write no memory.
INDEX_CALLS = frozenset({"program_id", "num_programs", "arange", "minimum", "maximum", "to", "cdiv"})


def called_names(stmts: Iterable[ast.stmt]) -> set[str]:
    """The names of the functions and methods the statements call (nested blocks included; `?` for a call of an
    expression that is neither)."""
    names = set()
    for node in (n for stmt in stmts for n in ast.walk(stmt) if isinstance(n, ast.Call)):
        func = node.func
        names.add(func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else "?")
    return names
