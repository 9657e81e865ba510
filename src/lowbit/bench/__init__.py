"""lowbit.bench: benchmark suites, one module per suite, run by ``lowbit bench <suite>``.

A suite module (``lowbit/bench/<suite>.py``) exposes ``add_arguments(parser)`` (its command-line options) and
``run(args) -> dict`` (the measurements, baseline from the same run included). Register it in ``SUITES``
(name -> module path); modules are imported only when their suite runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["SUITES", "get_suite"]

#: Suite name -> module path. Imported lazily by `get_suite`.
SUITES: dict[str, str] = {
    "int4-linear": "lowbit.bench.int4_linear",
    "int4-train": "lowbit.bench.int4_train",
    "onebit": "lowbit.bench.onebit",
    "optim": "lowbit.bench.optim",
}


def get_suite(name: str) -> ModuleType:
    """Import and return the module of suite ``name``; ``ValueError`` listing the registered suites when
    ``name`` is unknown, ``ImportError`` when the module is missing or lacks ``add_arguments``/``run``."""
    if name not in SUITES:
        known = ", ".join(sorted(SUITES)) or "none registered yet"
        raise ValueError(f"unknown benchmark suite {name!r} (available: {known})")
    module = importlib.import_module(SUITES[name])
    for attr in ("add_arguments", "run"):
        if not callable(getattr(module, attr, None)):
            raise ImportError(f"benchmark suite module {SUITES[name]!r} has no {attr}() function")
    return module
