"""Pruning criteria: decide what to prune and express it as a PruningPlan.

With explicit fractions, by magnitude (L1 norm) or at random: block masks (``block_mask_plan``),
structures (heads, MLP neurons, embedding channels, token counts; ``structure_plan``), one plan
composing both (``compose_plan``). Under a budget, the criteria of `vitsparse.pruning.criteria`
(``make_plan``): magnitude baselines, LPViT, NViT, UP-ViT and CP-ViT. ``prune`` loads a model and
parses the budgets for both.
"""

from vitsparse.pruning.api import compose_plan, parse_block_spec, prune
from vitsparse.pruning.block_mask import BLOCK_SCORES, DEFAULT_LAYERS, block_mask_plan
from vitsparse.pruning.criteria import CRITERIA, make_plan
from vitsparse.pruning.structure import parse_token_spec, structure_plan

__all__ = [
    "BLOCK_SCORES",
    "CRITERIA",
    "DEFAULT_LAYERS",
    "block_mask_plan",
    "compose_plan",
    "make_plan",
    "parse_block_spec",
    "parse_token_spec",
    "prune",
    "structure_plan",
]
