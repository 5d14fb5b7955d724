"""GPU schedule rules of vitsparse's own kernels (dlight's rules cover the rest)."""

from __future__ import annotations

from vitsparse._tvm import Schedule, dlight
from vitsparse.schedules import bsr


class BSRGpuRule(dlight.ScheduleRule):
    """The block-sparse linear kernel: thread block per (row tile, block-row), shared staging."""

    def apply(self, func, target, tunable):
        if not bsr.is_bsr_kernel(func):
            return None
        sch = Schedule(func)
        bsr.schedule_bsr_gpu(sch)
        return sch


def default_rules() -> list[dlight.ScheduleRule]:
    """vitsparse's GPU rules, then dlight's, in priority order."""
    return [
        BSRGpuRule(),
        dlight.gpu.Matmul(),
        dlight.gpu.GEMV(),
        dlight.gpu.Reduction(),
        dlight.gpu.GeneralReduction(),
        dlight.gpu.Fallback(),
    ]
