"""One dense or BSR linear kernel as it is measured on its own (a cost table's kernel points,
the break-even density of a layer shape, the kernel benchmark): the kernel with its hand-written
schedule, the arguments to run it on (random input, weights and bias; the weights packed, or
masked to the density and stored as BSR), and the output it must write (numpy's)."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from vitsparse._tvm import IRModule, Schedule
from vitsparse.plan.quantize import half_values
from vitsparse.schedules import bsr, dense, paired


@dataclass(frozen=True)
class KernelCase:
    """A scheduled kernel (``main`` writes its last argument), its arguments, the output it must
    write, and the kept fraction of the weight's blocks (1.0 for dense)."""

    mod: IRModule
    args: list[np.ndarray]
    expected: np.ndarray
    density: float

    def error(self, output: np.ndarray) -> float:
        """Largest absolute difference of ``output`` from `expected`."""
        return float(np.abs(np.asarray(output) - self.expected).max())


def dense_case(m: int, k: int, n: int, target, *, seed: int = 0) -> KernelCase:
    """The packed dense kernel for an (m, k) input and an (n, k) weight."""
    x, w, b, y = _operands(m, k, n, seed)
    shape = dense.DenseShape(m, k, n, "none", dense.choose_row_tile(m))
    sch = Schedule(dense.dense_primfunc(shape).with_attr("global_symbol", "main"))
    dense.schedule_dense_cpu(sch, dense.default_knobs(shape))
    return KernelCase(sch.mod, [x, dense.pack_weight(w), b, y], x @ w.T + b, 1.0)


def bsr_case(
    m: int, k: int, n: int, block: tuple[int, int], density: float, target, *, seed: int = 0
) -> KernelCase:
    """The BSR kernel for an (n, k) weight keeping ``round(density * blocks)`` of its blocks (at
    least one), drawn at random."""
    x, w, b, y = _operands(m, k, n, seed)
    packed = bsr.to_bsr(w, _random_blocks(n, k, block, density, seed), tuple(block))
    shape = bsr.BSRShape.of(m, packed, target=target)
    mod = IRModule({"main": bsr.scheduled_cpu(shape, target)})
    args = [x, packed.data, packed.indices, packed.indptr, b, y]
    return KernelCase(mod, args, x @ packed.to_dense().T + b, packed.density)


def paired_dense_case(
    m: int, k: int, n: int, lanes: int, precision: str = "int8", *, seed: int = 0
) -> KernelCase:
    """The int8, bf16 or fp16 dense kernel (``lanes`` wide) for an (m, k) input and (n, k)
    weight."""
    x, q, scale, b, y = _paired_operands(m, k, n, precision, seed)
    tile = dense.choose_row_tile(m)
    shape = paired.PairedDenseShape(m, k, n, "none", tile, lanes, precision)
    mod = IRModule({"main": paired.scheduled_dense(shape)})
    comp = paired.compensation(q, precision)
    consts = [paired.pack_dense(q, lanes, precision), comp, scale, b]
    args = [x, *(c for c in consts if c is not None), y]
    return KernelCase(mod, args, _paired_expected(x, q, scale, b, precision), 1.0)


def paired_bsr_case(
    m: int,
    k: int,
    n: int,
    block: tuple[int, int],
    density: float,
    lanes: int,
    precision: str = "int8",
    *,
    seed: int = 0,
) -> KernelCase:
    """The int8, bf16 or fp16 BSR kernel for an (n, k) weight keeping ``round(density * blocks)`` of
    its blocks (at least one), drawn as `bsr_case` draws them."""
    lanes = paired.bsr_lanes(precision, lanes, tuple(block), k)
    x, q, scale, b, y = _paired_operands(m, k, n, precision, seed)
    kept = _random_blocks(n, k, block, density, seed)
    packed = paired.pack_bsr(q, kept, tuple(block), precision, lanes)
    tile = paired.choose_bsr_row_tile(block[0], lanes, m)
    nnzb = packed.data.shape[0]
    shape = paired.PairedBSRShape(m, k, n, tuple(block), nnzb, tile, lanes, precision)
    mod = IRModule({"main": paired.bsr_primfunc(shape).with_attr("global_symbol", "main")})
    x_padded = np.pad(x, ((0, shape.padded_m - m), (0, 0)))
    masked = np.where(np.kron(kept, np.ones(block, dtype=bool)), q, np.zeros_like(q))
    comp = paired.compensation(masked, precision)
    consts = [packed.data, packed.indices, packed.indptr, comp, scale, b]
    args = [x_padded, *(c for c in consts if c is not None), y]
    expected = _paired_expected(x, masked, scale, b, precision)
    return KernelCase(mod, args, expected, float(kept.mean()))


def check_kernel(case: KernelCase, output: np.ndarray, what: str, rtol: float = 1e-4) -> None:
    """RuntimeError unless ``output`` is the case's expected output to within ``rtol`` of its
    largest magnitude (float32 sums over K inputs drift; a wrong kernel is off by the values
    themselves). A timing of a wrong kernel is worth nothing."""
    error = case.error(output)
    scale = max(1.0, float(np.abs(case.expected).max()))
    if not error <= rtol * scale:
        raise RuntimeError(
            f"kernel {what} computed a wrong result (max error {error:.2e}, scale {scale:.1f})"
        )


def _operands(m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    return x, w, b, np.zeros((m, n), np.float32)


def _random_blocks(n: int, k: int, block, density: float, seed: int) -> np.ndarray:
    grid = (n // block[0], k // block[1])
    kept = np.zeros(grid[0] * grid[1], dtype=bool)
    order = np.random.default_rng([seed, 1]).permutation(kept.size)
    kept[order[: max(1, round(density * kept.size))]] = True
    return kept.reshape(grid)


def _paired_operands(m: int, k: int, n: int, precision: str, seed: int):
    """(x, weight values, scale, bias, output): int8 values (x stored as ``precision``'s kernels
    store it, the weight as int8), bf16 bits or fp16 values."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(n, dtype=np.float32)
    half = paired.HALF_OF.get(precision)
    if half:
        x = half_values(rng.standard_normal((m, k), dtype=np.float32), half)
        q = half_values(rng.standard_normal((n, k), dtype=np.float32), half)
        return x, q, np.ones(n, np.float32), b, np.zeros((m, n), np.float32)
    x = rng.integers(-127, 128, (m, k)) + paired.OFFSET.get(precision, 0)
    x = x.astype(paired.X_STORAGE[precision])
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scale = (rng.random(n) * 1e-4).astype(np.float32)
    return x, q, scale, b, np.zeros((m, n), np.float32)


def _values(stored: np.ndarray) -> np.ndarray:
    """Stored int8 values, bf16 bits or fp16 values as float64 numbers."""
    if stored.dtype == np.uint16:
        return stored.view(ml_dtypes.bfloat16).astype(np.float64)
    return stored.astype(np.float64)  # int8 products and their sums are exact in float64


def _paired_expected(x, q, scale, b, precision: str) -> np.ndarray:
    values = _values(x) - paired.OFFSET.get(precision, 0)
    return ((values @ _values(q).T) * scale + b).astype(np.float32)
