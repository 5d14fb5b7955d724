"""Block-sparse (BSR) linear kernel for CPUs: Y = X @ W^T + b with W in block sparse row form.

W (N x K) is cut into ``rows x cols`` blocks; block-row ``r`` (output features r*rows ..) keeps the
blocks ``indices[indptr[r]:indptr[r+1]]`` (their column-block numbers). Each kept block is stored
transposed, ``data[b, j, i] = W[r*rows + i, c*cols + j]``, so that the output features of a block
are contiguous and the inner loop is the dense kernel's: one broadcast of X and ``rows / 16``
vector FMAs per input column.

The kernel is written already scheduled (TVMScript): one parallel task per (row tile, block-row),
a register tile of ``row_tile x rows`` accumulators, rows padded by clamping the row index of X,
a loop over the block-row's kept blocks whose bounds come from ``indptr`` (data-dependent, which
MetaSchedule's search rejects; a fixed-count block-ELL variant is what a tunable version needs).

Status: the x86 kernel and its packing; the Relax pass that uses it (BlockSparsify), tuning, and
the ARM/CUDA schedules are still to come (issue 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tvm.script import tirx as T

from vitsparse._tvm import tir

KERNEL_ATTR = "vitsparse.kernel"
BSR_KERNEL = "bsr"
_LANES = 16
BLOCK_SIZES = (8, 16, 32, 64)


@dataclass(frozen=True)
class BSRWeight:
    """A weight in block sparse row form (see the module docstring for the layout)."""

    shape: tuple[int, int]  # (N, K) of the dense weight
    block: tuple[int, int]  # (rows, cols)
    data: np.ndarray  # (max(nnz_blocks, 1), cols, rows) float32, blocks transposed
    indices: np.ndarray  # (max(nnz_blocks, 1),) int32 column-block numbers
    indptr: np.ndarray  # (N / rows + 1,) int32

    @property
    def nnz_blocks(self) -> int:
        # data/indices hold one unused entry when nothing is kept: buffers cannot be empty.
        return int(self.indptr[-1])

    @property
    def density(self) -> float:
        n, k = self.shape
        rows, cols = self.block
        return self.nnz_blocks / ((n // rows) * (k // cols))

    def to_dense(self) -> np.ndarray:
        n, k = self.shape
        rows, cols = self.block
        out = np.zeros((n, k), dtype=np.float32)
        for r in range(n // rows):
            for b in range(self.indptr[r], self.indptr[r + 1]):
                c = int(self.indices[b])
                out[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = self.data[b].T
        return out


def to_bsr(weight: np.ndarray, kept: np.ndarray, block: tuple[int, int]) -> BSRWeight:
    """Pack the kept blocks of ``weight`` (N, K); ``kept`` is the (N/rows, K/cols) block bitmap."""
    n, k = weight.shape
    rows, cols = block
    if rows not in BLOCK_SIZES or cols not in BLOCK_SIZES:
        raise ValueError(f"block {rows}x{cols}: each side must be one of {BLOCK_SIZES}")
    if n % rows or k % cols:
        raise ValueError(f"block {rows}x{cols} does not divide the weight shape {n}x{k}")
    if kept.shape != (n // rows, k // cols):
        raise ValueError(f"block bitmap shape {kept.shape} != {(n // rows, k // cols)}")
    blocks = weight.reshape(n // rows, rows, k // cols, cols).transpose(0, 2, 3, 1)
    r_idx, c_idx = np.nonzero(kept)  # row-major: grouped by block-row, columns ascending
    data = np.ascontiguousarray(blocks[r_idx, c_idx], dtype=np.float32)
    indices = c_idx.astype(np.int32)
    if data.shape[0] == 0:
        data = np.zeros((1, cols, rows), dtype=np.float32)
        indices = np.zeros(1, dtype=np.int32)
    indptr = np.zeros(n // rows + 1, dtype=np.int32)
    np.cumsum(kept.sum(axis=1), out=indptr[1:])
    return BSRWeight((n, k), (rows, cols), data, indices, indptr)


def choose_row_tile(rows: int) -> int:
    """Register-tile height: ~12-16 vector accumulators (``rows / 16`` vectors per row)."""
    vectors = max(rows // _LANES, 1)
    return max(2, min(8, 16 // vectors))


def bsr_primfunc(m: int, weight: BSRWeight, *, row_tile: int | None = None) -> tir.PrimFunc:
    """The scheduled BSR kernel (X, data, indices, indptr, bias) -> Y for ``m`` input rows."""
    n, k = weight.shape
    rows, cols = weight.block
    mr = row_tile or choose_row_tile(rows)
    nbr = n // rows
    tiles = math.ceil(m / mr) * nbr
    nnzb = int(weight.indices.shape[0])
    lanes = min(rows, _LANES)

    @T.prim_func
    def bsr(
        x: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnzb, cols, rows), "float32"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nbr + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(tiles):
            acc = T.alloc_buffer((mr, rows), "float32", scope="local")
            for i in T.unroll(mr):
                for v0 in T.unroll(rows // lanes):
                    for v1 in T.vectorized(lanes):
                        acc[i, v0 * lanes + v1] = T.float32(0)
            for b in range(indptr[t % nbr], indptr[t % nbr + 1]):
                for j in range(cols):
                    for i in T.unroll(mr):
                        for v0 in T.unroll(rows // lanes):
                            for v1 in T.vectorized(lanes):
                                acc[i, v0 * lanes + v1] = (
                                    acc[i, v0 * lanes + v1]
                                    + x[T.min(t // nbr * mr + i, m - 1), indices[b] * cols + j]
                                    * data[b, j, v0 * lanes + v1]
                                )
            for i in range(mr):
                if t // nbr * mr + i < m:
                    for v0 in range(rows // lanes):
                        for v1 in T.vectorized(lanes):
                            y[t // nbr * mr + i, t % nbr * rows + v0 * lanes + v1] = (
                                acc[i, v0 * lanes + v1] + bias[t % nbr * rows + v0 * lanes + v1]
                            )

    attrs = {KERNEL_ATTR: BSR_KERNEL, "tirx.is_scheduled": True}
    return bsr.without_attr("global_symbol").with_attrs(attrs)
