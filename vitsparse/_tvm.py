"""The one place that knows where TVM 0.27 keeps things.

TVM's 0.2x series renamed tir -> tirx, moved meta_schedule and dlight under s_tir, and made
targets dicts. Every other vitsparse module imports TVM names from here, so the next rename is a
one-file change.
"""

from __future__ import annotations

import tvm
import tvm.relax.frontend.torch  # noqa: F401  (makes relax.frontend.torch importable)
import tvm_ffi
from tvm import relax, te, topi
from tvm import tirx as tir
from tvm.s_tir import dlight
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir import schedule as s_schedule

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
    "IRModule",
    "Schedule",
    "Target",
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
