"""The pruning criteria behind one interface: model, calibration images and a budget in, a
PruningPlan out.

    plan = make_plan("nvit", model, images, Budget.parse("flops=0.5"), model_id=...,
                     knobs={"eta": 0.1}, progress=print)

Each criterion lives in its own module and is computed in PyTorch:

- ``magnitude``: the baselines, block-L1 masks (``kind=blocks``) or structure-L2
  (``kind=structure``) at uniform ratios (`vitsparse.pruning.magnitude`);
- ``lpvit``: block masks by Taylor scores and equal-slope allocation (`.lpvit`);
- ``nvit``: Fisher group saliency, global iterative removal (`.nvit`);
- ``upvit``: KL leave-one-out channels at uniform ratios (`.upvit`);
- ``cpvit``: cascade token keep counts and head keeps from attention (`.cpvit`);
- ``combined``: block masks, heads/neurons and tokens in one plan, greedy on the cost model's
  saving per unit of distortion (`.combined`).

Knobs are given as text (``"eta=0.2"``, from the command line) or as values; each criterion
declares its own, and an unknown knob is an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitsparse.errors import PlanError, TargetError
from vitsparse.plan import PruningPlan, parse_block_size
from vitsparse.pruning.budget import Budget
from vitsparse.pruning.combined import combined_plan
from vitsparse.pruning.cost import TableCost
from vitsparse.pruning.cpvit import cpvit_plan
from vitsparse.pruning.lpvit import lpvit_plan
from vitsparse.pruning.magnitude import magnitude_plan
from vitsparse.pruning.nvit import nvit_plan
from vitsparse.pruning.upvit import upvit_plan


def _patterns(text) -> list[str]:
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text]
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def _cost_table(text):
    """A measured cost table (``vitsparse profile -o COST.json``) as the cost model."""
    if not isinstance(text, str | Path):
        return text
    try:
        return TableCost.load(text)
    except TargetError as err:
        raise ValueError(str(err)) from None


@dataclass(frozen=True)
class Criterion:
    """One criterion: its plan function, the knobs it takes (name -> converter from text), the
    budget metrics it can spend, and what it prunes (for help texts)."""

    name: str
    make: Callable[..., PruningPlan]
    prunes: str
    metrics: tuple[str, ...] = ("flops", "params")
    knobs: Mapping[str, Callable] = field(default_factory=dict)
    reads_calibration: bool = True

    def parse_knobs(self, knobs: Mapping[str, object] | None) -> dict:
        """Knob values converted to their types; PlanError names a bad or unknown knob."""
        out = {}
        for key, value in (knobs or {}).items():
            if key not in self.knobs:
                known = ", ".join(sorted(self.knobs)) or "none"
                raise PlanError(f"{self.name} has no knob {key!r} (its knobs: {known})")
            try:
                out[key] = self.knobs[key](value)
            except (TypeError, ValueError) as err:
                raise PlanError(f"{self.name} knob {key}: {err}") from None
        return out


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion(
            "magnitude",
            magnitude_plan,
            "block masks (kind=blocks, L1) or heads/neurons/channels (kind=structure, L2), "
            "uniform ratios",
            knobs={"kind": str, "block": parse_block_size, "embed": _bool},
            reads_calibration=False,
        ),
        Criterion(
            "lpvit",
            lpvit_plan,
            "block masks, densities allocated across layers",
            knobs={
                "block": parse_block_size,
                "layers": _patterns,
                "beta_scale": float,
                "cost": _cost_table,
            },
        ),
        Criterion(
            "nvit",
            nvit_plan,
            "embedding channels, heads, q/k and v dims, MLP neurons (global ranking)",
            knobs={"eta": float, "steps": int, "batch": int, "seed": int, "cost": _cost_table},
        ),
        Criterion(
            "upvit",
            upvit_plan,
            "heads, MLP neurons, embedding channels (uniform ratios)",
            knobs={"embed": _bool, "batch": int},
        ),
        Criterion(
            "cpvit",
            cpvit_plan,
            "patch tokens (keep counts per block) and heads",
            metrics=("flops",),
            knobs={"head_share": float, "min_tokens": int, "batch": int},
        ),
        Criterion(
            "combined",
            combined_plan,
            "block masks, heads and MLP neurons, and tokens in one plan (greedy on saving per "
            "unit of distortion)",
            knobs={"block": parse_block_size, "step": float, "cost": _cost_table, "batch": int},
        ),
    )
}


def criterion(name: str) -> Criterion:
    """The criterion called ``name`` (PlanError lists the known ones)."""
    if name not in CRITERIA:
        raise PlanError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA)}")
    return CRITERIA[name]


def parse_knob_args(items) -> dict[str, str]:
    """``["eta=0.2", "steps=5"]`` -> ``{"eta": "0.2", "steps": "5"}``."""
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise PlanError(f"knob {item!r} is not KEY=VALUE, e.g. eta=0.2")
        out[key.strip()] = value.strip()
    return out


def make_plan(
    method: str,
    model: torch.nn.Module,
    calibration: torch.Tensor | None,
    budget: Budget,
    *,
    model_id: str,
    knobs: Mapping[str, object] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PruningPlan:
    """``method``'s plan of ``model`` within ``budget`` from ``calibration`` images."""
    spec = criterion(method)
    if budget.metric not in spec.metrics:
        raise PlanError(
            f"{method} cannot spend a {budget.metric} budget (it prunes {spec.prunes}); "
            f"give {' or '.join(m + '=F' for m in spec.metrics)}"
        )
    return spec.make(
        model,
        calibration,
        budget,
        model_id=model_id,
        progress=progress,
        **spec.parse_knobs(knobs),
    )
