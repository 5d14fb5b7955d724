"""int8 linear-layer kernels for x86 CPUs: Y = epilogue(float(Xq @ Wq^T) * S + b), dense and BSR.

The values are int8 (activations quantized per tensor, weights per output channel, both
symmetric in [-127, 127]; `vitsparse.plan.quantize`), and the products are summed exactly in
int32. They are stored as int16 here, so that each multiply is `vpmaddwd`: two int16 pairs per
int32 lane, multiplied and added in one instruction, with no saturation (the unsigned-by-signed
byte multiply, `vpmaddubsw`, saturates its int16 pair sums on int8 x int8 data, and VNNI's
`vpdpbusd` is missing on AVX2-only CPUs). One ``lanes``-wide `vpmaddwd` does ``2 * lanes``
multiply-adds: twice an fp32 FMA of the same width.

Layouts. ``Xq`` is (M, K) int16, K even (the pass pads an odd K with a zero column). The dense
weight is packed at compile time into panels of ``lanes`` output columns holding pairs of input
columns, ``Wp[n // L, k // 2, n % L, k % 2] = Wq[n, k]``, so one k pair of a panel is one vector.
``S[n] = s_x * s_w[n]`` dequantizes the int32 sums. A BSR weight keeps, per kept block, the same
pairing inside the block: ``data[b, j // 2, i, j % 2] = Wq[r*rows + i, c*cols + j]``.

Kernels.
- `dense_primfunc` + `schedule_dense_cpu`: the fp32 dense kernel's template (parallel row x
  column tiles, a register tile of ``row_tile x col_vectors`` int32 accumulators, k unrolled),
  with the innermost (lane, pair) loops tensorized into `vpmaddwd` (``INTRINSICS``).
- `bsr_primfunc`: no epilogue (a GELU after it stays a separate fast-math kernel), written
  scheduled (a loop over a block-row's kept blocks read from
  ``indptr``), since the tensorized body and a data-dependent loop bound cannot both come out of
  TVM's schedule primitives: parallel over (row tile, block-row) tasks, ``row_tile x rows / L``
  accumulators, one `vpmaddwd` per (row, vector, column pair).
Both take ``lanes`` 8 (AVX2, 256-bit) or 16 (AVX-512BW, 512-bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vitsparse._tvm import Schedule, T, TensorIntrin, te, tir, topi, tvm
from vitsparse.schedules import dense

KERNEL_ATTR = "vitsparse.kernel"
DENSE_KERNEL = "int8-dense"
BSR_KERNEL = "int8-bsr"
EPILOGUES = ("none", "gelu")
LANES = (8, 16)
_PMADDWD = {8: "llvm.x86.avx2.pmadd.wd", 16: "llvm.x86.avx512.pmaddw.d.512"}
INTRINSICS = {lanes: f"vitsparse_pmaddwd_{lanes}x2" for lanes in LANES}


def lanes_for(target) -> int:
    """int32 lanes of the widest `vpmaddwd` ``target`` has (16 with AVX-512BW, 8 with AVX2);
    0 where it has neither."""
    has = tvm.target.codegen.target_has_features
    if target is None or target.kind.name != "llvm":
        return 0
    if has("avx512bw", target):
        return 16
    if has("avx2", target):
        return 8
    return 0


def register_intrinsics() -> None:
    """Register the `vpmaddwd` tensor intrinsics with TVM (once per process)."""
    for lanes, name in INTRINSICS.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *_intrinsic(lanes))


def _intrinsic(lanes: int):
    llvm_name = _PMADDWD[lanes]
    half = lanes * 2

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((2,), "int16", offset_factor=1),
        b: T.Buffer((lanes, 2), "int16", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:2], b[0:lanes, 0:2])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((2,), "int16", offset_factor=1),
        b: T.Buffer((lanes, 2), "int16", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:2], b[0:lanes, 0:2])
            T.writes(c[0:lanes])
            pair = T.reinterpret(a.vload([0], "int16x2"), dtype="int32")
            pairs = T.reinterpret(T.broadcast(pair, lanes), dtype=f"int16x{half}")
            c[T.ramp(T.int32(0), 1, lanes)] = c.vload([0], dtype=f"int32x{lanes}") + (
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name),
                    pairs,
                    b.vload([0, 0], dtype=f"int16x{half}"),
                    dtype=f"int32x{lanes}",
                )
            )

    return desc, impl


# -- weights ------------------------------------------------------------------------------------


def pack_dense(q: np.ndarray, lanes: int) -> np.ndarray:
    """(N, K) int8 values -> (N / L, K / 2, L, 2) int16 panels (N % L == 0, K even)."""
    n, k = q.shape
    return np.ascontiguousarray(
        q.astype(np.int16).reshape(n // lanes, lanes, k // 2, 2).transpose(0, 2, 1, 3)
    )


@dataclass(frozen=True)
class Int8BSRWeight:
    """The kept blocks of an int8 weight: ``data`` (nnzb, cols / 2, rows, 2) int16, with the
    BSR ``indices``/``indptr`` of `vitsparse.schedules.bsr`."""

    shape: tuple[int, int]
    block: tuple[int, int]
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray


def pack_bsr(q: np.ndarray, kept: np.ndarray, block: tuple[int, int]) -> Int8BSRWeight:
    """Pack the kept ``rows x cols`` blocks of the (N, K) int8 weight ``q`` (``kept``: the
    (N / rows, K / cols) block bitmap)."""
    n, k = q.shape
    rows, cols = block
    blocks = q.astype(np.int16).reshape(n // rows, rows, k // cols, cols // 2, 2)
    r_idx, c_idx = np.nonzero(kept)
    data = np.ascontiguousarray(blocks.transpose(0, 2, 3, 1, 4)[r_idx, c_idx])
    indices = c_idx.astype(np.int32)
    if data.shape[0] == 0:  # buffers cannot be empty
        data = np.zeros((1, cols // 2, rows, 2), np.int16)
        indices = np.zeros(1, np.int32)
    indptr = np.zeros(n // rows + 1, np.int32)
    np.cumsum(kept.sum(axis=1), out=indptr[1:])
    return Int8BSRWeight((n, k), (rows, cols), data, indices, indptr)


# -- dense --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8DenseShape:
    """One int8 dense workload: M rows, K inputs (even), N outputs (a multiple of ``lanes``)."""

    m: int
    k: int
    n: int
    epilogue: str = "none"
    row_tile: int = 6
    lanes: int = 8

    def __post_init__(self):
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue {self.epilogue!r} is not one of {EPILOGUES}")
        if self.lanes not in LANES:
            raise ValueError(f"lanes {self.lanes} is not one of {LANES}")
        if self.n % self.lanes or self.k % 2:
            raise ValueError(f"N={self.n} must be a multiple of {self.lanes}, K={self.k} even")

    @property
    def padded_m(self) -> int:
        return math.ceil(self.m / self.row_tile) * self.row_tile


def _epilogue(acc, scale, bias, m: int, n: int, epilogue: str):
    gelu = epilogue == "gelu"
    pre = te.compute(
        (m, n),
        lambda i, j: acc[i, j].astype("float32") * scale[j] + bias[j],
        name="dequant" if gelu else "epilogue",
    )
    if not gelu:
        return pre
    # Exact-erf GELU with TVM's fast erf, as the fp32 kernels.
    erf = topi.fast_erf(te.compute((m, n), lambda i, j: pre[i, j] * 0.7071067811865476))
    return te.compute((m, n), lambda i, j: pre[i, j] * (0.5 + 0.5 * erf[i, j]), name="epilogue")


def dense_primfunc(shape: Int8DenseShape) -> tir.PrimFunc:
    """Unscheduled PrimFunc (Xq, Wp, S, B) -> Y for one int8 dense workload."""
    m, k_dim, n, lanes = shape.m, shape.k, shape.n, shape.lanes
    x = te.placeholder((m, k_dim), "int16", name="X")
    w = te.placeholder((n // lanes, k_dim // 2, lanes, 2), "int16", name="W")
    scale = te.placeholder((n,), "float32", name="S")
    bias = te.placeholder((n,), "float32", name="B")
    k = te.reduce_axis((0, k_dim), "k")
    acc = te.compute(
        (shape.padded_m, n),
        lambda i, j: te.sum(
            x[te.min(i, m - 1), k].astype("int32")
            * w[j // lanes, k // 2, j % lanes, k % 2].astype("int32"),
            axis=k,
        ),
        name="dense",
    )
    y = _epilogue(acc, scale, bias, m, n, shape.epilogue)
    func = te.create_prim_func([x, w, scale, bias, y]).without_attr("global_symbol")
    return func.with_attrs(
        {
            KERNEL_ATTR: DENSE_KERNEL,
            "vitsparse.row_tile": shape.row_tile,
            "vitsparse.epilogue": shape.epilogue,
            "vitsparse.lanes": lanes,
        }
    )


def dense_shape_of(func: tir.PrimFunc) -> Int8DenseShape:
    x_buf, y_buf = func.params[0], func.params[4]
    return Int8DenseShape(
        m=int(x_buf.shape[0]),
        k=int(x_buf.shape[1]),
        n=int(y_buf.shape[1]),
        epilogue=str(func.attrs["vitsparse.epilogue"]),
        row_tile=int(func.attrs["vitsparse.row_tile"]),
        lanes=int(func.attrs["vitsparse.lanes"]),
    )


@dataclass(frozen=True)
class Int8DenseKnobs:
    col_vectors: int  # vectors of ``lanes`` int32 per register tile
    k_unroll: int  # k pairs per unrolled step


def default_dense_knobs(shape: Int8DenseShape) -> Int8DenseKnobs:
    """~12-16 accumulator registers on AVX2's 16: row_tile x col_vectors, as wide as N allows."""
    vectors = shape.n // shape.lanes
    col = max(1, min(4 if shape.lanes == 8 else 2, 16 // shape.row_tile))
    while vectors % col:
        col -= 1
    pairs = shape.k // 2
    unroll = next(u for u in (4, 2, 1) if pairs % u == 0)
    return Int8DenseKnobs(col_vectors=col, k_unroll=unroll)


def schedule_dense_cpu(sch: Schedule, knobs: Int8DenseKnobs | None = None) -> None:
    """The CPU template on the int8 dense kernel in ``sch`` (``knobs`` None: sampled)."""
    register_intrinsics()
    shape = dense_shape_of(sch.mod["main"])
    lanes = shape.lanes
    col_vectors = None if knobs is None else knobs.col_vectors
    acc = dense.tile_output(sch, shape.row_tile, lanes, shape.n // lanes, col_vectors)
    a_i, a_j, a_k = sch.get_loops(acc)[-3:]
    a_v, a_lane = sch.split(a_j, [None, lanes])
    k_pair, k_in = sch.split(a_k, [None, 2])
    k_dec = None if knobs is None else [shape.k // 2 // knobs.k_unroll, knobs.k_unroll]
    k_o, k_u = sch.split(
        k_pair, sch.sample_perfect_tile(k_pair, n=2, max_innermost_factor=8, decision=k_dec)
    )
    sch.reorder(k_o, k_u, a_i, a_v, a_lane, k_in)
    init = sch.decompose_reduction(acc, k_o)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(a_lane, INTRINSICS[lanes])
    sch.unroll(a_v)
    sch.unroll(a_i)
    sch.unroll(k_u)


def is_dense_kernel(func) -> bool:
    return (
        isinstance(func, tir.PrimFunc)
        and func.attrs is not None
        and func.attrs.get(KERNEL_ATTR) == DENSE_KERNEL
    )


def scheduled_dense(shape: Int8DenseShape, knobs: Int8DenseKnobs | None = None) -> tir.PrimFunc:
    """The int8 dense kernel of ``shape`` with its default schedule, as ``main``."""
    sch = Schedule(dense_primfunc(shape).with_attr("global_symbol", "main"))
    schedule_dense_cpu(sch, knobs or default_dense_knobs(shape))
    return sch.mod["main"]


# -- BSR ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8BSRShape:
    """One int8 BSR workload: M rows, K inputs, N outputs, the block, the stored block count."""

    m: int
    k: int
    n: int
    block: tuple[int, int]
    nnzb: int
    row_tile: int = 4
    lanes: int = 8

    def __post_init__(self):
        rows, cols = self.block
        if rows % self.lanes or cols % 2 or self.n % rows or self.k % cols:
            raise ValueError(
                f"block {rows}x{cols} on {self.n}x{self.k}: rows must be a multiple of "
                f"{self.lanes} lanes, cols even, and the block must tile the weight"
            )

    @property
    def padded_m(self) -> int:
        return math.ceil(self.m / self.row_tile) * self.row_tile


def choose_bsr_row_tile(rows: int, lanes: int, m: int) -> int:
    """Register-tile height: ``tile x rows / L`` accumulators in ~12 of 16 (AVX2) or 24 of 32
    (AVX-512) registers, the height among the top three that pads ``m`` least."""
    budget = 12 if lanes == 8 else 24
    tile = max(1, min(8, budget // (rows // lanes)))
    candidates = range(max(1, tile - 2), tile + 1)
    return min(candidates, key=lambda t: (math.ceil(m / t) * t - m, -t))


def bsr_primfunc(shape: Int8BSRShape) -> tir.PrimFunc:
    """The scheduled int8 BSR kernel (Xq, data, indices, indptr, S, B) -> Y; Xq has
    ``padded_m`` rows (the rows past M are read, never written back)."""
    m, k, n, lanes = shape.m, shape.k, shape.n, shape.lanes
    rows, cols = shape.block
    pairs, vectors, tile = cols // 2, rows // lanes, shape.row_tile
    k_words, padded_m = k // 2, shape.padded_m
    tiles, block_rows, nnzb = shape.padded_m // tile, n // rows, shape.nnzb
    half = lanes * 2
    pmaddwd = _PMADDWD[lanes]

    @T.prim_func(s_tir=True)
    def kernel(
        x: T.Buffer((padded_m, k), "int16"),
        data: T.Buffer((nnzb, pairs, rows, 2), "int16"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((block_rows + 1,), "int32"),
        scale: T.Buffer((n,), "float32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        x32 = T.decl_buffer((padded_m * k_words,), "int32", data=x.data)
        w16 = T.decl_buffer((nnzb * pairs * rows * 2,), "int16", data=data.data)
        for task in T.parallel(tiles * block_rows):
            acc = T.decl_buffer((tile * rows,), "int32", scope="local")
            t = task // block_rows
            r = task % block_rows
            for i in T.unroll(tile):
                for v in T.unroll(vectors):
                    acc[T.ramp((i * vectors + v) * lanes, 1, lanes)] = T.broadcast(0, lanes)
            for b in T.serial(indptr[r], indptr[r + 1]):
                c = indices[b]
                for i in T.unroll(tile):  # row outer: few live registers besides the sums
                    for p in T.unroll(pairs):
                        # X's int32 word (row, column pair): a constant offset from the task's
                        # row and the block's column (X comes padded to whole row tiles)
                        word = x32[(t * tile + i) * k_words + c * pairs + p]
                        pair = T.reinterpret(T.broadcast(word, lanes), dtype=f"int16x{half}")
                        for v in T.unroll(vectors):
                            base = (i * vectors + v) * lanes
                            acc[T.ramp(base, 1, lanes)] = acc[T.ramp(base, 1, lanes)] + (
                                T.call_llvm_pure_intrin(
                                    T.llvm_lookup_intrinsic_id(pmaddwd),
                                    pair,
                                    w16[T.ramp(((b * pairs + p) * rows + v * lanes) * 2, 1, half)],
                                    dtype=f"int32x{lanes}",
                                )
                            )
            # Unrolled, and read in the same lanes-wide vectors the sums were added in: then
            # LLVM keeps the sums in registers (mixed vector widths would pin them in memory).
            for i in T.unroll(tile):
                if t * tile + i < m:
                    for v in T.unroll(vectors):
                        for lane in T.vectorized(lanes):
                            y[t * tile + i, r * rows + v * lanes + lane] = (
                                T.cast(acc[(i * vectors + v) * lanes + lane], "float32")
                                * scale[r * rows + v * lanes + lane]
                                + bias[r * rows + v * lanes + lane]
                            )

    return kernel.without_attr("global_symbol").with_attrs(
        {
            KERNEL_ATTR: BSR_KERNEL,
            "tirx.is_scheduled": True,
            "vitsparse.row_tile": tile,
            "vitsparse.lanes": lanes,
        }
    )


def is_bsr_kernel(func) -> bool:
    return (
        isinstance(func, tir.PrimFunc)
        and func.attrs is not None
        and func.attrs.get(KERNEL_ATTR) == BSR_KERNEL
    )
