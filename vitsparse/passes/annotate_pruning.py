"""AnnotatePruning: write a PruningPlan's block masks onto the Relax module.

Each masked weight parameter W (N x K, blocks r x c) is replaced, wherever main uses it, by

    reshape(multiply(reshape(W, (N/r, r, K/c, c)), M), (N, K))      M: (N/r, 1, K/c, 1) float32

so the module carries its pruning in the IR itself: the block size is in the shapes, the kept
blocks are the ones in M, a dump shows both, and the module stays runnable and exact at every
stage (FoldConstant folds the product into the masked weight when nothing rewrites it).
BlockSparsify reads these annotations back from the IR. main also gets the function attribute
``vitsparse.pruning`` (method and per-layer block size and density) for people reading a dump.

Run it before BindParams: it finds the weights by their Relax parameter names, which the
frontend's ViTGraph maps to the plan's PyTorch layer names.
"""

from __future__ import annotations

import numpy as np

from vitsparse._tvm import relax, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend import ViTGraph
from vitsparse.passes._rewrite import copy_module
from vitsparse.plan import PruningPlan

PRUNING_ATTR = "vitsparse.pruning"


@relax.expr_functor.mutator
class _MaskWeights(relax.PyExprMutator):
    """Uses of a masked parameter -> its masked form, emitted once at the first use."""

    def __init__(self, mod, masks: dict):
        super().__init__(mod)
        self.masks = masks  # param Var -> BlockMask
        self.emitted: dict = {}

    def visit_var_(self, var):
        mask = self.masks.get(var)
        if mask is None:
            return super().visit_var_(var)
        if var not in self.emitted:
            rows, cols = mask.block
            n, k = mask.weight_shape
            keep = mask.kept.astype(np.float32).reshape(n // rows, 1, k // cols, 1)
            bb = self.builder_
            blocks = bb.emit(relax.op.reshape(var, (n // rows, rows, k // cols, cols)))
            masked = bb.emit(relax.op.multiply(blocks, relax.const(keep)))
            self.emitted[var] = bb.emit(relax.op.reshape(masked, (n, k)))
        return self.emitted[var]


def _relax_names(plan: PruningPlan, graph: ViTGraph) -> dict[str, str]:
    """Relax weight parameter name -> plan layer name."""
    by_torch = {torch_name: relax_name for relax_name, torch_name in graph.param_map.items()}
    out = {}
    for layer in plan.layers:
        relax_name = by_torch.get(f"{layer}.weight")
        if relax_name is None:
            known = sorted(n.removesuffix(".weight") for n in by_torch if n.endswith(".weight"))
            raise PlanError(
                f"plan layer {layer!r} has no weight in the imported module "
                f"(layers there: {', '.join(known[:4])}, ...)"
            )
        out[relax_name] = layer
    return out


@tvm.transform.module_pass(opt_level=0, name="vitsparse.AnnotatePruning")
class AnnotatePruning:
    """Annotate ``plan``'s block masks onto main (see the module docstring)."""

    def __init__(self, plan: PruningPlan, graph: ViTGraph, func_name: str = "main"):
        self.plan = plan
        self.graph = graph
        self.func_name = func_name

    def transform_module(self, mod, _ctx):
        names = _relax_names(self.plan, self.graph)
        func = mod[self.func_name]
        masks = {}
        for param in func.params:
            layer = names.get(param.name)
            if layer is None:
                continue
            mask = self.plan.layers[layer]
            shape = tuple(int(v) for v in param.ty.shape.values)
            if shape != mask.weight_shape:
                raise PlanError(
                    f"layer {layer!r}: plan mask is for a {mask.weight_shape} weight, "
                    f"the module's {param.name} is {shape}"
                )
            masks[param] = mask
        missing = set(names) - {p.name for p in masks}
        if missing:
            raise PlanError(f"weights {sorted(missing)} are not parameters of {self.func_name}")
        mutator = _MaskWeights(mod, masks)
        new_func = mutator.visit_expr(func)
        attr = {
            "method": self.plan.method,
            "layers": {
                names[p.name]: f"{self.plan.layers[names[p.name]].block[0]}x"
                f"{self.plan.layers[names[p.name]].block[1]} blocks, density "
                f"{self.plan.layers[names[p.name]].density:.3f}"
                for p in masks
            },
        }
        out = copy_module(mod)
        out[self.func_name] = new_func.with_attr(PRUNING_ATTR, attr)
        return relax.transform.Normalize()(out)
