"""Combined: block masks, heads/MLP neurons and tokens in one plan, the budget spent where a cost
model's saving per unit of distortion is highest.

Three knobs, each a kept fraction, start at 1 (dense):

- ``structure``: every block keeps that fraction of its heads and MLP neurons, the largest-L2
  ones (`fractions.magnitude_scores`, as the magnitude structure baseline);
- ``tokens``: after the blocks at a quarter, half and three quarters of the depth, that fraction
  of the patch tokens still there is kept (the ``cls_attention`` rule);
- ``blocks``: every linear layer of the blocks keeps that fraction of its ``block`` blocks on
  the weights the structure leaves, the largest-L1 ones.

Greedy: at every step each knob is lowered by ``step`` in turn, each trial plan is priced with
the cost model (`vitsparse.pruning.budget.CostModel`; a measured `LatencyModel` in
`vitsparse search`, multiply-accumulates by default) and its distortion measured as the mean
KL(dense || pruned) on the calibration images; the step with the largest saving per unit of
distortion added is taken. When a step crosses the budget, the knob it lowered is bisected back
to the largest value that fits. The budget is FLOPs or weights, like every criterion's.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vitsparse.errors import PlanError
from vitsparse.plan import (
    PruningPlan,
    Structure,
    apply_plan_to_torch,
    apply_structure,
    geometry_of,
)
from vitsparse.pruning.budget import Budget, FlopsCost
from vitsparse.pruning.compose import compose_plan
from vitsparse.pruning.flops import flops
from vitsparse.pruning.fractions import structure_plan

KNOBS = ("structure", "tokens", "blocks")
FLOOR = {"structure": 0.1, "tokens": 0.1, "blocks": 0.05}


def combined_plan(
    model: torch.nn.Module,
    calibration: torch.Tensor | None,
    budget: Budget,
    *,
    model_id: str,
    block: tuple[int, int] = (16, 16),
    step: float = 0.1,
    cost=None,
    batch: int = 32,
    progress=None,
) -> PruningPlan:
    """The combined plan of ``model`` within ``budget`` (see the module docstring)."""
    if calibration is None or len(calibration) == 0:
        raise PlanError("combined measures distortion on calibration images; none were given")
    if not 0 < step < 1:
        raise PlanError(f"combined knob step must be in (0, 1), got {step}")
    say = progress or (lambda _msg: None)
    cost = cost or FlopsCost()
    geo = geometry_of(model)
    model = model.eval()
    token_blocks = sorted({max(1, round(geo.depth * q)) for q in (0.25, 0.5, 0.75)})
    dense_measure = budget.measure(model)

    def plan_at(keep: dict) -> PruningPlan:
        structure = structure_plan(
            model,
            heads=keep["structure"] if keep["structure"] < 1 else None,
            mlp=_whole_blocks(keep["structure"], geo.mlp_dim[0], block)
            if keep["structure"] < 1
            else None,
            tokens=(
                f"{keep['tokens']:.6f}@{','.join(map(str, token_blocks))}"
                if keep["tokens"] < 1
                else None
            ),
        )
        if keep["blocks"] >= 1:
            blocks, layers = None, None
        else:  # the layers of the blocks whose sliced weights the block size divides
            shaped = apply_structure(model, structure) if not structure.empty else model
            blocks = (block, keep["blocks"])
            layers = [
                name
                for name, m in shaped.named_modules()
                if name.startswith("blocks.")
                and isinstance(m, torch.nn.Linear)
                and m.out_features % block[0] == 0
                and m.in_features % block[1] == 0
            ]
            if not layers:
                blocks, layers = None, None
        # "magnitude": how the block masks are scored (largest L1 kept)
        return compose_plan(
            model,
            model_id=model_id,
            method="magnitude",
            structure=structure,
            block_spec=blocks,
            layers=layers,
        )

    with torch.no_grad():
        dense_logits = _logits(model, calibration, batch)

    def distortion(plan: PruningPlan) -> float:
        pruned = apply_plan_to_torch(model, plan, check_hash=False).eval()
        with torch.no_grad():
            logits = _logits(pruned, calibration, batch)
        log_p, log_q = dense_logits.log_softmax(-1), logits.log_softmax(-1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    def price(plan: PruningPlan) -> float:
        if hasattr(cost, "predict"):  # a whole-plan model (masks included): LatencyModel
            return cost.predict(model, plan)
        if isinstance(cost, FlopsCost):
            return float(flops(model, plan).macs)
        return cost.model_cost(model, plan.structure or Structure())

    keep = dict.fromkeys(KNOBS, 1.0)
    current = plan_at(keep)
    current_cost, current_kl = price(current), 0.0
    steps = 0
    while not budget.fits(model, current, dense_measure):
        best = None
        for knob in KNOBS:
            if keep[knob] - step < FLOOR[knob] - 1e-9:
                continue
            trial_keep = {**keep, knob: round(keep[knob] - step, 6)}
            trial = plan_at(trial_keep)
            kl = distortion(trial)
            saved = current_cost - price(trial)
            score = saved / max(kl - current_kl, 1e-6)
            if best is None or score > best[0]:
                best = (score, knob, trial_keep, trial, kl)
        if best is None:
            raise PlanError(
                f"budget {budget.metric}={budget.fraction} is below what combined reaches "
                f"(structure {FLOOR['structure']}, tokens {FLOOR['tokens']}, blocks "
                f"{FLOOR['blocks']} kept)"
            )
        _, knob, keep, current, current_kl = best
        current_cost = price(current)
        steps += 1
        say(
            f"[combined] step {steps}: {knob} -> {keep[knob]:.2f} "
            f"(kept {budget.kept(model, current, dense_measure):.3f} of {budget.metric}, "
            f"KL {current_kl:.4f})"
        )
        if budget.fits(model, current, dense_measure):
            # The step crossed the budget: give back as much of it as still fits.
            lo, hi = keep[knob], keep[knob] + step
            for _ in range(12):
                mid = (lo + hi) / 2
                if budget.fits(model, plan_at({**keep, knob: mid}), dense_measure):
                    lo = mid
                else:
                    hi = mid
            keep = {**keep, knob: math.floor(lo * 1e6) / 1e6}
            current = plan_at(keep)
    return dataclasses.replace(
        current,
        method="combined",
        budget={**budget.to_json(), "combined_keep": keep, **current.budget},
    )


def _whole_blocks(fraction: float, neurons: int, block: tuple[int, int]) -> float:
    """``fraction`` of ``neurons`` rounded to whole blocks (so block masks still fit the MLP
    weights once it is sliced), at least one block."""
    step = math.lcm(*block)
    kept = max(step, round(fraction * neurons / step) * step)
    return min(kept, neurons) / neurons


def _logits(model, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch]).float() for i in range(0, len(images), batch)])
