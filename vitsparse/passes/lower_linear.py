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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitsparse._tvm import relax, struct_shape, tvm
from vitsparse.passes._rewrite import (
    FuseGeluEpilogue,
    bound_value,
    const_array,
    op_call,
    rewrite_relax_functions,
)
from vitsparse.schedules import dense

OPAQUE = 8  # relay's kOpaque op pattern: FuseOps fuses nothing into or after it


@dataclass
class _Linear:
    x: relax.Expr
    weight: np.ndarray  # (N, K)
    bias: np.ndarray  # (N,)
    out_shape: tuple[int, ...]


@relax.expr_functor.mutator
class _LowerLinearMutator(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.kernels: dict[dense.DenseShape, tvm.ir.GlobalVar] = {}

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
        if (shape, padded) not in self.kernels:
            func = dense.dense_primfunc(shape)
            if padded:  # FuseTIR cannot fuse the slice back into the kernel: keep it apart
                func = func.with_attr("op_pattern", OPAQUE)
            name = f"dense_{shape.epilogue}{'_padded' if padded else ''}"
            self.kernels[(shape, padded)] = self.builder_.add_func(func, name)
        return self.kernels[(shape, padded)]

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

    def visit_call_(self, call):
        call = super().visit_call_(call)
        lin = self._match_linear(call)
        # A single input feature (an MLP pruned to one neuron) has no reduction loop to
        # schedule: the generic path.
        if lin is None or lin.weight.shape[1] < 2:
            return call
        return self._emit_linear(lin, "none")


@tvm.transform.module_pass(opt_level=0, name="vitsparse.LowerLinear")
class LowerLinear:
    """Rewrite constant-weight linear layers (+ optional GELU) into packed dense kernels."""

    def transform_module(self, mod, _ctx):
        kernels: dict = {}

        def first(m):
            mutator = _LowerLinearMutator(m)
            mutator.kernels = kernels
            return mutator

        mod = rewrite_relax_functions(mod, first)
        by_gvar = {gv: shape for (shape, padded), gv in kernels.items() if not padded}

        def gelu_variant(gvar):
            shape = by_gvar.get(gvar)
            if shape is None or shape.epilogue != "none":
                return None
            fused = dense.DenseShape(shape.m, shape.k, shape.n, "gelu", shape.row_tile)
            return fused, lambda: dense.dense_primfunc(fused), "dense_gelu"

        mod = rewrite_relax_functions(mod, lambda m: FuseGeluEpilogue(m, gelu_variant))
        return relax.transform.DeadCodeElimination()(mod)
