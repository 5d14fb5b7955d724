"""TVM's tensor intrinsics package, imported as a shell: the registry of `tvm.s_tir.tensor_intrin`
without the 35-45 s its ``__init__`` takes.

MetaSchedule imports ``tvm.s_tir.tensor_intrin`` in every TuneContext and in every builder
worker, and the package's ``__init__`` parses, in TVMScript, every CUDA, ARM, x86, ROCm, Hexagon
and RISC-V tensor intrinsic TVM ships (measured: ~40 s on this 2-vCPU machine, in each process).
vitsparse's schedules tensorize with their own intrinsics (`schedules.paired`); only
MetaSchedule's default rules, for the kernels vitsparse has no template for, name TVM's (on an
x86 CPU with VNNI, ``dot_16x4_vnni``). `install` puts an empty package of the same name and
search path in ``sys.modules``, so those imports cost nothing, while an explicit import of a
submodule still loads it from TVM's files: `load` imports the ones a target kind's default
rules need before a search (x86 and arm_cpu for CPUs: 3 s; cuda for GPUs: the 35 s, as before),
and dlight's tensor-core rules import cuda themselves. A builder worker builds modules already
scheduled, so it needs none. Standard library only: it runs first in MetaSchedule's builder
workers (`devices.metaschedule.builder_for`), before anything else is imported.
"""

from __future__ import annotations

import importlib.util
import sys
import types

PACKAGE = "tvm.s_tir.tensor_intrin"
# What the real package's __init__ imports, per target kind whose default rules may need it.
_FOR_KIND = {"llvm": ("x86", "arm_cpu")}
_EVERY = ("cuda", "arm_cpu", "x86", "rocm", "hexagon", "riscv_cpu")


def install() -> None:
    """Register the shell package unless the real one is imported already."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec("tvm.s_tir")  # imports tvm.s_tir, not its tensor_intrin
    if spec is None or spec.submodule_search_locations is None:
        return
    found = importlib.util.find_spec(PACKAGE)
    if found is None or found.submodule_search_locations is None:
        return
    shell = types.ModuleType(PACKAGE, "tvm.s_tir.tensor_intrin, its submodules loaded on demand")
    shell.__path__ = list(found.submodule_search_locations)
    shell.__package__ = PACKAGE
    shell.__spec__ = found
    sys.modules[PACKAGE] = shell
    sys.modules["tvm.s_tir"].tensor_intrin = shell


def load(kind: str) -> None:
    """Import the intrinsics MetaSchedule's default schedule rules for targets of ``kind``
    (``"llvm"``, ``"cuda"``, ...) may tensorize with (every one TVM ships for a kind other
    than llvm)."""
    for name in _FOR_KIND.get(kind, _EVERY):
        importlib.import_module(f"{PACKAGE}.{name}")
