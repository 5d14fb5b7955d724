"""Shared plumbing of the mutator-based passes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vitsparse._tvm import IRModule, relax, struct_shape, tvm
from vitsparse.schedules import paired


def copy_module(mod: IRModule) -> IRModule:
    """A new IRModule holding the same functions (passes must not mutate their input)."""
    return IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)


def rewrite_relax_functions(mod: IRModule, make_mutator: Callable) -> IRModule:
    """Run ``make_mutator(module)`` over every Relax function of a copy of ``mod``; functions the
    mutator adds (kernels) come along, bindings left unused are dropped."""
    out = copy_module(mod)
    for gvar, func in list(out.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        mutator = make_mutator(out)
        new_func = mutator.visit_expr(func)
        out = copy_module(mutator.builder_.get())
        out[gvar] = relax.analysis.remove_all_unused(new_func)
    return out


def bound_value(mutator: relax.PyExprMutator, expr):
    """What a dataflow var is bound to (seen through the mutator's builder), else ``expr``."""
    if isinstance(expr, relax.Var):
        value = mutator.lookup_binding(expr)
        if value is not None:
            return value
    return expr


def op_call(expr, name: str):
    """``expr`` if it is a call of the Relax operator ``name``, else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        if expr.op.same_as(tvm.ir.Op.get(name)):
            return expr
    return None


def const_array(expr) -> np.ndarray | None:
    """The value of a Relax constant, else None."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


@relax.expr_functor.mutator
class FuseGeluEpilogue(relax.PyExprMutator):
    """gelu(reshape*(call_tir(K, args))) -> reshape(call_tir(K_gelu, args)) for kernels K that
    have a GELU-epilogue variant.

    ``gelu_variant(gvar)`` gives ``(key, make_func, name)`` for such a kernel, else None; equal
    keys share one added PrimFunc. The unfused call is left for DeadCodeElimination (it stays
    when something else reads it).
    """

    def __init__(self, mod, gelu_variant: Callable):
        super().__init__(mod)
        self.gelu_variant = gelu_variant
        self.added: dict = {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_call(call, "relax.nn.gelu") is None:
            return call
        expr = call.args[0]
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if op_call(bound, "relax.reshape") is not None:
                expr = bound.args[0]
                continue
            expr = bound
            break
        if op_call(expr, "relax.call_tir") is None:
            return call
        variant = self.gelu_variant(expr.args[0])
        if variant is None:
            return call
        key, make_func, name = variant
        if key not in self.added:
            self.added[key] = self.builder_.add_func(make_func(), name)
        fused = relax.call_tir(self.added[key], expr.args[1], expr.ty_args[0])
        return relax.op.reshape(self.builder_.emit(fused), struct_shape(call))


def fake_quant_input(mutator: relax.PyExprMutator, expr):
    """``(q, s_x)`` when ``expr`` is AnnotateQuantization's fake-quantized form of an input,
    ``multiply(q, s_x)`` with ``q = clip(round(multiply(x, 1 / s_x)), -127, 127)`` (float32
    integers), else None."""
    product = op_call(bound_value(mutator, expr), "relax.multiply")
    if product is None:
        return None
    q, scale = product.args
    clipped = op_call(bound_value(mutator, q), "relax.clip")
    if clipped is None:
        return None
    rounded = op_call(bound_value(mutator, clipped.args[0]), "relax.round")
    scale_value = const_array(bound_value(mutator, scale))
    if rounded is None or scale_value is None or scale_value.ndim != 0:
        return None
    if op_call(bound_value(mutator, rounded.args[0]), "relax.multiply") is None:
        return None
    return q, float(scale_value)


RELAX_HALF_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # a half precision's Relax dtype


def half_input(mutator: relax.PyExprMutator, expr, half: str):
    """The half-precision tensor ``y`` when ``expr`` is AnnotateHalf's rounded form of an input,
    ``astype(y, "float32")`` with ``y = astype(x, RELAX_HALF_DTYPES[half])`` (``half`` "bf16"
    or "fp16"), else None."""
    widened = op_call(bound_value(mutator, expr), "relax.astype")
    if widened is None or str(widened.attrs.dtype) != "float32":
        return None
    narrowed = op_call(bound_value(mutator, widened.args[0]), "relax.astype")
    if narrowed is None or str(narrowed.attrs.dtype) != RELAX_HALF_DTYPES[half]:
        return None
    return widened.args[0]


def half_stored(x, half: str):
    """A ``half``-precision tensor as its kernels take their X: bf16 viewed as its uint16 bits
    (`schedules.paired.HALF_DTYPES`), fp16 as it is."""
    if half == "bf16":
        return relax.op.memory.view(x, dtype=paired.HALF_DTYPES[half])
    return x


def stored_input(q, kernels: str):
    """Fake-quantized integers ``q`` (float32 in [-127, 127], `fake_quant_input`) as the int8
    kernel variant ``kernels`` takes its X: plus the variant's offset, in its X storage dtype."""
    offset = paired.OFFSET.get(kernels)
    if offset is not None:
        q = relax.op.add(q, relax.const(np.float32(offset), "float32"))
    return relax.op.astype(q, paired.X_STORAGE[kernels])
