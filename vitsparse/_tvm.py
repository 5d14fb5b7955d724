"""The one place that knows where TVM 0.27 keeps things.

TVM's 0.2x series renamed tir -> tirx, moved meta_schedule and dlight under s_tir, and made
targets dicts. Every other vitsparse module imports TVM names from here, so the next rename is a
one-file change.
"""

from __future__ import annotations

import os

import tvm
import tvm.relax.frontend.torch  # noqa: F401  (makes relax.frontend.torch importable)
import tvm_ffi
from tvm import relax, te, topi
from tvm import tirx as tir
from tvm.s_tir import TensorIntrin, dlight
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir import schedule as s_schedule
from tvm.script import tirx as T

from vitsparse import _tvm_intrin, errors

_tvm_intrin.install()  # before MetaSchedule imports the whole package (see its docstring)

# TVM's runtime sizes its CPU thread pool once, the first time it runs parallel code, from
# TVM_NUM_THREADS (or OMP_NUM_THREADS), else from half the machine's logical CPUs on x86 (one
# thread on a 2-vCPU machine). The pool can shrink later but never grow, so vitsparse's default,
# every core this process may use, is set here, before anything can run, and only where the user
# chose no count. Child processes (MetaSchedule workers, RPC servers) inherit it.
THREAD_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


# TVM's pool also pins its threads, the calling one included, to single cores, after which this
# thread's affinity says 1; so the process's cores are read once, here.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def available_cores() -> int:
    """The CPUs this process may run on (its affinity when vitsparse was imported)."""
    return max(1, _CORES or 1)


if not any(os.environ.get(name, "").strip() for name in THREAD_VARIABLES):
    os.environ["TVM_NUM_THREADS"] = str(available_cores())

# How the pool's threads behave, where the user set nothing (docs/results/contention_x86.md):
# TVM pins each worker to one core; on a machine where other processes also run, a pinned
# thread cannot move off a busy core, and every parallel loop waits for its slowest thread.
# (What the pool does when every core is busy is `jobs.artifact_run.PoolGovernor`'s job.)
POOL_SETTINGS = {"TVM_BIND_THREADS": "0"}
for _name, _value in POOL_SETTINGS.items():
    os.environ.setdefault(_name, _value)

# A vitsparse error raised inside a pass crosses TVM's FFI on its way out; registered, it comes
# back as itself (PlanError, not a RuntimeError), so the CLI still names the problem, exit 2.
for _error in (
    errors.VitsparseError,
    errors.ModelError,
    errors.NotAViTError,
    errors.UnsupportedOpError,
    errors.TargetError,
    errors.DatabaseError,
    errors.ArtifactError,
    errors.PlanError,
    errors.DataError,
    errors.TrainingError,
):
    tvm_ffi.register_error(_error)

Schedule = s_schedule.Schedule
Target = tvm.target.Target
IRModule = tvm.IRModule


def from_exported_program(exported_program, **kwargs):
    """Relax import of a torch.export ExportedProgram."""
    return relax.frontend.torch.from_exported_program(exported_program, **kwargs)


def from_onnx(model, **kwargs):
    """Relax import of an onnx.ModelProto."""
    from tvm.relax.frontend import onnx as onnx_frontend

    return onnx_frontend.from_onnx(model, **kwargs)


def structural_hash(node) -> int:
    """Structural hash of an IR node (moved to tvm_ffi in 0.27)."""
    return int(tvm_ffi.structural_hash(node))


def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (``-mcpu=native`` is rejected by 0.27)."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def struct_shape(expr) -> tuple[int, ...]:
    """Static shape of a Relax tensor expression (raises if it is symbolic)."""
    return tuple(int(v) for v in expr.ty.shape.values)


def struct_dtype(expr) -> str:
    """Element type of a Relax tensor expression."""
    return str(expr.ty.dtype)


__all__ = [
    "POOL_SETTINGS",
    "THREAD_VARIABLES",
    "IRModule",
    "Schedule",
    "T",
    "Target",
    "TensorIntrin",
    "available_cores",
    "dlight",
    "from_exported_program",
    "from_onnx",
    "host_cpu_name",
    "ms",
    "relax",
    "struct_dtype",
    "struct_shape",
    "structural_hash",
    "te",
    "tir",
    "topi",
    "tvm",
]
