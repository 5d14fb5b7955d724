"""Clean-ups of importer output so every linear layer reaches the passes in one form.

torch.export's decomposition turns ``aten.linear`` on a non-contiguous 3-D input (the attention
projection when batch > 1) into ``bmm(x, expand(W.T))``. TVM imports that as
``matmul(x, broadcast_to(permute_dims(W), [B, in, out]))``: a weight copied per image, and a form
the linear-layer patterns do not match. Matmul broadcasts by itself, so the broadcast is dropped.

Its decomposition of ``scaled_dot_product_attention`` guards every softmax against a row of
scores that are all -inf (a fully masked row), whose softmax is NaN: ``where(logical_not(any(s
!= -inf)), zeros, softmax(s))``. A ViT has no attention mask, so its scores are finite and the
guard never fires, but it costs a pass over every attention matrix and a read of a zero tensor
of the same size per block. `drop_softmax_guards`
removes it: a row of all -inf scores (only from infinite or NaN inputs) then gives NaN where
PyTorch gives 0.
"""

from __future__ import annotations

import math

from vitsparse._tvm import IRModule, relax, struct_shape, tvm

_dpl = relax.dpl


def canonicalize(mod: IRModule) -> IRModule:
    """Every clean-up of this module, in order."""
    return drop_softmax_guards(drop_weight_broadcasts(mod))


def drop_weight_broadcasts(mod: IRModule) -> IRModule:
    """Rewrite ``matmul(x, broadcast_to(permute_dims(W)))`` to ``matmul(x, permute_dims(W))``."""
    lhs = _dpl.wildcard()
    transposed = _dpl.is_op("relax.permute_dims")(_dpl.wildcard())
    broadcast = _dpl.is_op("relax.broadcast_to")(transposed, _dpl.wildcard())
    pattern = _dpl.is_op("relax.matmul")(lhs, broadcast)

    def rewrite(call, matches):
        x, weight_t = matches[lhs], matches[transposed]
        x_shape, w_shape = struct_shape(x), struct_shape(weight_t)
        target = struct_shape(matches[broadcast])
        # Only when the broadcast adds nothing the matmul would not add by itself.
        if len(w_shape) != 2 or target[-2:] != w_shape or target[:-2] != x_shape[:-2]:
            return call
        return relax.op.matmul(x, weight_t, out_dtype=call.attrs.out_dtype)

    func = _dpl.rewrite_call(pattern, rewrite, mod["main"])
    mod = mod.clone()
    mod.update_func(mod.get_global_var("main"), func)
    return relax.transform.DeadCodeElimination()(mod)


def _scalar(expr) -> float | None:
    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    value = expr.value.numpy()
    return float(value) if value.size == 1 else None


def drop_softmax_guards(mod: IRModule) -> IRModule:
    """Rewrite ``where(logical_not(astype(max(astype(logical_not(equal(s, -inf))), axis=-1))),
    full_like(softmax(s), 0), softmax(s))`` to ``softmax(s)`` (see the module docstring)."""
    scores = _dpl.wildcard()
    softmax = _dpl.is_op("relax.nn.softmax")(scores)
    minus_inf = _dpl.is_const()
    finite = _dpl.is_op("relax.logical_not")(_dpl.is_op("relax.equal")(scores, minus_inf))
    row_any = _dpl.is_op("relax.max")(_dpl.is_op("relax.astype")(finite))
    masked = _dpl.is_op("relax.logical_not")(_dpl.is_op("relax.astype")(row_any))
    fill = _dpl.is_const()
    zeros = _dpl.is_op("relax.full_like")(softmax, fill)
    pattern = _dpl.is_op("relax.where")(masked, zeros, softmax)

    def rewrite(call, matches):
        rank = len(struct_shape(matches[scores]))
        axes = matches[row_any].attrs.axis
        axis = int(matches[softmax].attrs.axis) % rank
        reduced = [int(a) % rank for a in axes] if axes is not None else None
        if (
            _scalar(matches[minus_inf]) != -math.inf
            or _scalar(matches[fill]) != 0.0
            or reduced != [axis]
        ):
            return call
        return matches[softmax]

    func = _dpl.rewrite_call(pattern, rewrite, mod["main"])
    mod = mod.clone()
    mod.update_func(mod.get_global_var("main"), func)
    return relax.transform.DeadCodeElimination()(mod)
