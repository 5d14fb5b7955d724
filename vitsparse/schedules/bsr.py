"""Block-sparse (BSR) linear kernels: Y = epilogue(X @ W^T + b) with W in block sparse row form.

Layout. W (N x K) is cut into ``rows x cols`` blocks; block-row ``r`` (output features
``r*rows ..``) keeps the blocks ``indices[indptr[r]:indptr[r+1]]`` (their column-block numbers).
Each kept block is stored transposed, ``data[b, j, i] = W[r*rows + i, c*cols + j]``, so the output
features of a block are contiguous: the inner loop is one broadcast of X and ``rows / lanes``
vector FMAs per input column, as in the dense kernel.

Compute (one family for every target; `bsr_primfunc`). MetaSchedule rejects loops whose bounds
are read from memory, so the loop over a block-row's kept blocks has the static extent
``K / cols`` (block-ELL width) and its body runs only while ``e < indptr[r+1] - indptr[r]``. The
guard depends on the block-row alone; TVM's HoistIfThenElse lifts it above the inner loops, so an
unused ELL slot costs one comparison, not its FLOPs. The X columns and the weight block of a slot
are gathered in their own stages (inlined on CPUs, staged in shared memory on GPUs); a gather
loads nothing for an unused slot and its reads are clamped into the buffers. Rows are padded to
the register-tile height by clamping the row index of X, like the dense kernel. ``dtype`` is
what X and the blocks are stored in, ``out_dtype`` what the bias and Y are (default: ``dtype``).
Accumulation is float32, int32 for ``dtype`` int8, whose kernel takes one more argument, the
per-output-feature ``scale`` (float32) its sums are dequantized with: Y = sums * scale + b. The
CUDA kernels of the reduced precisions: float16 X and blocks with float32 Y (fp16), int8 X and
blocks with float32 Y (int8); float16 throughout is the half-precision kernel of its own.

Schedules (knobs are MetaSchedule sampling instructions: fixed knobs give the hand-written
default, sampled ones the tuning design space):
- `schedule_bsr_cpu`: parallel over (row tile, block-row) tasks, a register tile of
  ``row_tile x rows`` accumulators, vectorised over ``lanes`` (16 for AVX-512, 8 for AVX2, 4 for
  NEON). Knobs: the unroll of the block's input columns and the task order.
- `schedule_bsr_gpu`: a thread block per (row tile, block-row), a thread per output element, the X
  rows and the weight block staged in shared memory per kept block. Knob: the staging vector width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vitsparse._tvm import Schedule, Target, te, tir, topi, tvm

KERNEL_ATTR = "vitsparse.kernel"
BSR_KERNEL = "bsr"
BLOCK_SIZES = (8, 16, 32, 64)
EPILOGUES = ("none", "gelu")
DTYPES = ("float32", "float16", "int8")
TILE_ORDERS = ("rows-major", "blocks-major")  # parallel task order: row tiles or block-rows outer


@dataclass(frozen=True)
class BSRWeight:
    """A weight in block sparse row form (see the module docstring for the layout)."""

    shape: tuple[int, int]  # (N, K) of the dense weight
    block: tuple[int, int]  # (rows, cols)
    data: np.ndarray  # (max(nnz_blocks, 1), cols, rows), blocks transposed
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
        out = np.zeros((n, k), dtype=self.data.dtype)
        for r in range(n // rows):
            for b in range(self.indptr[r], self.indptr[r + 1]):
                c = int(self.indices[b])
                out[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = self.data[b].T
        return out


def check_block(shape: tuple[int, int], block: tuple[int, int]) -> None:
    """Raise ValueError unless ``block`` is a handled block size that tiles ``shape`` (N, K)."""
    n, k = shape
    rows, cols = block
    if rows not in BLOCK_SIZES or cols not in BLOCK_SIZES:
        raise ValueError(f"block {rows}x{cols}: each side must be one of {BLOCK_SIZES}")
    if n % rows or k % cols:
        raise ValueError(f"block {rows}x{cols} does not divide the weight shape {n}x{k}")


def to_bsr(
    weight: np.ndarray, kept: np.ndarray, block: tuple[int, int], dtype: str = "float32"
) -> BSRWeight:
    """Pack the kept blocks of ``weight`` (N, K); ``kept`` is the (N/rows, K/cols) block bitmap."""
    n, k = weight.shape
    rows, cols = block
    check_block((n, k), block)
    if kept.shape != (n // rows, k // cols):
        raise ValueError(f"block bitmap shape {kept.shape} != {(n // rows, k // cols)}")
    blocks = weight.reshape(n // rows, rows, k // cols, cols).transpose(0, 2, 3, 1)
    r_idx, c_idx = np.nonzero(kept)  # row-major: grouped by block-row, columns ascending
    data = np.ascontiguousarray(blocks[r_idx, c_idx], dtype=dtype)
    indices = c_idx.astype(np.int32)
    if data.shape[0] == 0:
        data = np.zeros((1, cols, rows), dtype=dtype)
        indices = np.zeros(1, dtype=np.int32)
    indptr = np.zeros(n // rows + 1, dtype=np.int32)
    np.cumsum(kept.sum(axis=1), out=indptr[1:])
    return BSRWeight((n, k), (rows, cols), data, indices, indptr)


@dataclass(frozen=True)
class BSRShape:
    """The workload of one BSR kernel: M rows (tokens x batch), K inputs, N outputs, the block,
    the number of stored blocks, the epilogue, the storage type (of X and the blocks), the
    register-tile height and the type of the bias and Y ("": the storage type)."""

    m: int
    k: int
    n: int
    block: tuple[int, int]
    nnzb: int
    epilogue: str = "none"
    dtype: str = "float32"
    row_tile: int = 8
    out_dtype: str = ""

    def __post_init__(self):
        check_block((self.n, self.k), self.block)
        if not self.out_dtype:
            object.__setattr__(self, "out_dtype", self.dtype)
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue {self.epilogue!r} is not one of {EPILOGUES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.out_dtype not in ("float32", "float16"):
            raise ValueError(f"out_dtype {self.out_dtype!r} is neither float32 nor float16")
        if self.dtype == "int8" and self.out_dtype != "float32":
            raise ValueError("an int8 BSR kernel dequantizes its sums into float32")
        if self.nnzb < 1:
            raise ValueError("a BSR kernel stores at least one block")

    @property
    def padded_m(self) -> int:
        return math.ceil(self.m / self.row_tile) * self.row_tile

    @property
    def acc_dtype(self) -> str:
        """What the kernel sums in: int32 for int8 storage, else float32."""
        return "int32" if self.dtype == "int8" else "float32"

    @property
    def block_rows(self) -> int:
        return self.n // self.block[0]

    @property
    def ell_width(self) -> int:
        return self.k // self.block[1]

    @classmethod
    def of(
        cls, m: int, weight: BSRWeight, *, epilogue="none", target=None, row_tile=None,
        out_dtype="",
    ):  # fmt: skip
        """The shape of ``weight`` on ``m`` rows, tiled for ``target`` (default: the current);
        ``out_dtype`` "" is the weight's storage type."""
        rows = weight.block[0]
        target = target or Target.current(allow_none=True)
        if row_tile is not None:
            tile = row_tile
        elif target is not None and target.kind.name == "cuda":
            tile = choose_gpu_row_tile(rows, m)
        else:
            tile = choose_row_tile(rows, vector_lanes(target), m)
        dtype = str(weight.data.dtype)
        n, k = weight.shape
        nnzb = int(weight.indices.shape[0])
        return cls(m, k, n, weight.block, nnzb, epilogue, dtype, tile, out_dtype)


@dataclass(frozen=True)
class BSRKnobs:
    """Decisions of the CPU template (each one a MetaSchedule sampling instruction)."""

    col_unroll: int  # input columns of a block per unrolled step
    tile_order: int  # index into TILE_ORDERS


def vector_lanes(target=None) -> int:
    """float32 lanes of one SIMD register on ``target`` (default: the current target)."""
    target = target or Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return 4
    has = tvm.target.codegen.target_has_features
    if has("avx512f", target):
        return 16
    if has("avx2", target) or has("avx", target):
        return 8
    return 4  # NEON and SSE: 128-bit registers


def choose_row_tile(rows: int, lanes: int, m: int | None = None) -> int:
    """Register-tile height (2..8 rows): the ``row_tile x rows`` accumulators take up to ~16
    vector registers on x86 (16-32 there), ~24 of NEON's 32. Given ``m``, the height among the
    top three that pads ``m`` least."""
    vectors = max(rows // lanes, 1)
    budget = 24 if lanes == 4 else 16
    tile = max(2, min(8, budget // vectors))
    if m is None:
        return tile
    candidates = [t for t in range(max(2, tile - 2), tile + 1)]
    return min(candidates, key=lambda t: (math.ceil(m / t) * t - m, -t))


def choose_gpu_row_tile(rows: int, m: int | None = None) -> int:
    """Rows per thread block on a GPU: 128-256 threads (a thread per output), least padding."""
    tile = max(2, min(8, 256 // rows))
    if m is None:
        return tile
    candidates = range(max(2, tile // 2), tile + 1)
    return min(candidates, key=lambda t: (math.ceil(m / t) * t - m, -t))


def default_knobs(shape: BSRShape) -> BSRKnobs:
    cols = shape.block[1]
    return BSRKnobs(col_unroll=4 if cols % 4 == 0 else 1, tile_order=0)


def bsr_primfunc(shape: BSRShape) -> tir.PrimFunc:
    """Unscheduled PrimFunc (X, data, indices, indptr, bias) -> Y for one BSR workload; int8
    storage takes (X, data, indices, indptr, scale, bias) -> Y."""
    m, k, n = shape.m, shape.k, shape.n
    rows, cols = shape.block
    nnzb, dtype, acc_dtype, out_dtype = shape.nnzb, shape.dtype, shape.acc_dtype, shape.out_dtype
    x = te.placeholder((m, k), dtype, name="X")
    data = te.placeholder((nnzb, cols, rows), dtype, name="data")
    indices = te.placeholder((nnzb,), "int32", name="indices")
    indptr = te.placeholder((shape.block_rows + 1,), "int32", name="indptr")
    scale = te.placeholder((n,), "float32", name="scale") if dtype == "int8" else None
    bias = te.placeholder((n,), out_dtype, name="B")
    width = shape.ell_width
    e = te.reduce_axis((0, width), "e")
    j = te.reduce_axis((0, cols), "j")

    def slot(r, e):  # storage slot of ELL entry e of block-row r, clamped into the buffers
        return te.min(indptr[r] + e, nnzb - 1)

    def stored(r, e, value):  # value for a stored entry, zero (and no load) for an unused slot
        return tir.if_then_else(e < indptr[r + 1] - indptr[r], value, tir.const(0, dtype))

    # The X columns and the weight block of ELL entry e, gathered: the accumulation then reads
    # them at affine positions, which lets a schedule stage them (GPU) or inline them (CPU).
    x_g = te.compute(
        (shape.block_rows, width, shape.padded_m, cols),
        lambda r, e, i, j: stored(r, e, x[te.min(i, m - 1), indices[slot(r, e)] * cols + j]),
        name="gather_x",
    )
    w_g = te.compute(
        (shape.block_rows, width, cols, rows),
        lambda r, e, j, c: stored(r, e, data[slot(r, e), j, c]),
        name="gather_w",
    )
    acc = te.compute(
        (shape.padded_m, n),
        lambda i, c: te.sum(
            x_g[c // rows, e, i, j].astype(acc_dtype)
            * w_g[c // rows, e, j, c % rows].astype(acc_dtype),
            axis=[e, j],
        ),
        name="bsr",
    )
    if scale is not None:  # int8: the int32 sums dequantized
        sums = lambda i, c: acc[i, c].astype("float32") * scale[c]  # noqa: E731
    else:
        sums = lambda i, c: acc[i, c]  # noqa: E731
    pre = te.compute((m, n), lambda i, c: sums(i, c) + bias[c].astype("float32"), name="bias")
    if shape.epilogue == "gelu":
        # Exact-erf GELU with TVM's fast erf (vectorisable; libm's erf is a scalar call).
        erf = topi.fast_erf(te.compute((m, n), lambda i, c: pre[i, c] * 0.7071067811865476))
        act = te.compute((m, n), lambda i, c: pre[i, c] * (0.5 + 0.5 * erf[i, c]), name="gelu")
    else:
        act = pre
    y = te.compute((m, n), lambda i, c: act[i, c].astype(out_dtype), name="epilogue")
    args = [x, data, indices, indptr, *([scale] if scale is not None else []), bias, y]
    func = te.create_prim_func(args).without_attr("global_symbol")
    func = _guard_ell_slots(func, rows)
    return func.with_attrs(
        {
            KERNEL_ATTR: BSR_KERNEL,
            "vitsparse.row_tile": shape.row_tile,
            "vitsparse.epilogue": shape.epilogue,
        }
    )


def _guard_ell_slots(func: tir.PrimFunc, rows: int) -> tir.PrimFunc:
    """Wrap the update of the ``bsr`` block in ``if e < indptr[r+1] - indptr[r]``: an unused
    ELL slot then skips its FLOPs (the gathers alone would make them multiply zeros)."""
    sch = Schedule(func)
    block_rv = sch.get_sblock("bsr")
    block = sch.get(block_rv)
    indptr = _indptr_buffer(sch)
    _, c, e, _ = (iv.var for iv in block.iter_vars)
    r = c // rows
    guarded = tvm.s_tir.SBlock(
        block.iter_vars,
        block.reads,
        block.writes,
        block.name_hint,
        tir.IfThenElse(e < indptr[r + 1] - indptr[r], block.body, None),
        block.init,
        block.alloc_buffers,
        block.match_buffers,
        block.annotations,
    )
    sch.state.replace(sch.get_sref(block_rv), guarded, {block: guarded})
    return sch.mod["main"]


def _indptr_buffer(sch: Schedule):
    block = sch.get(sch.get_sblock("gather_w"))
    return next(r.source for r in block.reads if r.source.name == "indptr")


def shape_of(func: tir.PrimFunc) -> BSRShape:
    """The BSRShape a BSR kernel PrimFunc was made from."""
    x, data, *_, y = func.params
    nnzb, cols, rows = (int(v) for v in data.shape)
    return BSRShape(
        m=int(x.shape[0]),
        k=int(x.shape[1]),
        n=int(y.shape[1]),
        block=(rows, cols),
        nnzb=nnzb,
        epilogue=str(func.attrs["vitsparse.epilogue"]),
        dtype=str(x.dtype),
        row_tile=int(func.attrs["vitsparse.row_tile"]),
        out_dtype=str(y.dtype),
    )


def is_bsr_kernel(func) -> bool:
    return (
        isinstance(func, tir.PrimFunc)
        and func.attrs is not None
        and func.attrs.get(KERNEL_ATTR) == BSR_KERNEL
    )


def _inline_elementwise(sch: Schedule, keep: tuple[str, ...]) -> None:
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint not in keep:
            sch.compute_inline(block)


def schedule_bsr_cpu(
    sch: Schedule, knobs: BSRKnobs | None = None, lanes: int = 16, tile_order: int = 0
) -> None:
    """The CPU template on the BSR kernel in ``sch``.

    ``knobs`` fixes every decision (the hand-written default); with None the column unroll is a
    sampled decision and ``tile_order`` picks the task order, so that (one schedule per order) is
    the MetaSchedule design space (`cpu_design_space`).
    """
    shape = shape_of(sch.mod["main"])
    rows, cols = shape.block
    lanes = min(lanes, rows)
    if knobs is not None:
        tile_order = knobs.tile_order
    _inline_elementwise(sch, ("bsr", "epilogue"))
    out, acc = sch.get_sblock("epilogue"), sch.get_sblock("bsr")

    i, c = sch.get_loops(out)
    i_o, i_i = sch.split(i, [None, shape.row_tile])
    r, c_in = sch.split(c, [None, rows])
    c_v, c_lane = sch.split(c_in, [None, lanes])
    if tile_order == 0:
        sch.reorder(i_o, r, i_i, c_v, c_lane)
        tile = sch.fuse(i_o, r)
    else:
        sch.reorder(r, i_o, i_i, c_v, c_lane)
        tile = sch.fuse(r, i_o)
    sch.parallel(tile)
    sch.vectorize(c_lane)

    sch.compute_at(acc, tile)
    # (i, c, e, j) under the tile; compute_at drops the e loop when the ELL width is 1.
    a_i, a_c, *a_e, a_j = sch.get_loops(acc)[-4 if shape.ell_width > 1 else -3 :]
    a_v, a_lane = sch.split(a_c, [None, lanes])
    j_dec = None if knobs is None else [cols // knobs.col_unroll, knobs.col_unroll]
    j_o, j_i = sch.split(
        a_j, sch.sample_perfect_tile(a_j, n=2, max_innermost_factor=8, decision=j_dec)
    )
    sch.reorder(*a_e, j_o, j_i, a_i, a_v, a_lane)
    sch.vectorize(a_lane)
    sch.unroll(a_v)
    sch.unroll(a_i)
    sch.unroll(j_i)
    sch.decompose_reduction(acc, a_e[0] if a_e else j_o)


def schedule_bsr_gpu(sch: Schedule, vector: int | None = 1) -> None:
    """The CUDA template on the BSR kernel in ``sch`` (``vector`` None: sampled)."""
    shape = shape_of(sch.mod["main"])
    rows, cols = shape.block
    threads = shape.row_tile * rows
    _inline_elementwise(sch, ("bsr", "epilogue", "gather_x", "gather_w"))
    out, acc = sch.get_sblock("epilogue"), sch.get_sblock("bsr")

    i, c = sch.get_loops(out)
    i_o, i_i = sch.split(i, [None, shape.row_tile])
    r, c_in = sch.split(c, [None, rows])
    sch.reorder(i_o, r, i_i, c_in)
    tile = sch.fuse(i_o, r)
    sch.bind(tile, "blockIdx.x")
    sch.bind(i_i, "threadIdx.y")
    sch.bind(c_in, "threadIdx.x")

    sch.compute_at(acc, c_in)
    sch.set_scope(acc, 0, "local")
    *a_e, a_j = sch.get_loops(acc)[-2 if shape.ell_width > 1 else -1 :]
    stage_at = a_e[0] if a_e else a_j
    widths = [v for v in (1, 2, 4) if (cols * rows) % (threads * v) == 0] or [1]
    fixed = None if vector is None else widths.index(vector if vector in widths else 1)
    for name in ("gather_w", "gather_x"):
        stage = sch.get_sblock(name)
        sch.set_scope(stage, 0, "shared")  # before compute_at: the region spans all threads
        sch.compute_at(stage, stage_at)
        fused = sch.fuse(*sch.get_loops(stage)[-2:])
        width = 1
        if name == "gather_w":
            width = sch.sample_categorical(
                widths,
                [1.0 / len(widths)] * len(widths),
                decision=fixed,
            )
        _, t_y, t_x, v = sch.split(fused, [None, shape.row_tile, rows, width])
        sch.bind(t_y, "threadIdx.y")
        sch.bind(t_x, "threadIdx.x")
        sch.vectorize(v)
    if a_e:
        sch.unroll(a_j)
    sch.decompose_reduction(acc, stage_at)


def scheduled_cpu(shape: BSRShape, target, knobs: BSRKnobs | None = None) -> tir.PrimFunc:
    """The BSR kernel of ``shape`` with the CPU template applied for ``target`` (default knobs
    unless given), ready for tvm.compile as ``main``."""
    sch = Schedule(bsr_primfunc(shape).with_attr("global_symbol", "main"))
    schedule_bsr_cpu(sch, knobs or default_knobs(shape), vector_lanes(target))
    return sch.mod["main"]


def cpu_design_space(lanes: int):
    """MetaSchedule ScheduleFn body: the CPU template in both task orders, unroll sampled."""

    def space(sch: Schedule) -> list[Schedule]:
        spaces = []
        for order in range(len(TILE_ORDERS)):
            copy = sch.copy()
            schedule_bsr_cpu(copy, None, lanes, tile_order=order)
            spaces.append(copy)
        return spaces

    return space
