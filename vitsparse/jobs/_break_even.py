"""Break-even density of the BSR kernel against the dense kernel, measured on the target.

For one linear-layer shape and block size, times the dense kernel and the BSR kernel at a few
densities (random masks) side by side and interpolates the density where they cost the same.
BlockSparsify keeps a layer dense above it. Measured only where the target runs on this machine
(a CPU target); elsewhere every masked layer gets the BSR kernel. Results are cached per process.
An int8, bf16 or fp16 compile measures its own kernels (`schedules.paired`: its dense against
its BSR) down to lower densities (the paired BSR kernels gain less from skipping blocks than
the fp32 one).
"""

from __future__ import annotations

import functools

from vitsparse.devices import Timing, measure
from vitsparse.passes.block_sparsify import BreakEven
from vitsparse.passes.pipeline import compile_module
from vitsparse.schedules.cases import (
    bsr_case,
    check_kernel,
    dense_case,
    paired_bsr_case,
    paired_dense_case,
)
from vitsparse.schedules.paired import bsr_lanes
from vitsparse.targets import TargetSpec, paired_kernels, paired_lanes

DENSITIES = (0.95, 0.85, 0.7, 0.5)
PAIRED_DENSITIES = (0.7, 0.5, 0.35, 0.2, 0.1)
TIMING = Timing(repeat=5, number=10, warmup=0)


def break_even_for(spec: TargetSpec, precision: str = "fp32") -> BreakEven | None:
    """The measured break-even of ``spec`` in ``precision``, or None where it cannot be
    measured here."""
    if spec.runs_locally and spec.schedule_family == "cpu":
        return functools.partial(measured_break_even, spec, precision=precision)
    return None


def measured_break_even(
    spec: TargetSpec, m: int, k: int, n: int, block: tuple[int, int], *, precision: str = "fp32"
) -> float:
    """Density at or below which BSR is at least as fast as dense for this layer (0..1)."""
    return _measure(spec, m, k, n, tuple(block), precision)


@functools.lru_cache(maxsize=256)
def _measure(
    spec: TargetSpec, m: int, k: int, n: int, block: tuple[int, int], precision: str
) -> float:
    lanes = paired_lanes(spec, precision)
    kernels = paired_kernels(spec, precision)
    if lanes and not bsr_lanes(kernels, lanes, block, k):
        return 0.0  # no paired BSR kernel for this block: the layer stays dense
    if lanes:
        dense = paired_dense_case(m, k, n, lanes, kernels)
    else:
        dense = dense_case(m, k, n, spec.target)
    dense_lib = compile_module(dense.mod, spec.target)
    points = []  # (density, bsr_ms / dense_ms), measured side by side
    for density in PAIRED_DENSITIES if lanes else DENSITIES:
        if lanes:
            case = paired_bsr_case(m, k, n, block, density, lanes, kernels)
        else:
            case = bsr_case(m, k, n, block, density, spec.target)
        what = f"{m}x{k}x{n} block {block[0]}x{block[1]} density {case.density:.2f}"
        bsr_ms = _median_ms(compile_module(case.mod, spec.target), case, spec, f"bsr {what}")
        dense_ms = _median_ms(dense_lib, dense, spec, f"dense {m}x{k}x{n}")
        points.append((case.density, bsr_ms / dense_ms))
    points.sort(reverse=True)
    if points[0][1] <= 1.0:
        return points[0][0]
    for (d_hi, r_hi), (d_lo, r_lo) in zip(points, points[1:], strict=False):
        if r_lo <= 1.0 < r_hi:
            return d_lo + (d_hi - d_lo) * (1.0 - r_lo) / (r_hi - r_lo)
    return 0.0  # BSR never beat dense in the measured range


def _median_ms(lib, case, spec: TargetSpec, what: str) -> float:
    measured = measure(lib, spec, case.args, vm=False, timing=TIMING)
    check_kernel(case, measured.output, what)
    return measured.latency.median_ms
