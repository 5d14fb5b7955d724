"""PruneMLP: remove MLP neurons (hidden units) of the blocks a plan says, physically.

For each block with kept neurons ``S``: fc1's weight keeps rows ``S`` (and its bias those
entries), fc2's weight keeps columns ``S``; the activations between them are ``len(S)`` wide.
Run before BindParams (it narrows ``main``'s weight parameters; ``passes._slicing``).
"""

from __future__ import annotations

from vitsparse._tvm import tvm
from vitsparse.passes._slicing import Slicing, SlicingPass


@tvm.transform.module_pass(opt_level=0, name="vitsparse.PruneMLP")
class PruneMLP(SlicingPass):
    """Slice the MLP neurons ``structure`` drops out of ``main``."""

    def slicing(self, mod) -> Slicing:
        slices = {}
        for block in self.graph.blocks:
            kept = self.structure.block(block.index).mlp
            if kept is None:
                continue
            rows = list(kept.kept)
            slices[block.fc1_weight] = (0, rows)
            if block.fc1_bias is not None:
                slices[block.fc1_bias] = (0, rows)
            slices[block.fc2_weight] = (1, rows)
        return Slicing(slices)
