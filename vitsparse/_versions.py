"""vitsparse's version and the versions of what it runs with, collected in one place: bench
reports record the installed distributions, artifact manifests the imported modules' own
``__version__`` (which keeps a build's local tag, e.g. ``2.14.1+cu130``)."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
from collections.abc import Callable, Sequence

VERSION = "0.1.0"

# Distribution names as pip knows them (apache-tvm's module is tvm).
DEFAULT_DISTRIBUTIONS = ("apache-tvm", "torch", "timm", "onnx", "onnxruntime", "numpy")


def version_of(distribution: str) -> str:
    """The installed version of ``distribution``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def module_version(module: str) -> str:
    """``module.__version__`` of an importable module, or ``"not installed"``."""
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return "not installed"


def collect_versions(distributions: Sequence[str] = DEFAULT_DISTRIBUTIONS) -> dict[str, str]:
    """``{"vitsparse": ..., <each distribution>: ..., "python": ...}`` from the installed
    distributions; ``apache-tvm`` is recorded as ``tvm``."""
    return _collect(distributions, version_of, {"apache-tvm": "tvm"})


def collect_module_versions(modules: Sequence[str]) -> dict[str, str]:
    """The same, from the modules' own ``__version__``."""
    return _collect(modules, module_version, {})


def _collect(names: Sequence[str], read: Callable[[str], str], rename: dict) -> dict[str, str]:
    out = {"vitsparse": VERSION}
    for name in names:
        out[rename.get(name, name)] = read(name)
    out["python"] = platform.python_version()
    return out
