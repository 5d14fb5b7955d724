"""BlockSparsify: block-masked linear layers -> call_tir of the BSR kernel.

Reads the annotations AnnotatePruning wrote (after BindParams, so the weight is a constant):

    add(matmul(x, permute_dims(reshape(multiply(reshape(W, (N/r, r, K/c, c)), M), (N, K)))), b)

and, when the layer's density is at or below the break-even density for its shape and block size,
replaces it with one call of ``schedules.bsr`` (weight packed into BSR at compile time). A layer
above its break-even is left as it is: FoldConstant folds the mask into the weight and LowerLinear
makes it a dense kernel, so it stays correct either way. ``break_even(m, k, n, block)`` is given
by the caller, from measurements on the target (``jobs._break_even``). A GELU after the layer
becomes the kernel's epilogue. The kernels are tiled for the current target (``with target:``).

A layer whose input AnnotateQuantization fake-quantized becomes the int8 BSR kernel of
``schedules.paired`` where ``int8_lanes`` is set: its masked weight quantized per output channel
(`plan.quantize.quantize_weight`, the same values as the dense int8 path), its input's integers
stored as the kernel variant takes them (`_rewrite.stored_input`). With ``half`` "bf16" or
"fp16", a layer whose input AnnotateHalf rounded becomes that precision's BSR kernel, its kept
blocks rounded the same way. The break-even given is the precision's own (an int8, bf16 or fp16
compile measures its BSR kernel against its dense kernel where it runs on this machine).

On a GPU (``gpu_precision`` "int8" or "fp16") an annotated layer becomes the BSR kernel of
``schedules.bsr`` in that precision: int8 X and blocks (the same quantized values), int32 sums
dequantized per output feature; or float16 X and blocks, float32 sums; float32 Y either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from vitsparse._tvm import relax, struct_shape, tvm
from vitsparse.passes._rewrite import (
    FuseGeluEpilogue,
    bound_value,
    const_array,
    fake_quant_input,
    half_input,
    half_stored,
    op_call,
    rewrite_relax_functions,
    stored_input,
)
from vitsparse.plan.quantize import dequant_scales, half_values, quantize_weight
from vitsparse.schedules import bsr, paired

OPAQUE = 8  # relay's kOpaque op pattern: FuseOps fuses nothing into or after it

BreakEven = Callable[[int, int, int, tuple[int, int]], float]


def block_name(shape: bsr.BSRShape) -> str:
    """``32x32``, with the storage type where it is not float32 (``32x32_int8``)."""
    suffix = {"float32": "", "float16": "_fp16", "int8": "_int8"}[shape.dtype]
    return f"{shape.block[0]}x{shape.block[1]}{suffix}"


def _quantize_kept(weight: np.ndarray, kept: np.ndarray, block: tuple[int, int]):
    """The int8 values and per-output-channel scales of ``weight`` with its pruned blocks
    zeroed (what the reference quantizes: the plan applied first)."""
    element_kept = np.kron(kept, np.ones(block, dtype=bool))
    return quantize_weight(np.where(element_kept, weight, 0))


@relax.expr_functor.mutator
class _BlockSparsifyMutator(relax.PyExprMutator):
    def __init__(
        self,
        mod,
        break_even: BreakEven,
        decisions: list,
        kernels: dict,
        lanes: int,
        half: str,
        int8_kernels: str = "int8",
        gpu_precision: str = "",
    ):
        super().__init__(mod)
        self.gpu_precision = gpu_precision  # "int8", "fp16" or "" (a CPU target, or fp32)
        self.break_even = break_even
        self.decisions = decisions
        self.kernels = kernels  # GlobalVar -> BSRShape of the (float) kernels added
        self.int8_lanes = lanes
        self.int8_kernels = int8_kernels
        self.half = half  # "bf16", "fp16" or "" (`_rewrite.half_input`)

    def _call(self, expr, name):
        return op_call(bound_value(self, expr), name)

    def _const(self, expr):
        return const_array(bound_value(self, expr))

    def _masked_weight(self, expr):
        """(weight (N, K), kept bitmap, block) of an annotated weight, else None."""
        transpose = self._call(expr, "relax.permute_dims")
        outer = None if transpose is None else self._call(transpose.args[0], "relax.reshape")
        product = None if outer is None else self._call(outer.args[0], "relax.multiply")
        inner = None if product is None else self._call(product.args[0], "relax.reshape")
        if inner is None:
            return None
        weight, keep = self._const(inner.args[0]), self._const(product.args[1])
        if weight is None or keep is None or weight.ndim != 2 or keep.ndim != 4:
            return None
        n, k = weight.shape
        nr, rows, nc, cols = struct_shape(inner)
        if keep.shape != (nr, 1, nc, 1) or (nr * rows, nc * cols) != (n, k):
            return None
        if not np.isin(keep, (0.0, 1.0)).all():
            return None
        return weight, keep.reshape(nr, nc).astype(bool), (rows, cols)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        add = op_call(call, "relax.add")
        if add is None:
            return call
        for mm_arg, b_arg in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
            matmul = self._call(mm_arg, "relax.matmul")
            bias = self._const(b_arg)
            if matmul is None or bias is None or bias.ndim != 1:
                continue
            found = self._masked_weight(matmul.args[1])
            if found is None:
                continue
            lowered = self._lower(matmul.args[0], bias, *found)
            return call if lowered is None else lowered
        return call

    def _lower(self, x, bias, weight, kept, block):
        n, k = weight.shape
        x_shape = struct_shape(x)
        rows = int(np.prod(x_shape[:-1]))
        density = float(kept.mean())
        limit = self.break_even(rows, k, n, block)
        decision = {"shape": (rows, k, n), "block": block, "density": density, "break_even": limit}
        self.decisions.append(decision)
        if density > limit:
            decision["kernel"] = "dense"
            return None
        decision["kernel"] = "bsr"
        if self.gpu_precision:
            lowered = self._lower_gpu(x, x_shape, rows, bias, weight, kept, block)
            if lowered is not None:
                decision["precision"] = self.gpu_precision
                return lowered
        quantized = fake_quant_input(self, x) if self.int8_lanes else None
        rounded = None
        if self.half and quantized is None:
            rounded = half_input(self, x, self.half)
        if quantized is not None or rounded is not None:
            precision = "int8" if quantized is not None else self.half
            kernels = (
                self.int8_kernels if quantized is not None else paired.HALF_VARIANTS[precision]
            )
            lanes = self.int8_lanes if quantized is not None else paired.LANES[kernels][0]
            if not paired.bsr_lanes(kernels, lanes, block, k):
                decision["kernel"] = "dense"  # no paired BSR kernel for this block
                return None
            decision["precision"] = precision
        if quantized is not None:
            return self._lower_int8(x_shape, rows, bias, weight, kept, block, *quantized)
        if rounded is not None:
            x16 = self.builder_.emit(half_stored(rounded, self.half))
            values = half_values(weight, self.half)
            scale = np.ones(weight.shape[0], np.float32)
            return self._lower_paired(
                kernels, lanes, x_shape, x16, rows, bias, values, kept, block, scale
            )
        return self._lower_bsr(x, x_shape, rows, bias, bsr.to_bsr(weight, kept, block))

    def _lower_bsr(self, x, x_shape, rows, bias, packed, scale=None):
        """The BSR kernel of ``schedules.bsr`` on ``x`` (stored as ``packed``'s blocks are) and
        ``packed``, float32 out (``scale``: the int8 kernel's dequantization)."""
        n, k = packed.shape
        shape = bsr.BSRShape.of(rows, packed, out_dtype="float32")
        name = f"bsr_{block_name(shape)}"
        gvar = self.builder_.add_func(bsr.bsr_primfunc(shape), name)
        self.kernels[gvar] = shape
        x2d = x if len(x_shape) == 2 else self.builder_.emit(relax.op.reshape(x, (rows, k)))
        consts = (packed.data, packed.indices, packed.indptr, scale, bias.astype(np.float32))
        out = relax.call_tir(
            gvar,
            [x2d, *(relax.const(a) for a in consts if a is not None)],
            relax.TensorType((rows, n), "float32"),
        )
        if len(x_shape) == 2:
            return out
        return relax.op.reshape(self.builder_.emit(out), (*x_shape[:-1], n))

    def _lower_gpu(self, x, x_shape, rows, bias, weight, kept, block):
        """A GPU's BSR kernel in ``gpu_precision`` for an annotated layer, else None."""
        if self.gpu_precision == "int8":
            quantized = fake_quant_input(self, x)
            if quantized is None:
                return None
            q, w_scale = _quantize_kept(weight, kept, block)
            xq = self.builder_.emit(relax.op.astype(quantized[0], "int8"))
            packed = bsr.to_bsr(q, kept, block, dtype="int8")
            scale = dequant_scales(quantized[1], w_scale)
            return self._lower_bsr(xq, x_shape, rows, bias, packed, scale)
        x16 = half_input(self, x, self.gpu_precision)
        if x16 is None:
            return None
        packed = bsr.to_bsr(half_values(weight, "fp16"), kept, block, dtype="float16")
        return self._lower_bsr(x16, x_shape, rows, bias, packed)

    def _lower_int8(self, x_shape, rows, bias, weight, kept, block, q_input, activation_scale):
        q, w_scale = _quantize_kept(weight, kept, block)
        lanes, kernels = self.int8_lanes, self.int8_kernels
        xq = self.builder_.emit(stored_input(q_input, kernels))
        scale = dequant_scales(activation_scale, w_scale)
        return self._lower_paired(kernels, lanes, x_shape, xq, rows, bias, q, kept, block, scale)

    def _lower_paired(self, precision, lanes, x_shape, x, rows, bias, values, kept, block, scale):
        """The paired BSR kernel of ``precision`` on ``x`` (the stored input) and the kept
        blocks of ``values`` (int8 values, bf16 bits or fp16 values), its sums times ``scale``
        plus bias."""
        emit = self.builder_.emit
        n, k = values.shape
        block_rows, cols = block
        lanes = paired.bsr_lanes(precision, lanes, block, k)
        packed = paired.pack_bsr(values, kept, block, precision, lanes)
        tile = paired.choose_bsr_row_tile(block_rows, lanes, rows)
        shape = paired.PairedBSRShape(
            rows, k, n, block, packed.data.shape[0], tile, lanes, precision
        )
        func = paired.bsr_primfunc(shape).with_attr("op_pattern", OPAQUE)
        gvar = self.builder_.add_func(func, f"{precision}_bsr_{block_rows}x{cols}")
        if len(x_shape) != 2:
            x = emit(relax.op.reshape(x, (rows, k)))
        if shape.padded_m != rows:  # whole row tiles: the kernel's loads need no clamp
            x = emit(relax.op.nn.pad(x, [0, shape.padded_m - rows, 0, 0]))
        comp = paired.compensation(values, precision)
        consts = (packed.data, packed.indices, packed.indptr, comp, scale, bias.astype(np.float32))
        out = relax.call_tir(
            gvar,
            [x, *(relax.const(a) for a in consts if a is not None)],
            relax.TensorType((rows, n), "float32"),
        )
        if len(x_shape) == 2:
            return out
        return relax.op.reshape(emit(out), (*x_shape[:-1], n))


@tvm.transform.module_pass(opt_level=0, name="vitsparse.BlockSparsify")
class BlockSparsify:
    """Lower annotated block-masked linear layers to BSR kernels where they beat dense.

    ``decisions`` (a list, filled per layer) records shape, block, density, break-even and the
    chosen kernel, so callers can report what happened.
    """

    def __init__(
        self,
        break_even: BreakEven,
        decisions: list | None = None,
        *,
        int8_lanes: int = 0,
        int8_kernels: str = "int8",
        half: str = "",
        gpu_precision: str = "",
    ):
        self.break_even = break_even
        self.gpu_precision = gpu_precision
        self.decisions = decisions if decisions is not None else []
        self.int8_lanes = int8_lanes
        self.int8_kernels = int8_kernels
        self.half = half

    def transform_module(self, mod, _ctx):
        kernels: dict = {}
        mod = rewrite_relax_functions(
            mod,
            lambda m: _BlockSparsifyMutator(
                m,
                self.break_even,
                self.decisions,
                kernels,
                self.int8_lanes,
                self.half,
                self.int8_kernels,
                self.gpu_precision,
            ),
        )

        def gelu_variant(gvar):
            shape = kernels.get(gvar)
            if shape is None or shape.epilogue != "none":
                return None
            fused = dataclasses.replace(shape, epilogue="gelu")
            name = f"bsr_{block_name(shape)}_gelu"
            return fused, lambda: bsr.bsr_primfunc(fused), name

        mod = rewrite_relax_functions(mod, lambda m: FuseGeluEpilogue(m, gelu_variant))
        return relax.transform.DeadCodeElimination()(mod)
