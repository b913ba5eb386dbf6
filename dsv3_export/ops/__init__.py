"""The dsv3:: custom ops. Importing this package registers every op that exists.

One module per op family: mla (attention), moe (routing + grouped GEMM), fp8 (blockwise fp8
linear). A module that is missing is skipped (it is being written); one that exists but fails to
import is an error, never silently ignored.
"""

from __future__ import annotations

import importlib
import importlib.util

OP_MODULES = ("mla", "moe", "fp8")


def _register_all() -> tuple[str, ...]:
    loaded = []
    for name in OP_MODULES:
        qualified = f"{__name__}.{name}"
        if importlib.util.find_spec(qualified) is None:
            continue
        try:
            importlib.import_module(qualified)
        except Exception as e:  # noqa: BLE001 - re-raised with the module named
            raise ImportError(f"dsv3 op module {qualified} exists but failed to import: {e}") from e
        loaded.append(name)
    return tuple(loaded)


LOADED_OP_MODULES = _register_all()
