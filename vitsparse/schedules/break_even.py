"""Break-even density of the BSR kernel against the dense kernel, measured on this machine.

For one linear-layer shape and block size, times the dense kernel and the BSR kernel at a few
densities (random masks) and interpolates the density where they cost the same. BlockSparsify
keeps a layer dense above it. Results are cached per process.
"""

from __future__ import annotations

import functools

import numpy as np

from vitsparse._tvm import Schedule, Target, tvm
from vitsparse.schedules import bsr, dense

DENSITIES = (0.95, 0.85, 0.7, 0.5)


def _time(lib, args) -> float:
    lib["main"](*args)
    timer = lib.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=5)
    return float(np.median(list(timer(*args).results)))


@functools.lru_cache(maxsize=256)
def _measure(target_json: str, m: int, k: int, n: int, block: tuple[int, int]) -> float:
    target = Target(target_json)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = np.zeros(n, dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    shape = dense.DenseShape(m, k, n, "none", dense.choose_row_tile(m))
    sch = Schedule(dense.dense_primfunc(shape).with_attr("global_symbol", "main"))
    dense.schedule_dense_cpu(sch, dense.default_knobs(shape))
    dense_lib = tvm.compile(sch.mod, target=target)
    dense_args = [tvm.runtime.tensor(a) for a in (x, dense.pack_weight(w), b)] + [y]
    points = []  # (density, bsr_ms / dense_ms), measured side by side
    for density in DENSITIES:
        rows, cols = block
        kept = rng.random((n // rows, k // cols)) < density
        packed = bsr.to_bsr(w, kept, block)
        shape = bsr.BSRShape.of(m, packed, target=target)
        lib = tvm.compile(bsr.scheduled_cpu(shape, target), target=target)
        args = [
            tvm.runtime.tensor(a) for a in (x, packed.data, packed.indices, packed.indptr, b)
        ] + [y]
        points.append((packed.density, _time(lib, args) / _time(dense_lib, dense_args)))
    points.sort(reverse=True)
    if points[0][1] <= 1.0:
        return points[0][0]
    for (d_hi, r_hi), (d_lo, r_lo) in zip(points, points[1:], strict=False):
        if r_lo <= 1.0 < r_hi:
            return d_lo + (d_hi - d_lo) * (1.0 - r_lo) / (r_hi - r_lo)
    return 0.0  # BSR never beat dense in the measured range


def measured_break_even(target: Target, m: int, k: int, n: int, block: tuple[int, int]) -> float:
    """Density at or below which BSR is at least as fast as dense for this layer (0..1)."""
    return _measure(str(target), m, k, n, tuple(block))
