"""Deciding what to prune: plans by explicit fractions (magnitude or random block masks and
structures, composed in one plan) and the criteria under a budget (the magnitude baselines,
LPViT, NViT, UP-ViT, CP-ViT), their budgets and cost models, FLOPs and weight counts, and the
accuracy and fidelity of a pruned model. Computed in PyTorch; the plan is the only output.
"""

from vitsparse.pruning.block_mask import BLOCK_SCORES, DEFAULT_LAYERS, block_mask_plan
from vitsparse.pruning.compose import compose_plan
from vitsparse.pruning.criteria import CRITERIA, make_plan
from vitsparse.pruning.fractions import parse_block_spec, parse_token_spec, structure_plan

__all__ = [
    "BLOCK_SCORES",
    "CRITERIA",
    "DEFAULT_LAYERS",
    "block_mask_plan",
    "compose_plan",
    "make_plan",
    "parse_block_spec",
    "parse_token_spec",
    "structure_plan",
]
