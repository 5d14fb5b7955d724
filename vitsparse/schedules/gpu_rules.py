"""GPU schedule rules of vitsparse's own kernels (dlight's rules cover the rest).

dlight's Matmul puts a matmul on the tensor cores (wmma fragments) on CUDA sm_70 and later when
each of M, N and K exceeds 64: float16 inputs with float32 sums (fp16's layers), int8 inputs
with int32 sums (int8's, IMMA). Its int8 schedule annotates a software pipeline that TVM 0.27's
InjectSoftwarePipeline cannot lower (it fails looking up a wmma fragment's size), so `Matmul`
drops those annotations from int8 schedules: the fragments are then loaded without overlapping
the next K step, and the kernel compiles. Smaller matmuls get dlight's CUDA-core schedule.
"""

from __future__ import annotations

from vitsparse._tvm import Schedule, dlight
from vitsparse.schedules import bsr

_PIPELINE_ANNOTATIONS = ("software_pipeline_stage", "software_pipeline_order")


class BSRGpuRule(dlight.ScheduleRule):
    """The block-sparse linear kernel: thread block per (row tile, block-row), shared staging."""

    def apply(self, func, target, tunable):
        if not bsr.is_bsr_kernel(func):
            return None
        sch = Schedule(func)
        bsr.schedule_bsr_gpu(sch)
        return sch


class Matmul(dlight.gpu.Matmul):
    """dlight's Matmul, its int8 tensor-core schedules without the software pipeline (see the
    module docstring)."""

    def apply(self, func, target, tunable):
        sch = super().apply(func, target, tunable)
        if isinstance(sch, Schedule) and any(str(p.dtype) == "int8" for p in func.params):
            _drop_software_pipeline(sch)
        return sch


def _drop_software_pipeline(sch: Schedule) -> None:
    seen = set()
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    while blocks:
        block = blocks.pop()
        blocks.extend(sch.get_child_blocks(block))
        for loop in sch.get_loops(block):
            stmt = sch.get(loop)
            if stmt in seen:
                continue
            seen.add(stmt)
            for key in _PIPELINE_ANNOTATIONS:
                if key in stmt.annotations:
                    sch.unannotate(loop, key)


def default_rules() -> list[dlight.ScheduleRule]:
    """vitsparse's GPU rules, then dlight's, in priority order."""
    return [
        BSRGpuRule(),
        Matmul(),
        dlight.gpu.GEMV(),
        dlight.gpu.Reduction(),
        dlight.gpu.GeneralReduction(),
        dlight.gpu.Fallback(),
    ]
