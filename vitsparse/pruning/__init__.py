"""Pruning criteria: decide what to prune and express it as a PruningPlan.

So far: block masks by magnitude (L1 norm) or at random (``block_mask_plan``), and ``prune``, which
loads a model and parses a ``"ROWSxCOLS:KEEP"`` budget.
"""

from vitsparse.pruning.api import parse_block_spec, prune
from vitsparse.pruning.block_mask import BLOCK_SCORES, DEFAULT_LAYERS, block_mask_plan

__all__ = ["BLOCK_SCORES", "DEFAULT_LAYERS", "block_mask_plan", "parse_block_spec", "prune"]
