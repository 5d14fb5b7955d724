"""LowerLinear: linear layers with constant weights -> call_tir of the packed dense kernel.

Matches, in every Relax function of the module,

    y = add(matmul(x, permute_dims(W)), b)        (torch.export; either add operand order)
    y = add(matmul(x, W_t), b)                    (ONNX: the weight is stored transposed)
    g = gelu(reshape*(y))                         (optional GELU epilogue, fused when y has no
                                                   other user)

where W and b are constants (run after BindParams), and replaces them with one call_tir of
``schedules.dense`` with the weight packed at compile time. x may have any rank >= 2; it is
viewed as (rows, K). A layer whose output width is not a multiple of the packing panel (a
pruned width such as 42 or 170, or a 10-class head) gets its weight and bias padded with zero
rows to the next multiple and its output sliced back (the slice fuses into what follows): TVM's
generic matmul, the alternative, runs such layers several times slower. A layer with a single
input feature (an MLP pruned to one neuron) has no reduction loop to schedule and stays as it is.

A layer whose input AnnotateQuantization fake-quantized becomes the int8 kernel of
``schedules.paired`` instead (with ``int8_lanes``, the target's `vpmaddwd` or `sdot` width): the
weight is quantized per output channel at compile time (`plan.quantize.quantize_weight`), the
input's integers are stored as the kernel variant takes them (`_rewrite.stored_input`: int16
pairs, uint8 quads offset by 128 with VNNI, int8 quads on ARM; padded to whole groups), and the
kernel dequantizes its int32 sums with ``S = s_x * s_w``. With ``half`` "bf16" or "fp16", a
layer whose input AnnotateHalf rounded becomes that precision's kernel (bf16's `vdpbf16ps`,
fp16's `fmlal` on ARM): the weight rounded at compile time (`plan.quantize.half_values`), the
input's half tensor as the kernel stores it (bf16 viewed as its uint16 bits), ``S = 1``. Both
are opaque to FuseOps (their producers, the quantization or rounding, fuse with whatever
precedes them instead).

On a GPU (``gpu_precision`` "int8" or "fp16") the annotated layers become typed Relax matmuls,
which dlight's Matmul puts on the tensor cores (`schedules.gpu_rules`), and the other layers stay
as they are: fp16, ``matmul(x16, W16^T, out_dtype="float32") + b`` (the weight rounded at compile
time); int8, ``astype(matmul(xq, Wq^T, out_dtype="int32"), "float32") * S + b``, ``xq`` the
fake-quantized integers as int8, ``Wq`` the weight quantized per output channel as on CPUs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
from vitsparse.schedules import dense, paired

OPAQUE = 8  # relay's kOpaque op pattern: FuseOps fuses nothing into or after it


def _opaque(func):
    return func.with_attr("op_pattern", OPAQUE)


@dataclass
class _Linear:
    x: relax.Expr
    weight: np.ndarray  # (N, K)
    bias: np.ndarray  # (N,)
    out_shape: tuple[int, ...]


@relax.expr_functor.mutator
class _LowerLinearMutator(relax.PyExprMutator):
    def __init__(
        self, mod, int8_lanes: int = 0, half: str = "", int8_kernels="int8", gpu_precision=""
    ):
        super().__init__(mod)
        self.kernels: dict = {}
        self.int8_lanes = int8_lanes
        self.int8_kernels = int8_kernels
        self.half = half  # "bf16", "fp16" or "" (`_rewrite.half_input`)
        self.gpu_precision = gpu_precision  # "int8", "fp16" or "" (a CPU target)

    # -- matching -----------------------------------------------------------------------------
    def _binding(self, expr):
        return bound_value(self, expr)

    def _is_call(self, expr, name):
        return op_call(expr, name) is not None

    def _match_weight(self, rhs) -> np.ndarray | None:
        rhs = self._binding(rhs)
        if self._is_call(rhs, "relax.permute_dims"):
            w = const_array(self._binding(rhs.args[0]))
            axes = rhs.attrs.axes
            if w is not None and w.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                return w
            return None
        w_t = const_array(rhs)
        return None if w_t is None or w_t.ndim != 2 else np.ascontiguousarray(w_t.T)

    def _match_linear(self, call) -> _Linear | None:
        if not self._is_call(call, "relax.add"):
            return None
        for mm_arg, b_arg in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            bias = const_array(self._binding(b_arg))
            mm = self._binding(mm_arg)
            if bias is None or not self._is_call(mm, "relax.matmul"):
                continue
            weight = self._match_weight(mm.args[1])
            if weight is None or bias.shape != (weight.shape[0],):
                continue
            if (
                str(mm.attrs.out_dtype) not in ("", "void", "None", "float32")
                or weight.dtype != np.float32
            ):
                continue
            x_shape = struct_shape(mm.args[0])
            if len(x_shape) < 2 or x_shape[-1] != weight.shape[1]:
                continue
            return _Linear(mm.args[0], weight, bias, (*x_shape[:-1], weight.shape[0]))
        return None

    # -- rewriting ----------------------------------------------------------------------------
    def _kernel(self, shape: dense.DenseShape, padded: bool = False):
        if ("fp32", shape, padded) not in self.kernels:
            func = dense.dense_primfunc(shape)
            if padded:  # FuseTIR cannot fuse the slice back into the kernel: keep it apart
                func = _opaque(func)
            name = f"dense_{shape.epilogue}{'_padded' if padded else ''}"
            self.kernels[("fp32", shape, padded)] = self.builder_.add_func(func, name)
        return self.kernels[("fp32", shape, padded)]

    def _emit_linear(self, lin: _Linear, epilogue: str):
        n, k = lin.weight.shape
        padded = -(-n // dense.PANEL) * dense.PANEL
        weight, bias = lin.weight, lin.bias
        if padded != n:
            weight = np.concatenate([weight, np.zeros((padded - n, k), weight.dtype)])
            bias = np.concatenate([bias, np.zeros(padded - n, bias.dtype)])
        rows = int(np.prod(lin.out_shape[:-1]))
        shape = dense.DenseShape(rows, k, padded, epilogue, dense.choose_row_tile(rows))
        x2d = lin.x
        if len(struct_shape(lin.x)) != 2:
            x2d = self.builder_.emit(relax.op.reshape(lin.x, (rows, k)))
        out = relax.call_tir(
            self._kernel(shape, padded != n),
            [x2d, relax.const(dense.pack_weight(weight)), relax.const(bias)],
            relax.TensorType((rows, padded), "float32"),
        )
        if padded != n:
            out = relax.op.strided_slice(self.builder_.emit(out), axes=[1], begin=[0], end=[n])
        if len(lin.out_shape) == 2:
            return out
        return relax.op.reshape(self.builder_.emit(out), lin.out_shape)

    def _emit_int8(self, lin: _Linear, q_input, activation_scale: float):
        q, w_scale = quantize_weight(lin.weight)
        kernels = self.int8_kernels
        x = self.builder_.emit(stored_input(q_input, kernels))
        scale = dequant_scales(activation_scale, w_scale)
        return self._emit_paired(lin, kernels, self.int8_lanes, x, q, scale)

    def _emit_half(self, lin: _Linear, half_x):
        x = self.builder_.emit(half_stored(half_x, self.half))
        scale = np.ones(lin.weight.shape[0], np.float32)
        kernels = paired.HALF_VARIANTS[self.half]
        values = half_values(lin.weight, self.half)
        return self._emit_paired(lin, kernels, paired.LANES[kernels][0], x, values, scale)

    def _emit_paired(self, lin: _Linear, precision: str, lanes: int, x, values, scale):
        """The paired kernel of ``precision`` on ``x`` (the stored input) and ``values`` (the
        weight's int8 values, bf16 bits or fp16 values), its sums times ``scale`` plus the bias."""
        emit = self.builder_.emit
        n, k = lin.weight.shape
        bias = lin.bias.astype(np.float32)
        group = paired.GROUP[precision]
        n_pad, k_pad = -(-n // lanes) * lanes, -(-k // group) * group
        values = np.pad(values, ((0, n_pad - n), (0, k_pad - k)))
        scale, bias = np.pad(scale, (0, n_pad - n)), np.pad(bias, (0, n_pad - n))
        rows = int(np.prod(lin.out_shape[:-1]))
        if len(struct_shape(x)) != 2:
            x = emit(relax.op.reshape(x, (rows, k)))
        if k_pad != k:
            x = emit(relax.op.nn.pad(x, [0, 0, 0, k_pad - k]))
        tile = dense.choose_row_tile(rows)
        shape = paired.PairedDenseShape(rows, k_pad, n_pad, "none", tile, lanes, precision)
        key = (precision, shape, n_pad != n)
        if key not in self.kernels:
            func = paired.dense_primfunc(shape).with_attr("op_pattern", OPAQUE)
            self.kernels[key] = self.builder_.add_func(func, f"{precision}_dense")
        comp = paired.compensation(values, precision)
        consts = [paired.pack_dense(values, lanes, precision), comp, scale, bias]
        out = relax.call_tir(
            self.kernels[key],
            [x, *(relax.const(c) for c in consts if c is not None)],
            relax.TensorType((rows, n_pad), "float32"),
        )
        if n_pad != n:
            out = relax.op.strided_slice(emit(out), axes=[1], begin=[0], end=[n])
        if len(lin.out_shape) == 2:
            return out
        return relax.op.reshape(emit(out), lin.out_shape)

    def _emit_gpu(self, lin: _Linear):
        """The typed matmul of an annotated layer on a GPU (see the module docstring), else
        None (the layer stays as it is)."""
        emit = self.builder_.emit
        bias = relax.const(lin.bias.astype(np.float32))
        if self.gpu_precision == "int8":
            quantized = fake_quant_input(self, lin.x)
            if quantized is None:
                return None
            q, w_scale = quantize_weight(lin.weight)
            xq = emit(relax.op.astype(quantized[0], "int8"))
            weight = relax.const(np.ascontiguousarray(q.T))
            sums = emit(relax.op.matmul(xq, weight, out_dtype="int32"))
            scale = relax.const(dequant_scales(quantized[1], w_scale))
            product = emit(relax.op.multiply(emit(relax.op.astype(sums, "float32")), scale))
            return relax.op.add(product, bias)
        x16 = half_input(self, lin.x, self.gpu_precision)
        if x16 is None:
            return None
        weight = relax.const(np.ascontiguousarray(half_values(lin.weight, "fp16").T))
        return relax.op.add(emit(relax.op.matmul(x16, weight, out_dtype="float32")), bias)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        lin = self._match_linear(call)
        if lin is not None and self.gpu_precision:
            lowered = self._emit_gpu(lin)
            return call if lowered is None else lowered
        # A single input feature (an MLP pruned to one neuron) has no reduction loop to
        # schedule: the generic path.
        if lin is None or lin.weight.shape[1] < 2:
            return call
        quantized = fake_quant_input(self, lin.x) if self.int8_lanes else None
        if quantized is not None:
            return self._emit_int8(lin, *quantized)
        rounded = half_input(self, lin.x, self.half) if self.half else None
        if rounded is not None:
            return self._emit_half(lin, rounded)
        return self._emit_linear(lin, "none")


@tvm.transform.module_pass(opt_level=0, name="vitsparse.LowerLinear")
class LowerLinear:
    """Rewrite constant-weight linear layers (+ optional GELU) into packed dense kernels; int8
    kernels for fake-quantized inputs where ``int8_lanes`` is set, bf16 or fp16 kernels for
    inputs rounded to ``half`` ("bf16" or "fp16"). ``gpu_precision`` ("int8" or "fp16"): a GPU
    target's pass, rewriting that precision's annotated layers alone (module docstring)."""

    def __init__(
        self,
        int8_lanes: int = 0,
        half: str = "",
        int8_kernels: str = "int8",
        *,
        gpu_precision: str = "",
    ):
        if gpu_precision not in ("", "int8", "fp16"):
            raise ValueError(f"GPU layers are int8 or fp16, not {gpu_precision!r}")
        self.int8_lanes = int8_lanes
        self.int8_kernels = int8_kernels
        self.half = half
        self.gpu_precision = gpu_precision

    def transform_module(self, mod, _ctx):
        kernels: dict = {}

        def first(m):
            mutator = _LowerLinearMutator(
                m, self.int8_lanes, self.half, self.int8_kernels, self.gpu_precision
            )
            mutator.kernels = kernels
            return mutator

        mod = rewrite_relax_functions(mod, first)
        by_gvar = {gv: key for key, gv in kernels.items() if not key[-1]}

        def gelu_variant(gvar):
            key = by_gvar.get(gvar)
            if key is None or key[-2].epilogue != "none":
                return None
            shape = dataclasses.replace(key[-2], epilogue="gelu")
            if key[0] in paired.PRECISIONS:
                make = lambda: _opaque(paired.dense_primfunc(shape))  # noqa: E731
                return (key[0], shape), make, f"{key[0]}_dense_gelu"
            return shape, lambda: dense.dense_primfunc(shape), "dense_gelu"

        mod = rewrite_relax_functions(mod, lambda m: FuseGeluEpilogue(m, gelu_variant))
        return relax.transform.DeadCodeElimination()(mod)
