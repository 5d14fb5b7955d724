"""A package's API loaded on first use (PEP 562): importing one light module of a package (the
cost-table format, model loading) then does not import TVM, which takes seconds."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_api(
    package: str, names: Mapping[str, str], eager: tuple[str, ...] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` for ``package``: ``names[name]`` is the module
    ``name`` comes from, imported on first access; ``eager`` lists the names the package binds
    itself."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    def __dir__() -> list[str]:
        return sorted({*names, *eager})

    return __getattr__, __dir__
