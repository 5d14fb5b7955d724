"""Uniform structural plans under a budget: every block keeps the same fraction of its heads and
MLP neurons, and the model that fraction of its embedding channels, the highest-scoring ones; the
largest fraction that fits the budget (bisected). The magnitude structure baseline and UP-ViT
both end here, with their own scores."""

from __future__ import annotations

import dataclasses

import torch

from vitsparse.errors import PlanError
from vitsparse.plan import BlockStructure, IndexSet, Structure
from vitsparse.pruning.compose import compose_plan
from vitsparse.pruning.fractions import keep_top


def uniform_plan(
    model: torch.nn.Module,
    scores: dict,
    budget,
    *,
    model_id: str,
    method: str,
    embed: bool = True,
):
    """The plan keeping the same fraction of every block's heads and MLP neurons and of the
    embedding channels (``embed=False``: all of them), the highest-scoring ones (``scores`` as
    from `magnitude_scores`), with the largest fraction that fits ``budget`` (bisected)."""
    dense = budget.measure(model)

    def structure_at(fraction):
        blocks = {
            i: BlockStructure(
                heads=IndexSet(h.size, keep_top(h, fraction)),
                mlp=IndexSet(m.size, keep_top(m, fraction)),
            )
            for i, (h, m) in enumerate(zip(scores["heads"], scores["mlp"], strict=True))
        }
        kept_embed = scores["embed"]
        return Structure(
            embed=IndexSet(kept_embed.size, keep_top(kept_embed, fraction)) if embed else None,
            blocks=blocks,
        )

    lo, hi, best = 0.0, 1.0, None  # kept fraction: the largest whose cost fits
    for _ in range(30):
        mid = (lo + hi) / 2
        if budget.fits(model, structure_at(mid), dense):
            best, lo = mid, mid
        else:
            hi = mid
    if best is None:
        raise PlanError(
            f"budget {budget.metric}={budget.fraction} is below what {method}'s uniform "
            "structures reach (one head, one neuron and one channel everywhere)"
        )
    plan = compose_plan(model, model_id=model_id, method=method, structure=structure_at(best))
    return dataclasses.replace(
        plan, budget={**budget.to_json(), "uniform_keep": round(best, 6), **plan.budget}
    )
