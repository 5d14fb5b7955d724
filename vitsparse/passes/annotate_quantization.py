"""AnnotateQuantization: write int8 activation quantization onto the Relax module.

The input x of every quantized linear layer (`vitsparse.plan.quantize`: the blocks' qkv, proj,
fc1 and fc2) becomes its fake-quantized form,

    multiply(clip(round(multiply(x, 1 / s_x)), -127, 127), s_x)

so the module carries its quantization in the IR, stays runnable, and computes what the
PyTorch reference computes at every stage. LowerLinear and BlockSparsify read it back: a linear
layer whose input has this form becomes an int8 kernel (the weight quantized per output channel
at compile time); the float multiply by s_x is then dead. main gets the function attribute
``vitsparse.quantization`` (per layer s_x) for people reading a dump.

Run it before BindParams: it finds the layers by their weights' Relax parameter names, which the
frontend's ViTGraph maps to PyTorch layer names.
"""

from __future__ import annotations

import numpy as np

from vitsparse._tvm import relax, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend import ViTGraph
from vitsparse.passes._rewrite import copy_module, op_call
from vitsparse.plan.quantize import QMAX, Quantization

QUANTIZATION_ATTR = "vitsparse.quantization"
# What may stand between a matmul's weight operand and the weight parameter.
_WEIGHT_VIEWS = ("relax.permute_dims", "relax.reshape", "relax.multiply")


def fake_quant(bb: relax.BlockBuilder, x, scale: float):
    """Emit x's fake-quantized form (see the module docstring)."""
    inverse = np.float32(1.0) / np.float32(scale)
    scaled = bb.emit(relax.op.multiply(x, relax.const(inverse, "float32")))
    rounded = bb.emit(relax.op.round(scaled))
    clipped = bb.emit(relax.op.clip(rounded, float(-QMAX), float(QMAX)))
    return relax.op.multiply(clipped, relax.const(np.float32(scale), "float32"))


@relax.expr_functor.mutator
class _QuantizeInputs(relax.PyExprMutator):
    def __init__(self, mod, scales: dict):
        super().__init__(mod)
        self.scales = scales  # weight parameter Var -> s_x
        self.seen: set = set()

    def _weight_param(self, expr):
        while True:
            if isinstance(expr, relax.Var) and expr in self.scales:
                return expr
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                if bound is None:
                    return None
                expr = bound
                continue
            if any(op_call(expr, name) is not None for name in _WEIGHT_VIEWS):
                expr = expr.args[0]
                continue
            return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_call(call, "relax.matmul") is None:
            return call
        param = self._weight_param(call.args[1])
        if param is None:
            return call
        self.seen.add(param)
        x = self.builder_.emit(fake_quant(self.builder_, call.args[0], self.scales[param]))
        return relax.Call(call.op, [x, call.args[1]], call.attrs)


@tvm.transform.module_pass(opt_level=0, name="vitsparse.AnnotateQuantization")
class AnnotateQuantization:
    """Fake-quantize the inputs of ``quantization``'s layers in main (see the module docstring)."""

    def __init__(self, quantization: Quantization, graph: ViTGraph, func_name: str = "main"):
        self.quantization = quantization
        self.graph = graph
        self.func_name = func_name

    def transform_module(self, mod, _ctx):
        by_torch = {torch: relax_name for relax_name, torch in self.graph.param_map.items()}
        func = mod[self.func_name]
        params = {p.name: p for p in func.params}
        scales = {}
        for layer, scale in self.quantization.scales.items():
            relax_name = by_torch.get(f"{layer}.weight")
            if relax_name is None or relax_name not in params:
                raise PlanError(f"quantized layer {layer!r} has no weight in the imported module")
            scales[params[relax_name]] = scale
        mutator = _QuantizeInputs(mod, scales)
        new_func = mutator.visit_expr(func)
        unused = sorted(p.name for p in set(scales) - mutator.seen)
        if unused:
            raise PlanError(f"no matmul reads the quantized weights {unused[:3]}")
        out = copy_module(mod)
        attr = {layer: f"s_x={scale:.6g}" for layer, scale in self.quantization.scales.items()}
        out[self.func_name] = new_func.with_attr(QUANTIZATION_ATTR, attr)
        return relax.transform.Normalize()(out)
