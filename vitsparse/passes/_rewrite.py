"""Shared plumbing of the mutator-based passes."""

from __future__ import annotations

from collections.abc import Callable

from vitsparse._tvm import IRModule, relax


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
