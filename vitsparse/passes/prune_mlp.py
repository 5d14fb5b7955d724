"""PruneMLP: remove MLP neurons (hidden units) of the blocks a plan says, physically.

For each block with kept neurons ``S``: fc1's weight keeps rows ``S`` (and its bias those
entries), fc2's weight keeps columns ``S``; the activations between them are ``len(S)`` wide.
Run before BindParams (it narrows ``main``'s weight parameters; ``passes._structure``).
"""

from __future__ import annotations

from vitsparse._tvm import tvm
from vitsparse.frontend import ViTGraph
from vitsparse.passes._structure import rewrite_main
from vitsparse.plan_structure import Structure


@tvm.transform.module_pass(opt_level=0, name="vitsparse.PruneMLP")
class PruneMLP:
    """Slice the MLP neurons ``structure`` drops out of ``main``."""

    def __init__(self, structure: Structure, graph: ViTGraph):
        self.structure = structure
        self.graph = graph

    def transform_module(self, mod, _ctx):
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
        return rewrite_main(mod, slices) if slices else mod
