"""Linear-layer kernels whose multiply-add takes a group of inputs per lane: int8 and bf16 on
x86 CPUs, int8 and fp16 on ARM CPUs with the dot-product and half-precision extensions.

    int8     Y = epilogue(float(Xq @ Wq^T) * S + b), the sums exact in int32 (x86: pairs)
    int8vnni the same computation on x86 with AVX512-VNNI: quads per lane through `vpdpbusd`
    int8dot  the same computation on ARM: quads of int8 per lane through `sdot`
    bf16     Y = epilogue(X_bf16 @ W_bf16^T + b), the sums in float32 (S = 1)
    fp16fml  Y = epilogue(X_fp16 @ W_fp16^T + b) on ARM, the sums in float32 (S = 1)

Each stored value is part of a 32-bit word holding ``GROUP`` of them (two int16, two bf16, two
fp16, four int8), and one call adds, per lane, the products of a word of X and a word of W.

int8: the values are int8 (activations quantized per tensor, weights per output channel, both
symmetric in [-127, 127]; `vitsparse.plan.quantize`), stored as int16, so that each multiply is
`vpmaddwd`: two int16 pairs per int32 lane, multiplied and added in one instruction, with no
saturation (the unsigned-by-signed byte multiply, `vpmaddubsw`, saturates its int16 pair sums on
int8 x int8 data). One ``lanes``-wide `vpmaddwd` does ``2 * lanes`` multiply-adds: twice an fp32
FMA of the same width. On CPUs with AVX512-VNNI, LLVM fuses it with the add into `vpdpwssd`.

int8vnni: `vpdpbusd` multiplies unsigned bytes by signed bytes, four per int32 lane, without
saturating (its ``s`` form saturates). So X is stored offset, ``Xq + 128`` as uint8 (1..255), W
as int8, and the kernel subtracts ``C[n] = 128 * sum_k Wq[n, k]`` (an int32 per output column,
computed at compile time; a BSR weight's over its kept blocks) from each exact int32 sum before
dequantizing: the same sums as int8's, with twice its multiply-adds per instruction.

int8dot: the same int8 values stored as int8, four per word, and each multiply is ARMv8.2's
`sdot` (FEAT_DotProd): per int32 lane, the four products of two int8 quads added to the sum, exact.
One 128-bit `sdot` does 16 multiply-adds, four times an fp32 NEON FMA.

fp16fml: the values are IEEE half precision (rounded to nearest even from float32), and each
multiply is ARMv8.2's widening half-precision multiply-add (FEAT_FHM, mandatory from v8.4):
`fmlal` multiplies the low four halves of two registers and adds the products to four float32
sums, `fmlal2` the high four. So a vector of W holds a group's two columns one after the other,
``[w(lanes 0..3, k), w(lanes 0..3, k+1)]`` (``G_MAJOR``), and X's word is spread to
``[x_k x4, x_k+1 x4]``: the two instructions add both products to each lane's float32 sum, with
no half-precision rounding of the sums (ARMv8.2's plain fp16 `fmla` would round every sum to
fp16). Like bf16's, the multiply-add is a short LLVM IR function (``_FMLAL_IR``).

bf16: the values are bfloat16 (rounded to nearest even from float32), stored as their uint16
bits, and each multiply is AVX512-BF16's `vdpbf16ps`: per float32 lane, the products of two
bf16 pairs added to the sum. TVM lowers every bfloat16 value to float32 arithmetic, and LLVM's
intrinsic takes ``<32 x bfloat>``, which TIR cannot spell; so the kernels call a three-line
LLVM IR function (``_DPBF16PS_IR``, linked in through ``pragma_import_llvm`` and inlined) that
bit-casts the int32 words it is given to bf16 vectors. A bf16 kernel's X is uint16 bits.

Layouts (every variant; G = ``GROUP``). ``X`` is (M, K) with K a multiple of G (the pass pads K
with zero columns). The dense weight is packed at compile time into panels of ``lanes`` output
columns holding groups of input columns, ``Wp[n // L, k // G, n % L, k % G] = W[n, k]``
(``Wp[n // L, k // G, k % G, n % L]`` for the ``G_MAJOR`` variants), so one k group of a panel
is one vector. ``S[n]`` dequantizes int8's sums (``s_x * s_w[n]``; ones for bf16 and fp16). A
BSR weight keeps, per kept block, the same grouping inside the block: ``data[b, j // G, i, j % G]
= W[r*rows + i, c*cols + j]`` (G-major: ``data[b, j // G, i // L, j % G, i % L]``, the same words
in the same place per vector of ``L`` rows).

Kernels.
- `dense_primfunc` + `schedule_dense_cpu`: the fp32 dense kernel's template (parallel row x
  column tiles, a register tile of ``row_tile x col_vectors`` accumulators, k unrolled), with
  the innermost (lane, group) loops tensorized (``INTRINSICS``).
- `bsr_primfunc`: no epilogue (a GELU after it stays a separate fast-math kernel), written
  scheduled (a loop over a block-row's kept blocks read from ``indptr``), since the tensorized
  body and a data-dependent loop bound cannot both come out of TVM's schedule primitives:
  parallel over (row tile, block-row) tasks, ``row_tile x rows / L`` accumulators, one group
  multiply-add per (row, vector, column group).
int8 takes ``lanes`` 8 (AVX2, 256-bit) or 16 (AVX-512BW, 512-bit); bf16 takes 16; int8dot and
fp16fml 4 (NEON, 128-bit). `variant` names the kernels of a precision at a target's lanes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vitsparse._tvm import Schedule, T, TensorIntrin, te, tir, topi, tvm
from vitsparse.schedules import dense

KERNEL_ATTR = "vitsparse.kernel"
PRECISIONS = ("int8", "bf16", "int8dot", "int8vnni", "fp16fml")  # kernel variants
INT8_VARIANTS = ("int8", "int8dot", "int8vnni")
HALF_VARIANTS = {"bf16": "bf16", "fp16": "fp16fml"}  # a half precision -> its kernel variant
HALF_OF = {variant: half for half, variant in HALF_VARIANTS.items()}
HALF_DTYPES = {"bf16": "uint16", "fp16": "float16"}  # how a half precision's values are stored
DENSE_KERNELS = {p: f"{p}-dense" for p in PRECISIONS}
BSR_KERNELS = {p: f"{p}-bsr" for p in PRECISIONS}
EPILOGUES = ("none", "gelu")
LANES = {"int8": (8, 16), "bf16": (16,), "int8dot": (4,), "int8vnni": (16,), "fp16fml": (4,)}
STORAGE = {  # W
    "int8": "int16",
    "bf16": "uint16",
    "int8dot": "int8",
    "int8vnni": "int8",
    "fp16fml": "float16",
}
X_STORAGE = {**STORAGE, "int8vnni": "uint8"}  # X, where it differs from W
OFFSET = {"int8vnni": 128}  # added to X's values; the kernel takes C and subtracts it
GROUP = {"int8": 2, "bf16": 2, "int8dot": 4, "int8vnni": 4, "fp16fml": 2}  # values per word
G_MAJOR = ("fp16fml",)  # a vector of W holds the group's columns one after the other
ACCUMULATOR = {p: "float32" if p in HALF_OF else "int32" for p in PRECISIONS}
_PMADDWD = {8: "llvm.x86.avx2.pmadd.wd", 16: "llvm.x86.avx512.pmaddw.d.512"}
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
INTRINSICS = {
    ("int8", 8): "vitsparse_pmaddwd_8x2",
    ("int8", 16): "vitsparse_pmaddwd_16x2",
    ("bf16", 16): "vitsparse_dpbf16ps_16x2",
    ("int8dot", 4): "vitsparse_sdot_4x4",
    ("int8vnni", 16): "vitsparse_vpdpbusd_16x4",
    ("fp16fml", 4): "vitsparse_fmlal_4x2",
}
_DPBF16PS = "vitsparse_dpbf16ps"
# acc + the bf16 pair products of a and b, given as int32 words (two bf16 per word).
_DPBF16PS_IR = f"""
define linkonce_odr <16 x float> @{_DPBF16PS}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b)
    alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x,
                                                            <32 x bfloat> %y)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""
_FMLAL = "vitsparse_fmlal"
# acc + the fp16 pair products of a (one word, spread to every lane) and b (G-major halves).
_FMLAL_IR = f"""
define linkonce_odr <4 x float> @{_FMLAL}(<4 x float> %acc, <4 x i32> %a, <4 x i32> %b)
    alwaysinline {{
  %x = bitcast <4 x i32> %a to <8 x half>
  %w = bitcast <4 x i32> %b to <8 x half>
  %s = shufflevector <8 x half> %x, <8 x half> poison,
                     <8 x i32> <i32 0, i32 0, i32 0, i32 0, i32 1, i32 1, i32 1, i32 1>
  %lo = call <4 x float> @llvm.aarch64.neon.fmlal.v4f32.v8f16(<4 x float> %acc, <8 x half> %w,
                                                              <8 x half> %s)
  %hi = call <4 x float> @llvm.aarch64.neon.fmlal2.v4f32.v8f16(<4 x float> %lo, <8 x half> %w,
                                                               <8 x half> %s)
  ret <4 x float> %hi
}}
declare <4 x float> @llvm.aarch64.neon.fmlal.v4f32.v8f16(<4 x float>, <8 x half>, <8 x half>)
declare <4 x float> @llvm.aarch64.neon.fmlal2.v4f32.v8f16(<4 x float>, <8 x half>, <8 x half>)
"""
IMPORT_PRAGMA = "pragma_import_llvm"
IMPORTS = {"bf16": _DPBF16PS_IR, "fp16fml": _FMLAL_IR}  # variants whose multiply-add is LLVM IR


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


def compensation(values: np.ndarray, precision: str) -> np.ndarray | None:
    """``C[n] = OFFSET * sum_k values[n, k]`` (int32) for a variant that offsets X, else None."""
    offset = OFFSET.get(precision)
    if offset is None:
        return None
    return (offset * values.astype(np.int64).sum(axis=1)).astype(np.int32)


def register_intrinsics() -> None:
    """Register the group multiply-add tensor intrinsics with TVM (once per process)."""
    for (precision, lanes), name in INTRINSICS.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *_intrinsic(precision, lanes))


def _value(stored, precision: str):
    """A stored X or W element as the number it multiplies with (int32, or float32 from its
    bf16 bits or its fp16 value)."""
    if precision == "fp16fml":
        return tir.Cast("float32", stored)
    if precision != "bf16":
        return tir.Cast("int32", stored)
    bits = tir.shift_left(tir.Cast("uint32", stored), tir.const(16, "uint32"))
    return tir.reinterpret("float32", bits)


def _group_mac(precision: str, lanes: int, acc, words, weights):
    """``acc`` plus the group products of ``words`` and ``weights`` (``lanes`` int32 words, each
    holding one group of stored values): `vpmaddwd` + add, `sdot`, `vdpbf16ps` or `fmlal`."""
    if precision in ("int8dot", "int8vnni"):
        quads = f"int8x{4 * lanes}"
        return tir.call_llvm_pure_intrin(
            f"int32x{lanes}",
            _SDOT if precision == "int8dot" else _VPDPBUSD,
            acc,
            tir.reinterpret(f"{X_STORAGE[precision]}x{4 * lanes}", words),
            tir.reinterpret(quads, weights),
        )
    if precision == "int8":
        half = f"int16x{2 * lanes}"
        return acc + tir.call_llvm_pure_intrin(
            f"int32x{lanes}",
            _PMADDWD[lanes],
            tir.reinterpret(half, words),
            tir.reinterpret(half, weights),
        )
    extern = _FMLAL if precision == "fp16fml" else _DPBF16PS
    return tir.call_extern(f"float32x{lanes}", extern, acc, words, weights)


def _intrinsic(precision: str, lanes: int):
    storage, accumulator = STORAGE[precision], ACCUMULATOR[precision]
    vector, group, x_storage = f"{accumulator}x{lanes}", GROUP[precision], X_STORAGE[precision]

    g_major = precision in G_MAJOR
    b_shape = (group, lanes) if g_major else (lanes, group)

    def weight(b, vi, vk):  # W's value for lane vi, group member vk
        return _value(b[vk, vi] if g_major else b[vi, vk], precision)

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((group,), x_storage, offset_factor=1),
        b: T.Buffer(b_shape, storage, offset_factor=1),
        c: T.Buffer((lanes,), accumulator, offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:group], b[0 : b_shape[0], 0 : b_shape[1]])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + _value(a[vk], precision) * weight(b, vi, vk)

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((group,), x_storage, offset_factor=1),
        b: T.Buffer(b_shape, storage, offset_factor=1),
        c: T.Buffer((lanes,), accumulator, offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:group], b[0 : b_shape[0], 0 : b_shape[1]])
            T.writes(c[0:lanes])
            word = T.reinterpret(a.vload([0], f"{x_storage}x{group}"), dtype="int32")
            c[T.ramp(T.int32(0), 1, lanes)] = _group_mac(
                precision,
                lanes,
                c.vload([0], dtype=vector),
                T.broadcast(word, lanes),
                T.reinterpret(
                    b.vload([0, 0], dtype=f"{storage}x{group * lanes}"), dtype=f"int32x{lanes}"
                ),
            )

    return desc, impl


def _check(precision: str, lanes: int) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if lanes not in LANES[precision]:
        raise ValueError(f"{precision} kernels take lanes {LANES[precision]}, not {lanes}")


# -- weights ------------------------------------------------------------------------------------


def stored(values: np.ndarray, precision: str) -> np.ndarray:
    """Values as ``precision``'s kernels store them: int8 -> int16 (x86's int8), int8 as it is
    (int8dot, int8vnni); bf16 bits (uint16) and fp16 values as they are."""
    half = HALF_OF.get(precision)
    want = HALF_DTYPES[half] if half else "int8"
    if values.dtype != np.dtype(want):
        raise TypeError(f"{precision} kernels take {want} values, not {values.dtype}")
    return values.astype(STORAGE[precision], copy=False)  # W's storage (X's may differ)


def pack_dense(values: np.ndarray, lanes: int, precision: str) -> np.ndarray:
    """(N, K) int8 values, bf16 bits or fp16 values -> (N / L, K / G, L, G) panels ((N / L, K / G,
    G, L) for the ``G_MAJOR`` variants; N % L == 0, K % G == 0)."""
    n, k = values.shape
    g = GROUP[precision]
    order = (0, 2, 3, 1) if precision in G_MAJOR else (0, 2, 1, 3)
    return np.ascontiguousarray(
        stored(values, precision).reshape(n // lanes, lanes, k // g, g).transpose(order)
    )


@dataclass(frozen=True)
class PairedBSRWeight:
    """The kept blocks of an int8, bf16 or fp16 weight: ``data`` (nnzb, cols / G, rows, G) in the
    stored dtype (G-major variants: each vector of ``lanes`` rows' G x L values stored G-major),
    with the BSR ``indices``/``indptr`` of `vitsparse.schedules.bsr`."""

    shape: tuple[int, int]
    block: tuple[int, int]
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray


def pack_bsr(
    values: np.ndarray,
    kept: np.ndarray,
    block: tuple[int, int],
    precision: str,
    lanes: int | None = None,
) -> PairedBSRWeight:
    """Pack the kept ``rows x cols`` blocks of the (N, K) int8 values, bf16 bits or fp16 values
    ``values`` for ``precision``'s kernels (``kept``: the (N / rows, K / cols) block bitmap;
    ``lanes``, the kernel's, needed by the G-major variants)."""
    n, k = values.shape
    rows, cols = block
    g = GROUP[precision]
    values = stored(values, precision)
    blocks = values.reshape(n // rows, rows, k // cols, cols // g, g)
    r_idx, c_idx = np.nonzero(kept)
    data = blocks.transpose(0, 2, 3, 1, 4)[r_idx, c_idx]  # (nnzb, cols / G, rows, G)
    if precision in G_MAJOR:
        if lanes is None:
            raise ValueError(f"{precision} blocks are packed per vector: give the kernel's lanes")
        nnzb, words = data.shape[:2]
        data = data.reshape(nnzb, words, rows // lanes, lanes, g).transpose(0, 1, 2, 4, 3)
        data = data.reshape(nnzb, words, rows, g)  # the same words, G-major per vector
    data = np.ascontiguousarray(data)
    indices = c_idx.astype(np.int32)
    if data.shape[0] == 0:  # buffers cannot be empty
        data = np.zeros((1, cols // g, rows, g), values.dtype)
        indices = np.zeros(1, np.int32)
    indptr = np.zeros(n // rows + 1, np.int32)
    np.cumsum(kept.sum(axis=1), out=indptr[1:])
    return PairedBSRWeight((n, k), (rows, cols), data, indices, indptr)


# -- dense --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedDenseShape:
    """One dense workload: M rows, K inputs (a multiple of the group), N outputs (a multiple of
    ``lanes``)."""

    m: int
    k: int
    n: int
    epilogue: str = "none"
    row_tile: int = 6
    lanes: int = 8
    precision: str = "int8"

    def __post_init__(self):
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue {self.epilogue!r} is not one of {EPILOGUES}")
        _check(self.precision, self.lanes)
        group = GROUP[self.precision]
        if self.n % self.lanes or self.k % group:
            raise ValueError(
                f"N={self.n} must be a multiple of {self.lanes}, K={self.k} of {group}"
            )

    @property
    def padded_m(self) -> int:
        return math.ceil(self.m / self.row_tile) * self.row_tile


def _epilogue(acc, comp, scale, bias, m: int, n: int, epilogue: str):
    gelu = epilogue == "gelu"

    def sums(i, j):  # the exact sums, less X's offset where the variant has one
        return acc[i, j] if comp is None else acc[i, j] - comp[j]

    pre = te.compute(
        (m, n),
        lambda i, j: sums(i, j).astype("float32") * scale[j] + bias[j],
        name="dequant" if gelu else "epilogue",
    )
    if not gelu:
        return pre
    # Exact-erf GELU with TVM's fast erf, as the fp32 kernels.
    erf = topi.fast_erf(te.compute((m, n), lambda i, j: pre[i, j] * 0.7071067811865476))
    return te.compute((m, n), lambda i, j: pre[i, j] * (0.5 + 0.5 * erf[i, j]), name="epilogue")


def dense_primfunc(shape: PairedDenseShape) -> tir.PrimFunc:
    """Unscheduled PrimFunc (X, Wp, [C,] S, B) -> Y for one dense workload (C, the offset's
    compensation, for the variants in ``OFFSET``)."""
    m, k_dim, n, lanes, precision = shape.m, shape.k, shape.n, shape.lanes, shape.precision
    storage, g = STORAGE[precision], GROUP[precision]
    x = te.placeholder((m, k_dim), X_STORAGE[precision], name="X")
    g_major = precision in G_MAJOR
    panel = (g, lanes) if g_major else (lanes, g)
    w = te.placeholder((n // lanes, k_dim // g, *panel), storage, name="W")

    def weight(j, k):
        if g_major:
            return w[j // lanes, k // g, k % g, j % lanes]
        return w[j // lanes, k // g, j % lanes, k % g]

    scale = te.placeholder((n,), "float32", name="S")
    bias = te.placeholder((n,), "float32", name="B")
    k = te.reduce_axis((0, k_dim), "k")
    acc = te.compute(
        (shape.padded_m, n),
        lambda i, j: te.sum(
            _value(x[te.min(i, m - 1), k], precision) * _value(weight(j, k), precision),
            axis=k,
        ),
        name="dense",
    )
    comp = te.placeholder((n,), "int32", name="C") if precision in OFFSET else None
    y = _epilogue(acc, comp, scale, bias, m, n, shape.epilogue)
    consts = [w, scale, bias] if comp is None else [w, comp, scale, bias]
    func = te.create_prim_func([x, *consts, y]).without_attr("global_symbol")
    return func.with_attrs(
        {
            KERNEL_ATTR: DENSE_KERNELS[precision],
            "vitsparse.row_tile": shape.row_tile,
            "vitsparse.epilogue": shape.epilogue,
            "vitsparse.lanes": lanes,
        }
    )


def _precision_of(func, kernels: dict) -> str | None:
    if not isinstance(func, tir.PrimFunc) or func.attrs is None:
        return None
    kind = func.attrs.get(KERNEL_ATTR)
    return next((p for p, name in kernels.items() if kind == name), None)


def dense_shape_of(func: tir.PrimFunc) -> PairedDenseShape:
    x_buf, y_buf = func.params[0], func.params[-1]
    return PairedDenseShape(
        m=int(x_buf.shape[0]),
        k=int(x_buf.shape[1]),
        n=int(y_buf.shape[1]),
        epilogue=str(func.attrs["vitsparse.epilogue"]),
        row_tile=int(func.attrs["vitsparse.row_tile"]),
        lanes=int(func.attrs["vitsparse.lanes"]),
        precision=_precision_of(func, DENSE_KERNELS),
    )


@dataclass(frozen=True)
class PairedDenseKnobs:
    col_vectors: int  # vectors of ``lanes`` accumulators per register tile
    k_unroll: int  # k groups per unrolled step


def default_dense_knobs(shape: PairedDenseShape) -> PairedDenseKnobs:
    """~12-16 accumulator registers: row_tile x col_vectors, as wide as N allows."""
    vectors = shape.n // shape.lanes
    col = max(1, min(2 if shape.lanes == 16 else 4, 16 // shape.row_tile))
    while vectors % col:
        col -= 1
    groups = shape.k // GROUP[shape.precision]
    unroll = next(u for u in (4, 2, 1) if groups % u == 0)
    return PairedDenseKnobs(col_vectors=col, k_unroll=unroll)


def schedule_dense_cpu(sch: Schedule, knobs: PairedDenseKnobs | None = None) -> None:
    """The CPU template on the dense kernel in ``sch`` (``knobs`` None: sampled)."""
    register_intrinsics()
    shape = dense_shape_of(sch.mod["main"])
    lanes = shape.lanes
    col_vectors = None if knobs is None else knobs.col_vectors
    acc = dense.tile_output(sch, shape.row_tile, lanes, shape.n // lanes, col_vectors)
    a_i, a_j, a_k = sch.get_loops(acc)[-3:]
    a_v, a_lane = sch.split(a_j, [None, lanes])
    group = GROUP[shape.precision]
    k_group, k_in = sch.split(a_k, [None, group])
    k_dec = None if knobs is None else [shape.k // group // knobs.k_unroll, knobs.k_unroll]
    k_o, k_u = sch.split(
        k_group, sch.sample_perfect_tile(k_group, n=2, max_innermost_factor=8, decision=k_dec)
    )
    sch.reorder(k_o, k_u, a_i, a_v, a_lane, k_in)
    init = sch.decompose_reduction(acc, k_o)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(a_lane, INTRINSICS[(shape.precision, lanes)])
    sch.unroll(a_v)
    sch.unroll(a_i)
    sch.unroll(k_u)
    if shape.precision in IMPORTS:  # the parallel loop: linked once per kernel
        loop = sch.get_loops(sch.get_sblock("epilogue"))[0]
        sch.annotate(loop, IMPORT_PRAGMA, IMPORTS[shape.precision])


def is_dense_kernel(func) -> bool:
    return _precision_of(func, DENSE_KERNELS) is not None


def scheduled_dense(shape: PairedDenseShape, knobs: PairedDenseKnobs | None = None) -> tir.PrimFunc:
    """The dense kernel of ``shape`` with its default schedule, as ``main``."""
    sch = Schedule(dense_primfunc(shape).with_attr("global_symbol", "main"))
    schedule_dense_cpu(sch, knobs or default_dense_knobs(shape))
    return sch.mod["main"]


# -- BSR ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedBSRShape:
    """One BSR workload: M rows, K inputs, N outputs, the block, the stored block count."""

    m: int
    k: int
    n: int
    block: tuple[int, int]
    nnzb: int
    row_tile: int = 4
    lanes: int = 8
    precision: str = "int8"

    def __post_init__(self):
        _check(self.precision, self.lanes)
        rows, cols = self.block
        group = GROUP[self.precision]
        if rows % self.lanes or cols % group or self.n % rows or self.k % cols:
            raise ValueError(
                f"block {rows}x{cols} on {self.n}x{self.k}: rows must be a multiple of "
                f"{self.lanes} lanes, cols of {group}, and the block must tile the weight"
            )

    @property
    def padded_m(self) -> int:
        return math.ceil(self.m / self.row_tile) * self.row_tile


def bsr_lanes(precision: str, lanes: int, block: tuple[int, int], k: int) -> int:
    """The lanes of the BSR kernel of ``precision`` for ``block`` on a K-input weight, given the
    target's widest ``lanes``; 0 where no BSR kernel fits (block rows not a multiple of a lane
    width, block columns or K not a multiple of the group)."""
    rows, cols = block
    if cols % GROUP[precision] or k % GROUP[precision]:
        return 0
    fits = [width for width in LANES[precision] if width <= lanes and rows % width == 0]
    return max(fits, default=0)


def choose_bsr_row_tile(rows: int, lanes: int, m: int) -> int:
    """Register-tile height: ``tile x rows / L`` accumulators in ~12 of 16 (AVX2) or 24 of 32
    (AVX-512) registers, at most 16 rows, the height among the top three that pads ``m`` least.
    Tall tiles matter: each row's sums are one dependency chain, and 6 chains left the 16-row
    blocks' kernels waiting on `vdpbf16ps`/`vpdpwssd` latency (on a znver4, 16 rows took about
    half the time of 6 on deit_tiny's fc1 at 50%)."""
    budget = 12 if lanes == 8 else 24  # NEON (4 lanes) has 32 registers, as AVX-512
    tile = max(1, min(16, budget // (rows // lanes)))
    candidates = range(max(1, tile - 2), tile + 1)
    return min(candidates, key=lambda t: (math.ceil(m / t) * t - m, -t))


def bsr_primfunc(shape: PairedBSRShape) -> tir.PrimFunc:
    """The scheduled BSR kernel (X, data, indices, indptr, [C,] S, B) -> Y; X has ``padded_m``
    rows (the rows past M are read, never written back); C as in `dense_primfunc`."""
    m, k, n, lanes, precision = shape.m, shape.k, shape.n, shape.lanes, shape.precision
    rows, cols = shape.block
    group = GROUP[precision]
    words, vectors, tile = cols // group, rows // lanes, shape.row_tile
    k_words, padded_m = k // group, shape.padded_m
    tiles, block_rows, nnzb = shape.padded_m // tile, n // rows, shape.nnzb
    storage, accumulator = STORAGE[precision], ACCUMULATOR[precision]
    x_storage, offset = X_STORAGE[precision], precision in OFFSET
    zero = tir.const(0, accumulator)

    def sums(value, comp, column):  # the exact sums, less X's offset where the variant has one
        return value - comp[column] if offset else value

    @T.macro
    def compute(x, data, indices, indptr, comp, scale, bias, y):
        x32 = T.decl_buffer((padded_m * k_words,), "int32", data=x.data)
        w32 = T.decl_buffer((nnzb * words * rows,), "int32", data=data.data)
        for task in T.parallel(tiles * block_rows):
            acc = T.decl_buffer((tile * rows,), accumulator, scope="local")
            t = task // block_rows
            r = task % block_rows
            for i in T.unroll(tile):
                for v in T.unroll(vectors):
                    acc[T.ramp((i * vectors + v) * lanes, 1, lanes)] = T.broadcast(zero, lanes)
            for b in T.serial(indptr[r], indptr[r + 1]):
                c = indices[b]
                for p in T.unroll(words):  # a weight vector loaded once, for every row of the tile
                    for v in T.unroll(vectors):
                        weights = w32[T.ramp((b * words + p) * rows + v * lanes, 1, lanes)]
                        for i in T.unroll(tile):
                            # X's int32 word (row, column group): a constant offset from the
                            # task's row and the block's column (X comes padded to whole tiles)
                            word = T.broadcast(x32[(t * tile + i) * k_words + c * words + p], lanes)
                            base = (i * vectors + v) * lanes
                            acc[T.ramp(base, 1, lanes)] = _group_mac(
                                precision, lanes, acc[T.ramp(base, 1, lanes)], word, weights
                            )
            # Unrolled, and read in the same lanes-wide vectors the sums were added in: then
            # LLVM keeps the sums in registers (mixed vector widths would pin them in memory).
            for i in T.unroll(tile):
                if t * tile + i < m:
                    for v in T.unroll(vectors):
                        for lane in T.vectorized(lanes):
                            # (a name bound inside the vectorized loop would not vectorize)
                            y[t * tile + i, r * rows + v * lanes + lane] = (
                                T.cast(
                                    sums(
                                        acc[(i * vectors + v) * lanes + lane],
                                        comp,
                                        r * rows + v * lanes + lane,
                                    ),
                                    "float32",
                                )
                                * scale[r * rows + v * lanes + lane]
                                + bias[r * rows + v * lanes + lane]
                            )

    # One body, two signatures: C only where the variant offsets X.
    if offset:

        @T.prim_func(s_tir=True)
        def kernel(
            x: T.Buffer((padded_m, k), x_storage),
            data: T.Buffer((nnzb, words, rows, group), storage),
            indices: T.Buffer((nnzb,), "int32"),
            indptr: T.Buffer((block_rows + 1,), "int32"),
            comp: T.Buffer((n,), "int32"),
            scale: T.Buffer((n,), "float32"),
            bias: T.Buffer((n,), "float32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr({"tirx.noalias": True})
            compute(x, data, indices, indptr, comp, scale, bias, y)

    else:

        @T.prim_func(s_tir=True)
        def kernel(
            x: T.Buffer((padded_m, k), x_storage),
            data: T.Buffer((nnzb, words, rows, group), storage),
            indices: T.Buffer((nnzb,), "int32"),
            indptr: T.Buffer((block_rows + 1,), "int32"),
            scale: T.Buffer((n,), "float32"),
            bias: T.Buffer((n,), "float32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr({"tirx.noalias": True})
            compute(x, data, indices, indptr, None, scale, bias, y)

    if precision in IMPORTS:  # link the LLVM IR multiply-add in, once per kernel
        pragma = tvm.ir.StringImm(IMPORTS[precision])
        kernel = kernel.with_body(
            tir.AttrStmt(tir.const(0, "int32"), IMPORT_PRAGMA, pragma, kernel.body)
        )
    return kernel.without_attr("global_symbol").with_attrs(
        {
            KERNEL_ATTR: BSR_KERNELS[precision],
            "tirx.is_scheduled": True,
            "vitsparse.row_tile": tile,
            "vitsparse.lanes": lanes,
        }
    )


def is_bsr_kernel(func) -> bool:
    return _precision_of(func, BSR_KERNELS) is not None
