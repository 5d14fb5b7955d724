"""PruneTokens: drop patch tokens after the attention of the blocks a plan says (EViT/CP-ViT).

After block ``b``'s attention residual, the ``keep`` highest-scoring patch tokens go on, in their
original order (top-k, then a sort of the indices, then a gather); the class and distillation
tokens always stay. Keep counts are fixed at compile time, so every shape stays static, and the
shapes of everything after follow (``passes._slicing``). Scores (see
vitsparse.plan.structure) are computed from the block's softmax output:

- ``cls_attention``: the class token's row, averaged over heads;
- ``cumulative_attention``: per head the column maxima (over queries), summed over heads,
  accumulated from block 0 on and gathered along with the tokens.
"""

from __future__ import annotations

from vitsparse._tvm import relax, struct_shape, tvm
from vitsparse.errors import PlanError
from vitsparse.frontend import ViTGraph
from vitsparse.passes._slicing import Slicing, SlicingPass


def _op(value, name: str) -> bool:
    return isinstance(value, relax.Call) and value.op == tvm.ir.Op.get(name)


def _uses_param(value, name: str) -> bool:
    found = []
    relax.analysis.post_order_visit(
        value, lambda n: found.append(n) if isinstance(n, relax.Var) and n.name == name else None
    )
    return bool(found)


def _locate(func, graph: ViTGraph) -> dict[int, tuple[relax.Var, relax.Var]]:
    """Per block: (its softmax binding var, its attention-residual binding var)."""
    bindings = [b for block in func.body.blocks for b in block.bindings]
    out, current, softmax, after_proj = {}, None, None, False
    for binding in bindings:
        for block in graph.blocks:
            if _uses_param(binding.value, block.qkv_weight):
                current, softmax, after_proj = block.index, None, False
        if current is None:
            continue
        proj = graph.blocks[current].proj_weight
        if _op(binding.value, "relax.nn.softmax") and softmax is None:
            softmax = binding.var
        elif _uses_param(binding.value, proj):
            after_proj = True
        elif (
            after_proj
            and current not in out
            and _op(binding.value, "relax.add")
            and len(struct_shape(binding.var)) == 3
            # the residual adds two (B, N, E) streams; a bias add broadcasts an (E,) vector
            and all(struct_shape(a) == struct_shape(binding.var) for a in binding.value.args)
        ):
            if softmax is None:
                raise PlanError(f"block {current}: no softmax found in its attention")
            out[current] = (softmax, binding.var)
    return out


@tvm.transform.module_pass(opt_level=0, name="vitsparse.PruneTokens")
class PruneTokens(SlicingPass):
    """Insert the token selection ``structure`` asks for after the given blocks' attention."""

    def slicing(self, mod) -> Slicing:
        pruned = {
            b.index: self.structure.block(b.index).tokens
            for b in self.graph.blocks
            if self.structure.block(b.index).tokens is not None
        }
        if not pruned:
            return Slicing()
        found = _locate(mod["main"], self.graph)
        missing = sorted(set(pruned) - set(found))
        if missing:
            raise PlanError(f"token pruning: cannot find the attention of block(s) {missing}")
        prefix = self.graph.num_prefix_tokens
        cumulative_until = max(
            (i for i, t in pruned.items() if t.rule == "cumulative_attention"), default=-1
        )
        state: dict = {"cumulative": None}
        after = {}
        for index in range(cumulative_until + 1):
            after[found[index][0]] = self._accumulate(state, prefix)
        for index, tokens in pruned.items():
            after[found[index][1]] = self._select(state, found[index][0], tokens, prefix)
        return Slicing(after=after)

    @staticmethod
    def _accumulate(state, prefix):
        def hook(bb, probs, _lookup):
            n = struct_shape(probs)[-1]
            strongest = bb.emit(relax.op.max(probs, axis=[2]))  # (B, H, N): over queries
            received = bb.emit(relax.op.sum(strongest, axis=[1]))  # (B, N)
            received = bb.emit(relax.op.strided_slice(received, [1], [prefix], [n]))
            previous = state["cumulative"]
            state["cumulative"] = (
                received if previous is None else bb.emit(relax.op.add(previous, received))
            )
            return probs

        return hook

    @staticmethod
    def _select(state, softmax_var, tokens, prefix):
        def hook(bb, x, lookup):
            batch, n, width = struct_shape(x)
            if tokens.rule == "cls_attention":
                probs = lookup(softmax_var)
                row = bb.emit(relax.op.strided_slice(probs, [2], [0], [1]))  # (B, H, 1, N)
                score = bb.emit(relax.op.mean(row, axis=[1, 2]))
                score = bb.emit(relax.op.strided_slice(score, [1], [prefix], [n]))
            else:
                score = state["cumulative"]
            # A stable descending argsort: equal scores (uniform attention) keep the earlier
            # token, as the PyTorch reference does; topk leaves ties unordered.
            order = bb.emit(relax.op.argsort(score, axis=-1, descending=True, dtype="int64"))
            top = bb.emit(relax.op.strided_slice(order, [1], [0], [tokens.keep]))
            top = bb.emit(relax.op.sort(top, axis=-1))  # original token order
            if state["cumulative"] is not None:
                state["cumulative"] = bb.emit(relax.op.gather_elements(state["cumulative"], top, 1))
            wide = bb.emit(
                relax.op.broadcast_to(relax.op.expand_dims(top, -1), (batch, tokens.keep, width))
            )
            patches = bb.emit(relax.op.strided_slice(x, [1], [prefix], [n]))
            kept = bb.emit(relax.op.gather_elements(patches, wide, 1))
            head = bb.emit(relax.op.strided_slice(x, [1], [0], [prefix]))
            return bb.emit(relax.op.concat([head, kept], axis=1))

        return hook
