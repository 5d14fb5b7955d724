"""BindWeights: a model's weights become constants of ``main``, narrowed first as the structural
passes recorded (``vitsparse.param_slices``, see `passes._slicing`), so that weight transposes,
masks and packing fold at compile time. The image input stays a parameter."""

from __future__ import annotations

import numpy as np

from vitsparse._tvm import IRModule, relax, tvm
from vitsparse.passes._slicing import slice_params


def bind_params(mod: IRModule, params: dict[str, np.ndarray], func: str = "main") -> IRModule:
    """``mod`` with ``func``'s weight parameters bound to ``params`` (sliced as ``mod`` records)."""
    bound = {k: tvm.runtime.tensor(v) for k, v in slice_params(mod, params, func).items()}
    return relax.transform.BindParams(func, bound)(mod)


@tvm.transform.module_pass(opt_level=0, name="vitsparse.BindWeights")
class BindWeights:
    """Bind ``params`` (Relax parameter name -> array) into ``main`` (see `bind_params`)."""

    def __init__(self, params: dict[str, np.ndarray], func: str = "main"):
        self.params = params
        self.func = func

    def transform_module(self, mod, _ctx):
        return bind_params(mod, self.params, self.func)
