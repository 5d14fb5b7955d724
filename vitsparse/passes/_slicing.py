"""What the structural pruning passes share: narrower weight parameters, shapes that follow them,
and insertions after chosen bindings, behind one base class (`SlicingPass`).

A structural pass replaces weight parameters of ``main`` by narrower ones (same names, fewer rows
or columns) and records each slice in the function attribute ``vitsparse.param_slices``
(``{param: [[axis, [indices...]], ...]}``, applied in order; an index of -1 stands for a row or
column of zeros, for padding): `slice_params` applies them to the weights before binding, so the
IR says which weights it expects. Re-emitting ``main`` then
re-derives every shape; the ops that spell shapes out (``reshape``, ``broadcast_to``) follow
their inputs (`follow_reshape`), and a pass may override a reshape it knows better (the
qkv split into heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vitsparse._tvm import relax, struct_shape, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend import ViTGraph
from vitsparse.plan import Structure

SLICES_ATTR = "vitsparse.param_slices"

# (original reshape target, new input shape) -> new target, or None to let it follow
ReshapeOverride = Callable[[tuple[int, ...], tuple[int, ...]], tuple[int, ...] | None]
# (block builder, the re-emitted var, old var -> its re-emitted var) -> the var later bindings
# see instead
After = Callable[[relax.BlockBuilder, relax.Var, Callable], relax.Var]


def follow_reshape(
    old_in: tuple[int, ...], old_out: tuple[int, ...], new_in: tuple[int, ...]
) -> tuple[int, ...]:
    """The target a reshape needs when its input changes from ``old_in`` to ``new_in``: groups of
    input dims that merged into one output dim merge again, dims carried over stay carried,
    unit dims inserted or dropped stay so, and a changed dim split into several keeps the outer
    sizes (the innermost absorbs the change). Anything else is ambiguous (ValueError): the pass
    that changed it must say how the reshape goes."""
    if old_in == new_in:
        return old_out
    out = list(old_out)
    i = j = 0
    n, m = len(old_in), len(old_out)
    while i < n or j < m:
        if i < n and old_in[i] == 1 and (j >= m or old_out[j] != 1):
            if new_in[i] != 1:
                raise ValueError(f"reshape {old_in} -> {old_out}: unit dim {i} became {new_in[i]}")
            i += 1
            continue
        if j < m and old_out[j] == 1 and (i >= n or old_in[i] != 1):
            j += 1
            continue
        if i >= n or j >= m:
            raise ValueError(f"reshape {old_in} -> {old_out} does not preserve the element count")
        group_in, group_out = [i], [j]
        p_in, p_out = old_in[i], old_out[j]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                group_in.append(i)
                p_in *= old_in[i]
                i += 1
            else:
                group_out.append(j)
                p_out *= old_out[j]
                j += 1
        old_group = [old_in[k] for k in group_in]
        new_group = [new_in[k] for k in group_in]
        if old_group == new_group:
            continue
        size = int(np.prod(new_group))
        if len(group_out) == 1:
            out[group_out[0]] = size
            continue
        # A split of a changed size: the outer dims keep their sizes (they are batch-like, which
        # no pass changes: B*heads -> (B, heads)) and the innermost absorbs the change. A split
        # where that is wrong (qkv -> (3, heads, head_dim)) is overridden by its pass.
        outer = int(np.prod([old_out[k] for k in group_out[:-1]]))
        if len(group_in) != 1 or size % outer:
            raise ValueError(
                f"reshape {old_in} -> {old_out}: dims {old_group} became {new_group} and are "
                f"split into {[old_out[k] for k in group_out]}; the split is ambiguous"
            )
        out[group_out[-1]] = size // outer
    return tuple(out)


def follow_broadcast(
    old_in: tuple[int, ...], old_out: tuple[int, ...], new_in: tuple[int, ...]
) -> tuple[int, ...]:
    """broadcast_to's target when its input changes: dims the input supplied follow it."""
    out = list(old_out)
    offset = len(old_out) - len(old_in)
    for d, (old, new) in enumerate(zip(old_in, new_in, strict=True)):
        if old == old_out[offset + d]:
            out[offset + d] = new
    return tuple(out)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, overrides: dict, after: dict):
        super().__init__(mod)
        self.overrides = overrides  # original binding Var -> ReshapeOverride
        self.after = after  # original binding Var -> After
        self.current = None

    def visit_var_binding_(self, binding):
        self.current = binding.var
        value = self.visit_expr(binding.value)
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(value, name_hint=binding.var.name)
        else:
            new_var = self.builder_.emit_output(value, name_hint=binding.var.name)
        hook = self.after.get(binding.var)
        if hook is not None:
            new_var = hook(self.builder_, new_var, lambda old: self.get_var_remap(old))
        self.set_var_remap(binding.var, new_var)

    def visit_call_(self, call):
        op = call.op.name if isinstance(call.op, tvm.ir.Op) else None
        if op not in ("relax.reshape", "relax.broadcast_to"):
            return super().visit_call_(call)
        arg = self.visit_expr(call.args[0])
        old_in, new_in = struct_shape(call.args[0]), struct_shape(arg)
        old_out = struct_shape(call)
        override = self.overrides.get(self.current)
        target = None if override is None else override(old_out, new_in)
        if target is None:
            follow = follow_reshape if op == "relax.reshape" else follow_broadcast
            try:
                target = follow(old_in, old_out, new_in)
            except ValueError as err:
                raise PlanError(f"cannot reshape {self.current} after pruning: {err}") from None
        make = relax.op.reshape if op == "relax.reshape" else relax.op.broadcast_to
        return make(arg, target)


def rewrite_main(
    mod,
    slices: dict[str, tuple[int, list[int]]],
    *,
    overrides: dict | None = None,
    after: dict | None = None,
    func_name: str = "main",
):
    """``mod`` with ``main``'s parameters named in ``slices`` narrowed (``name -> (axis,
    kept indices)``), the body re-emitted so shapes follow, ``overrides`` (binding var ->
    ReshapeOverride) and ``after`` (binding var -> After) applied; the slices are appended to
    the function's ``vitsparse.param_slices``."""
    func = mod[func_name]
    mutator = _Rewriter(mod, overrides or {}, after or {})
    params = []
    for param in func.params:
        if param.name not in slices:
            params.append(param)
            continue
        axis, kept = slices[param.name]
        shape = list(struct_shape(param))
        if max(kept) >= shape[axis]:
            raise PlanError(f"{param.name}: index {max(kept)} out of range on axis {axis}")
        shape[axis] = len(kept)
        new = relax.Var(param.name, relax.TensorType(shape, param.ty.dtype))
        mutator.set_var_remap(param, new)
        params.append(new)
    body = mutator.visit_expr(func.body)
    recorded = {k: [list(step) for step in v] for k, v in _slices(func).items()}
    for name, (axis, kept) in slices.items():
        recorded.setdefault(name, []).append([axis, [int(i) for i in kept]])
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs[SLICES_ATTR] = recorded
    new_func = _with_attrs(relax.Function(params, body, is_pure=func.is_pure), attrs)
    out = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
    out[func_name] = new_func
    return relax.transform.Normalize()(out)


def _with_attrs(func, attrs: dict):
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return func


def _slices(func) -> dict:
    if func.attrs is None or SLICES_ATTR not in func.attrs:
        return {}
    return {
        str(k): [(int(step[0]), [int(i) for i in step[1]]) for step in v]
        for k, v in func.attrs[SLICES_ATTR].items()
    }


def slice_params(mod, params: dict[str, np.ndarray], func_name: str = "main") -> dict:
    """``params`` narrowed as ``mod``'s ``main`` records (unchanged when it records nothing)."""
    steps = _slices(mod[func_name])
    out = dict(params)
    for name, chain in steps.items():
        value = out[name]
        for axis, kept in chain:
            index = np.asarray(kept)
            value = np.take(value, np.maximum(index, 0), axis=axis)
            if (index < 0).any():  # -1: a zero row/column (padding)
                shape = [1] * value.ndim
                shape[axis] = index.size
                value = value * (index >= 0).reshape(shape).astype(value.dtype)
        out[name] = np.ascontiguousarray(value)
    return out


@dataclass
class Slicing:
    """What a structural pass does to ``main``: parameter slices (``name -> (axis, kept)``),
    reshape overrides and insertions after bindings (see `rewrite_main`)."""

    slices: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.slices and not self.after


class SlicingPass:
    """The base of the structural passes (PruneEmbedding, PruneHeads, PruneMLP, PruneTokens):
    configured with the plan's `Structure` and the model's `ViTGraph`; a subclass says, in
    `slicing`, what ``main`` loses, and the base applies it with `rewrite_main` (leaving the
    module as it is when there is nothing to do). Subclasses are decorated with
    ``tvm.transform.module_pass``."""

    def __init__(self, structure: Structure, graph: ViTGraph):
        self.structure = structure
        self.graph = graph

    def slicing(self, mod) -> Slicing:
        raise NotImplementedError

    def transform_module(self, mod, _ctx):
        todo = self.slicing(mod)
        if todo.empty:
            return mod
        return rewrite_main(mod, todo.slices, overrides=todo.overrides, after=todo.after)
