"""The dense linear-layer kernel: Y = epilogue(X @ W^T + b) with W packed at compile time.

The weight is a constant, so it is repacked once, at compile time, into panels of ``PANEL``
output columns: ``Wp[n // PANEL, k, n % PANEL] = W[n, k]``. One k step of a register tile then
reads whole cache lines of W, and the inner loop is one broadcast of X and a few vector FMAs.

Rows are padded to a multiple of the register-tile height by clamping the row index of X (the
padded rows recompute the last row and are never written back), so the hot loop carries no
predicate. The schedule template exposes its knobs (row tile, column tile, k unroll) as
MetaSchedule sampling instructions: the same template gives the hand-written default (fixed
decisions) and the tuning design space (sampled decisions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vitsparse._tvm import Schedule, te, tir, topi

PANEL = 16
KERNEL_ATTR = "vitsparse.kernel"
DENSE_KERNEL = "dense"
EPILOGUES = ("none", "gelu")


@dataclass(frozen=True)
class DenseShape:
    """The workload of one dense kernel: rows M (tokens x batch), K inputs, N outputs."""

    m: int
    k: int
    n: int
    epilogue: str = "none"
    row_tile: int = 6

    def __post_init__(self):
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue {self.epilogue!r} is not one of {EPILOGUES}")
        if self.n % PANEL:
            raise ValueError(f"N={self.n} is not a multiple of the packing panel {PANEL}")

    @property
    def padded_m(self) -> int:
        return math.ceil(self.m / self.row_tile) * self.row_tile


@dataclass(frozen=True)
class DenseKnobs:
    """Register tile and unroll of the CPU template; every field is a MetaSchedule decision."""

    col_vectors: int  # vectors of PANEL lanes per register tile (tile width = col_vectors*PANEL)
    k_unroll: int


def choose_row_tile(m: int) -> int:
    """Register-tile height that pads M the least (ties go to the taller tile)."""
    return min(range(8, 3, -1), key=lambda r: (math.ceil(m / r) * r - m, -r))


def pack_weight(weight: np.ndarray) -> np.ndarray:
    """(N, K) torch-layout weight -> (N / PANEL, K, PANEL) panels."""
    n, k = weight.shape
    return np.ascontiguousarray(weight.reshape(n // PANEL, PANEL, k).transpose(0, 2, 1))


def dense_primfunc(shape: DenseShape) -> tir.PrimFunc:
    """Unscheduled PrimFunc (X, Wp, B) -> Y for one dense workload."""
    m, k_dim, n = shape.m, shape.k, shape.n
    x = te.placeholder((m, k_dim), name="X")
    w = te.placeholder((n // PANEL, k_dim, PANEL), name="W")
    b = te.placeholder((n,), name="B")
    k = te.reduce_axis((0, k_dim), "k")
    acc = te.compute(
        (shape.padded_m, n),
        lambda i, j: te.sum(x[te.min(i, m - 1), k] * w[j // PANEL, k, j % PANEL], axis=k),
        name="dense",
    )
    if shape.epilogue == "gelu":
        # Exact-erf GELU with TVM's fast erf (vectorisable; libm's erf is a scalar call).
        pre = te.compute((m, n), lambda i, j: acc[i, j] + b[j], name="bias")
        erf = topi.fast_erf(te.compute((m, n), lambda i, j: pre[i, j] * 0.7071067811865476))
        y = te.compute((m, n), lambda i, j: pre[i, j] * (0.5 + 0.5 * erf[i, j]), name="epilogue")
    else:
        y = te.compute((m, n), lambda i, j: acc[i, j] + b[j], name="epilogue")
    func = te.create_prim_func([x, w, b, y]).without_attr("global_symbol")
    return func.with_attrs(
        {
            KERNEL_ATTR: DENSE_KERNEL,
            "vitsparse.row_tile": shape.row_tile,
            "vitsparse.epilogue": shape.epilogue,
        }
    )


def shape_of(func: tir.PrimFunc) -> DenseShape:
    """The DenseShape a dense kernel PrimFunc was made from."""
    x_buf = func.params[0]
    y_buf = func.params[3]
    return DenseShape(
        m=int(x_buf.shape[0]),
        k=int(x_buf.shape[1]),
        n=int(y_buf.shape[1]),
        epilogue=str(func.attrs["vitsparse.epilogue"]),
        row_tile=int(func.attrs["vitsparse.row_tile"]),
    )


def default_knobs(shape: DenseShape) -> DenseKnobs:
    """Hand-picked tile: ~12-16 vector accumulators, as wide as N allows."""
    vectors = shape.n // PANEL
    col = 2 if shape.row_tile >= 6 else 4
    while vectors % col:
        col -= 1
    return DenseKnobs(col_vectors=col, k_unroll=4 if shape.k % 4 == 0 else 1)


def schedule_dense_cpu(sch: Schedule, knobs: DenseKnobs | None = None) -> None:
    """Apply the CPU template to the dense kernel in ``sch``.

    With ``knobs`` the decisions are fixed (the hand-written default); without, they are sampled,
    which makes ``sch`` a MetaSchedule design space.
    """
    func = sch.mod["main"]
    row_tile = int(func.attrs["vitsparse.row_tile"])
    n_vec = int(func.params[3].shape[1]) // PANEL
    k_dim = int(func.params[0].shape[1])
    acc = tile_output(sch, row_tile, PANEL, n_vec, None if knobs is None else knobs.col_vectors)
    a_i, a_j, a_k = sch.get_loops(acc)[-3:]
    a_jv, a_lane = sch.split(a_j, [None, PANEL])
    k_dec = None if knobs is None else [k_dim // knobs.k_unroll, knobs.k_unroll]
    k_o, k_i = sch.split(
        a_k, sch.sample_perfect_tile(a_k, n=2, max_innermost_factor=8, decision=k_dec)
    )
    sch.reorder(k_o, k_i, a_i, a_jv, a_lane)
    sch.vectorize(a_lane)
    sch.unroll(a_jv)
    sch.unroll(a_i)
    sch.unroll(k_i)
    sch.decompose_reduction(acc, k_o)


def tile_output(sch: Schedule, row_tile: int, lanes: int, n_vec: int, col_vectors: int | None):
    """The part of the dense template a packed linear kernel shares (fp32 and int8): everything
    but the ``epilogue`` and ``dense`` blocks inlined, the output in parallel tiles of
    ``row_tile x col_vectors * lanes`` (``col_vectors`` None: sampled), the accumulation computed
    at each tile. Returns the accumulation block, its (i, j, k) loops left to the caller."""
    out = sch.get_sblock("epilogue")
    acc = sch.get_sblock("dense")
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if not (sch.get(block).same_as(sch.get(out)) or sch.get(block).same_as(sch.get(acc))):
            sch.compute_inline(block)
    i, j = sch.get_loops(out)
    i_o, i_i = sch.split(i, [None, row_tile])
    j_panel, j_lane = sch.split(j, [None, lanes])
    col_dec = None if col_vectors is None else [n_vec // col_vectors, col_vectors]
    j_o, j_v = sch.split(
        j_panel, sch.sample_perfect_tile(j_panel, n=2, max_innermost_factor=8, decision=col_dec)
    )
    sch.reorder(i_o, j_o, i_i, j_v, j_lane)
    tile = sch.fuse(i_o, j_o)
    sch.parallel(tile)
    sch.vectorize(j_lane)
    sch.compute_at(acc, tile)
    return acc


def is_dense_kernel(func) -> bool:
    return func.attrs is not None and func.attrs.get(KERNEL_ATTR) == DENSE_KERNEL
