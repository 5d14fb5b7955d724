"""PruneHeads: remove attention heads, and query/key/value dimensions, of the blocks a plan says.

For a block keeping heads ``H`` and dimensions ``Dq`` (query/key) and ``Dv`` (value), qkv's
weight keeps, in order, the q rows, the k rows and the v rows of those heads and dimensions;
proj's weight keeps the matching columns; the attention runs with ``len(H)`` heads. The scale
stays the unpruned ``head_dim ** -0.5`` (see vitsparse.pruning.structured_torch).

The import's attention splits qkv with one reshape to ``(B, N, 3, heads, head_dim)``; that needs
``Dq`` and ``Dv`` of the same size, which this pass requires (a plan with different query/key and
value widths is refused here with a clear error).
"""

from __future__ import annotations

from vitsparse._tvm import relax, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend import ViTGraph
from vitsparse.passes._structure import rewrite_main
from vitsparse.plan_structure import Structure


def check_supported(structure: Structure) -> None:
    """Raise PlanError for what this pass cannot compile: unequal q/k and v widths in a block."""
    for index, part in structure.blocks.items():
        qk, v = part.qk_dims, part.v_dims
        n_qk = None if qk is None else len(qk.kept)
        n_v = None if v is None else len(v.kept)
        size = (qk or v).size if (qk or v) is not None else None
        if (n_qk or size) != (n_v or size):
            raise PlanError(
                f"block {index}: {n_qk or size} query/key and {n_v or size} value dims per head; "
                "compiling needs them equal in number (the import splits qkv in one reshape)"
            )


def _uses(expr, names: set[str]) -> bool:
    found = []

    def visit(node):
        if isinstance(node, relax.Var) and node.name in names:
            found.append(node)

    relax.analysis.post_order_visit(expr, visit)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="vitsparse.PruneHeads")
class PruneHeads:
    """Slice the heads and head dimensions ``structure`` drops out of ``main``."""

    def __init__(self, structure: Structure, graph: ViTGraph):
        self.structure = structure
        self.graph = graph

    def transform_module(self, mod, _ctx):
        check_supported(self.structure)
        slices, split_shapes = {}, {}
        for block in self.graph.blocks:
            part = self.structure.block(block.index)
            if part.heads is None and part.qk_dims is None and part.v_dims is None:
                continue
            heads = list(range(block.num_heads)) if part.heads is None else list(part.heads.kept)
            full = list(range(block.head_dim))
            qk = full if part.qk_dims is None else list(part.qk_dims.kept)
            v = full if part.v_dims is None else list(part.v_dims.kept)
            hd, width = block.head_dim, block.num_heads * block.head_dim
            rows = [
                part_i * width + h * hd + d
                for part_i, dims in enumerate((qk, qk, v))
                for h in heads
                for d in dims
            ]
            slices[block.qkv_weight] = (0, rows)
            if block.qkv_bias is not None:
                slices[block.qkv_bias] = (0, rows)
            slices[block.proj_weight] = (1, [h * hd + d for h in heads for d in v])
            split_shapes[block.index] = (block.num_heads, hd, len(heads), len(v))
        if not slices:
            return mod
        overrides = self._split_overrides(mod, split_shapes)
        return rewrite_main(mod, slices, overrides=overrides)

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
