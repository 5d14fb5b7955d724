"""What a criterion spends and what it costs: budgets and the cost interface.

A budget keeps a fraction of the model's FLOPs (``flops=0.5``) or of its linear-layer parameters
(``params=0.5``). A cost model says what pruning a layer saves; criteria trade that saving
against the distortion pruning causes. `FlopsCost` is the analytic one (multiply-accumulates
saved); a measured cost table (latency or energy per layer and density on a target) implements
the same interface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from vitsparse.errors import PlanError

_BUDGET = re.compile(r"\s*(flops|params)\s*=\s*([0-9.eE+-]+)\s*")


@dataclass(frozen=True)
class Budget:
    """Keep ``fraction`` of the model's ``metric`` (``"flops"`` or ``"params"``)."""

    metric: str
    fraction: float

    def __post_init__(self):
        if self.metric not in ("flops", "params"):
            raise PlanError(f"budget metric {self.metric!r} is not 'flops' or 'params'")
        if not 0 < self.fraction <= 1:
            raise PlanError(
                f"budget {self.metric}={self.fraction} is not a kept fraction in (0, 1]"
            )

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"flops=0.5"`` or ``"params=0.3"``."""
        match = _BUDGET.fullmatch(text) if isinstance(text, str) else None
        try:
            fraction = float(match.group(2)) if match else None
        except ValueError:
            fraction = None
        if fraction is None:
            raise PlanError(
                f"budget {text!r} is not METRIC=FRACTION (METRIC flops or params), e.g. flops=0.5"
            )
        return cls(match.group(1), fraction)

    def to_json(self) -> dict:
        return {self.metric: self.fraction}


class CostModel(Protocol):
    """What pruning the fraction ``s`` of a layer's blocks saves (higher: more worth pruning)."""

    def saving(self, layer: str, shape: tuple[int, int], tokens: int, sparsity: float) -> float: ...


class FlopsCost:
    """The analytic cost: multiply-accumulates saved (tokens x out x in x sparsity)."""

    def saving(self, layer: str, shape: tuple[int, int], tokens: int, sparsity: float) -> float:
        return tokens * shape[0] * shape[1] * sparsity
