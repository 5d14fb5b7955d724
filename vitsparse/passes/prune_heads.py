"""PruneHeads: remove attention heads, and query/key/value dimensions, of the blocks a plan says.

For a block keeping heads ``H`` and dimensions ``Dq`` (query/key) and ``Dv`` (value), qkv's
weight keeps, in order, the q rows, the k rows and the v rows of those heads and dimensions;
proj's weight keeps the matching columns; the attention runs with ``len(H)`` heads. The scale
stays the unpruned ``head_dim ** -0.5`` (see vitsparse.plan.pruned_vit).

The import's attention splits qkv with one reshape to ``(B, N, 3, heads, head_dim)``, which needs
one width for q, k and v. When ``Dq`` and ``Dv`` differ in size (NViT), the narrower side is padded
with zero rows of qkv (and zero columns of proj) up to the wider: a zero query/key dimension adds
nothing to the attention scores and a zero value dimension nothing to the output, so the result
is exact, at the cost of the padded multiply-adds. Such a block cannot also carry a block mask on
qkv or proj (the mask would be for the unpadded weight).
"""

from __future__ import annotations

from vitsparse._tvm import relax, tvm
from vitsparse.errors import PlanError
from vitsparse.passes._slicing import Slicing, SlicingPass
from vitsparse.plan import Structure


def check_supported(structure: Structure, masked_layers=()) -> None:
    """Raise PlanError for what this pass cannot compile: a block whose q/k and v widths differ
    (so its qkv/proj are padded) and whose qkv or proj also has a block mask."""
    for index, part in structure.blocks.items():
        if part.qk_dims is None or part.v_dims is None:
            sizes = {len(s.kept) for s in (part.qk_dims, part.v_dims) if s is not None}
            full = (part.qk_dims or part.v_dims).size if sizes else None
            sizes.add(full)
        else:
            sizes = {len(part.qk_dims.kept), len(part.v_dims.kept)}
        if len(sizes - {None}) < 2:
            continue
        masked = [
            name
            for name in (f"blocks.{index}.attn.qkv", f"blocks.{index}.attn.proj")
            if name in masked_layers
        ]
        if masked:
            raise PlanError(
                f"block {index}: q/k and v keep different numbers of dims, so its attention "
                f"weights are padded when compiled; a block mask on {', '.join(masked)} cannot "
                "be combined with that"
            )


def _uses(expr, names: set[str]) -> bool:
    found = []

    def visit(node):
        if isinstance(node, relax.Var) and node.name in names:
            found.append(node)

    relax.analysis.post_order_visit(expr, visit)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="vitsparse.PruneHeads")
class PruneHeads(SlicingPass):
    """Slice the heads and head dimensions ``structure`` drops out of ``main``."""

    def slicing(self, mod) -> Slicing:
        slices, split_shapes = {}, {}
        for block in self.graph.blocks:
            part = self.structure.block(block.index)
            if part.heads is None and part.qk_dims is None and part.v_dims is None:
                continue
            heads = list(range(block.num_heads)) if part.heads is None else list(part.heads.kept)
            full = list(range(block.head_dim))
            qk = full if part.qk_dims is None else list(part.qk_dims.kept)
            v = full if part.v_dims is None else list(part.v_dims.kept)
            width = max(len(qk), len(v))  # pad the narrower with -1: zero rows/columns
            qk, v = qk + [-1] * (width - len(qk)), v + [-1] * (width - len(v))
            hd, attn = block.head_dim, block.num_heads * block.head_dim
            rows = [
                -1 if d < 0 else part_i * attn + h * hd + d
                for part_i, dims in enumerate((qk, qk, v))
                for h in heads
                for d in dims
            ]
            slices[block.qkv_weight] = (0, rows)
            if block.qkv_bias is not None:
                slices[block.qkv_bias] = (0, rows)
            slices[block.proj_weight] = (1, [-1 if d < 0 else h * hd + d for h in heads for d in v])
            split_shapes[block.index] = (block.num_heads, hd, len(heads), len(v))
        if not slices:
            return Slicing()
        return Slicing(slices, overrides=self._split_overrides(mod, split_shapes))

    def _split_overrides(self, mod, split_shapes):
        """The reshape of each pruned block's qkv output into (B, N, 3, heads, head_dim)."""
        qkv_names = {b.qkv_weight: b.index for b in self.graph.blocks}
        current, overrides = None, {}
        for binding in _bindings(mod["main"]):
            for name, index in qkv_names.items():
                if _uses(binding.value, {name}):
                    current = index
            if current not in split_shapes:
                continue
            call = binding.value
            if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.reshape")):
                continue
            heads, hd, new_heads, new_hd = split_shapes[current]
            target = tuple(int(v) for v in call.ty.shape.values)
            if len(target) == 5 and target[2:] == (3, heads, hd):

                def override(old_out, new_in, nh=new_heads, nd=new_hd):
                    return (*new_in[:2], 3, nh, nd)  # new_in: (B, N, 3 * nh * nd)

                overrides[binding.var] = override
        return overrides


def _bindings(func):
    for block in func.body.blocks:
        yield from block.bindings
