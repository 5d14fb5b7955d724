"""Clean-ups of importer output so every linear layer reaches the passes in one form.

torch.export's decomposition turns ``aten.linear`` on a non-contiguous 3-D input (the attention
projection when batch > 1) into ``bmm(x, expand(W.T))``. TVM imports that as
``matmul(x, broadcast_to(permute_dims(W), [B, in, out]))``: a weight copied per image, and a form
the linear-layer patterns do not match. Matmul broadcasts by itself, so the broadcast is dropped.
"""

from __future__ import annotations

from vitsparse._tvm import IRModule, relax, struct_shape

_dpl = relax.dpl


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
