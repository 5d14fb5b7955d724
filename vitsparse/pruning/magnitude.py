"""The magnitude baselines at a budget: what every paper criterion is compared against.

- ``kind="blocks"`` (block-L1): every selected linear layer keeps the same fraction of its
  blocks, the largest-L1 ones; the largest fraction that fits the budget.
- ``kind="structure"`` (structure-L2): every block keeps the same fraction of its heads and of its
  MLP neurons, and the model that fraction of its embedding channels, the ones with the largest
  L2 norm over every weight they own (`fractions.magnitude_scores`); the largest fraction that
  fits the budget.

Neither reads calibration data.
"""

from __future__ import annotations

import torch

from vitsparse.errors import PlanError
from vitsparse.plan import PruningPlan
from vitsparse.pruning.block_mask import block_mask_plan_for_budget
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.fractions import magnitude_scores
from vitsparse.pruning.uniform import uniform_plan

KINDS = ("blocks", "structure")


def magnitude_plan(
    model: torch.nn.Module,
    calibration: torch.Tensor | None,
    budget: Budget,
    *,
    model_id: str,
    kind: str = "blocks",
    block: tuple[int, int] = (16, 16),
    embed: bool = True,
    progress=None,
) -> PruningPlan:
    """The magnitude baseline plan of ``model`` within ``budget`` (``calibration`` and
    ``progress`` are unused: they are there so that every criterion is called the same way)."""
    del calibration, progress
    if kind == "blocks":
        return block_mask_plan_for_budget(model, budget, model_id=model_id, block=block)
    if kind == "structure":
        scores = magnitude_scores(model, norm="l2")
        return uniform_plan(
            model, scores, budget, model_id=model_id, method="magnitude", embed=embed
        )
    raise PlanError(f"magnitude kind {kind!r} is not one of {', '.join(KINDS)}")
