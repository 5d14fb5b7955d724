"""PatchEmbedToDense: the patch-embedding convolution as a linear layer.

A conv2d whose stride equals its kernel size and that has no padding, dilation or groups cuts
the image into non-overlapping patches: it is exactly patches @ W.reshape(O, C*p*p)^T. This pass
rewrites it into that form (reshape/permute of the input, then add(matmul(., permute_dims(W)), 0))
so that LowerLinear turns it into the packed dense kernel like every other linear layer.
"""

from __future__ import annotations

import numpy as np

from vitsparse._tvm import relax, struct_shape, tvm
from vitsparse.passes._rewrite import rewrite_relax_functions

Constant = tvm.ir.expr.Constant
_CONV = tvm.ir.Op.get("relax.nn.conv2d")


def _ints(values) -> list[int]:
    return [int(v) for v in values]


@relax.expr_functor.mutator
class _PatchEmbedMutator(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(_CONV)):
            return call
        weight = call.args[1]
        if isinstance(weight, relax.Var):
            weight = self.lookup_binding(weight) or weight
        if not isinstance(weight, Constant):
            return call
        attrs = call.attrs
        w = weight.value.numpy()
        out_ch, in_ch, kh, kw = w.shape
        if (
            str(attrs.data_layout) != "NCHW"
            or str(attrs.kernel_layout) != "OIHW"
            or str(attrs.out_layout) != "NCHW"
            or int(attrs.groups) != 1
            or _ints(attrs.strides) != [kh, kw]
            or any(_ints(attrs.padding))
            or _ints(attrs.dilation) != [1, 1]
            or w.dtype != np.float32
        ):
            return call
        n, c, h, wd = struct_shape(call.args[0])
        if h % kh or wd % kw:
            return call
        gh, gw = h // kh, wd // kw
        bb = self.builder_
        x = bb.emit(relax.op.reshape(call.args[0], (n, c, gh, kh, gw, kw)))
        x = bb.emit(relax.op.permute_dims(x, [0, 2, 4, 1, 3, 5]))
        x = bb.emit(relax.op.reshape(x, (n * gh * gw, c * kh * kw)))
        w2 = relax.const(np.ascontiguousarray(w.reshape(out_ch, in_ch * kh * kw)))
        y = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w2, [1, 0]))))
        y = bb.emit(relax.op.add(y, relax.const(np.zeros(out_ch, dtype=np.float32))))
        y = bb.emit(relax.op.reshape(y, (n, gh, gw, out_ch)))
        return relax.op.permute_dims(y, [0, 3, 1, 2])


@tvm.transform.module_pass(opt_level=0, name="vitsparse.PatchEmbedToDense")
class PatchEmbedToDense:
    """Rewrite non-overlapping-patch conv2d (constant weight) into reshape + linear."""

    def transform_module(self, mod, _ctx):
        return rewrite_relax_functions(mod, _PatchEmbedMutator)
