"""AnnotateQuantization and AnnotateHalf: write reduced precision onto the Relax module.

The input x of every quantized linear layer (`vitsparse.plan.quantize`: the blocks' qkv, proj,
fc1 and fc2) becomes its fake-quantized form,

    multiply(clip(round(multiply(x, 1 / s_x)), -127, 127), s_x)

so the module carries its quantization in the IR, stays runnable, and computes what the
PyTorch reference computes at every stage. LowerLinear and BlockSparsify read it back: a linear
layer whose input has this form becomes an int8 kernel (the weight quantized per output channel
at compile time); the float multiply by s_x is then dead. main gets the function attribute
``vitsparse.quantization`` (per layer s_x) for people reading a dump.

AnnotateHalf does the same for the half precisions: with bf16 (fp16) each reduced layer's
input x becomes

    astype(astype(x, "bfloat16"), "float32")        ("float16" for fp16)

(rounded to nearest, ties to even, as PyTorch rounds), which LowerLinear and BlockSparsify read
back as a bf16 (fp16) kernel's input, the weight rounded the same way at compile time.

Run them before BindParams: they find the layers by their weights' Relax parameter names, which
the frontend's ViTGraph maps to PyTorch layer names.
"""

from __future__ import annotations

import numpy as np

from vitsparse._tvm import relax, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend import ViTGraph
from vitsparse.passes._rewrite import RELAX_HALF_DTYPES, copy_module, op_call
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


def round_half(_bb: relax.BlockBuilder, x, dtype: str):
    """Emit x rounded to the half ``dtype``, as float32 (AnnotateHalf's form)."""
    return relax.op.astype(relax.op.astype(x, dtype), "float32")


@relax.expr_functor.mutator
class _RewriteInputs(relax.PyExprMutator):
    """Rewrites the input of every matmul whose weight is one of ``scales``' parameters with
    ``rewrite(builder, x, scales[param])``."""

    def __init__(self, mod, scales: dict, rewrite):
        super().__init__(mod)
        self.scales = scales  # weight parameter Var -> what the rewrite needs
        self.rewrite = rewrite
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
        x = self.builder_.emit(self.rewrite(self.builder_, call.args[0], self.scales[param]))
        return relax.Call(call.op, [x, call.args[1]], call.attrs)


@tvm.transform.module_pass(opt_level=0, name="vitsparse.AnnotateQuantization")
class AnnotateQuantization:
    """Fake-quantize the inputs of ``quantization``'s layers in main (see the module docstring)."""

    def __init__(self, quantization: Quantization, graph: ViTGraph, func_name: str = "main"):
        self.quantization = quantization
        self.graph = graph
        self.func_name = func_name

    def transform_module(self, mod, _ctx):
        attr = {layer: f"s_x={scale:.6g}" for layer, scale in self.quantization.scales.items()}
        return _rewrite_layers(
            mod, self.graph, self.quantization.scales, fake_quant, self.func_name, attr
        )


@tvm.transform.module_pass(opt_level=0, name="vitsparse.AnnotateHalf")
class AnnotateHalf:
    """Round the inputs of ``layers`` (PyTorch layer names) to ``precision`` (bf16 or fp16) in
    main (see the module docstring)."""

    def __init__(self, layers, graph: ViTGraph, precision: str = "bf16", func_name: str = "main"):
        if precision not in RELAX_HALF_DTYPES:
            names = ", ".join(RELAX_HALF_DTYPES)
            raise ValueError(f"{precision!r} is not a half precision ({names})")
        self.layers = tuple(layers)
        self.graph = graph
        self.precision = precision
        self.func_name = func_name

    def transform_module(self, mod, _ctx):
        attr = {layer: self.precision for layer in self.layers}
        layers = dict.fromkeys(self.layers, RELAX_HALF_DTYPES[self.precision])
        return _rewrite_layers(mod, self.graph, layers, round_half, self.func_name, attr)


def _rewrite_layers(mod, graph: ViTGraph, layers: dict, rewrite, func_name: str, attr: dict):
    """``mod`` with the input of each of ``layers`` (PyTorch name -> what ``rewrite`` takes)
    rewritten, and main's ``vitsparse.quantization`` attribute set to ``attr``."""
    by_torch = {torch: relax_name for relax_name, torch in graph.param_map.items()}
    func = mod[func_name]
    params = {p.name: p for p in func.params}
    by_param = {}
    for layer, value in layers.items():
        relax_name = by_torch.get(f"{layer}.weight")
        if relax_name is None or relax_name not in params:
            raise PlanError(f"reduced-precision layer {layer!r} has no weight in the module")
        by_param[params[relax_name]] = value
    mutator = _RewriteInputs(mod, by_param, rewrite)
    new_func = mutator.visit_expr(func)
    unused = sorted(p.name for p in set(by_param) - mutator.seen)
    if unused:
        raise PlanError(f"no matmul reads the reduced-precision weights {unused[:3]}")
    out = copy_module(mod)
    out[func_name] = new_func.with_attr(QUANTIZATION_ATTR, attr)
    return relax.transform.Normalize()(out)
