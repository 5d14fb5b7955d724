"""What a criterion spends and what it costs: budgets and the cost interface.

A budget keeps a fraction of the model's FLOPs (``flops=0.5``, see `vitsparse.pruning.flops.flops`)
or of its weights (``params=0.5``: patch projection, linear layers and classifier, see
`vitsparse.pruning.flops.params`). A cost model says what pruning saves; criteria trade that saving
against the distortion pruning causes:

- ``saving(layer, shape, tokens, sparsity)``: what pruning that fraction of one layer's blocks
  saves (LPViT);
- ``model_cost(model, structure)``: what the model with a structure applied costs (NViT's
  latency-aware regularisation takes differences of it).

`FlopsCost` is the analytic one (multiply-accumulates); a measured cost table (latency or energy
per layer, density and block shape on a target) implements the same interface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from vitsparse.errors import PlanError
from vitsparse.pruning._specs import match_number
from vitsparse.pruning.flops import flops, params

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
        error = f"budget {text!r} is not METRIC=FRACTION (METRIC flops or params), e.g. flops=0.5"
        match, fraction = match_number(_BUDGET, text, 2, error)
        return cls(match.group(1), fraction)

    def to_json(self) -> dict:
        return {self.metric: self.fraction}

    def measure(self, model, plan=None) -> float:
        """The budget's metric of ``model`` pruned by ``plan`` (a PruningPlan or a bare
        `Structure`): MACs or weights."""
        if self.metric == "flops":
            return float(flops(model, plan).macs)
        return float(params(model, plan))

    def kept(self, model, plan=None, dense: float | None = None) -> float:
        """The fraction of the dense model's metric that ``plan`` keeps (``dense``: the dense
        model's `measure`, when the caller has it already)."""
        return self.measure(model, plan) / (self.measure(model) if dense is None else dense)

    def fits(self, model, plan=None, dense: float | None = None) -> bool:
        """Whether ``plan`` keeps at most the budget's fraction (within rounding)."""
        return self.kept(model, plan, dense) <= self.fraction * (1 + 1e-9)


_MEASURED = re.compile(r"\s*(latency|energy)\s*=\s*([0-9.eE+-]+)\s*(ms|s|mj|j)?\s*", re.IGNORECASE)
_UNIT_SCALE = {"ms": 1.0, "s": 1000.0, "mj": 1.0, "j": 1000.0}


@dataclass(frozen=True)
class MeasuredBudget:
    """A budget measured on the target: the latency (ms) or energy (mJ) of one inference of
    ``batch`` images on ``threads`` threads (None: every core the runtime may use), either an
    absolute ``value`` (``latency=12.5ms``, ``energy=40mJ``) or, with ``relative``, a fraction of
    the dense compiled model's, measured on the same target in the same run (``latency=0.5``)."""

    metric: str
    value: float
    relative: bool
    batch: int = 1
    threads: int | None = None

    def __post_init__(self):
        if self.metric not in ("latency", "energy"):
            raise PlanError(f"measured budget metric {self.metric!r} is not latency or energy")
        if not self.value > 0 or (self.relative and self.value > 1):
            what = "a fraction in (0, 1]" if self.relative else "a positive amount"
            raise PlanError(f"budget {self.metric}={self.value:g} is not {what}")
        if self.batch < 1 or (self.threads is not None and self.threads < 1):
            raise PlanError("a budget holds for batch >= 1 and threads >= 1")

    @property
    def unit(self) -> str:
        return "ms" if self.metric == "latency" else "mJ"

    @classmethod
    def parse(cls, text: str, *, batch: int = 1, threads: int | None = None) -> MeasuredBudget:
        """``"latency=12.5ms"``, ``"latency=0.5"``, ``"energy=40mJ"``, ``"energy=0.5"`` (units
        ms or s for latency, mJ or J for energy; no unit: a fraction of the dense model's)."""
        error = (
            f"budget {text!r} is not latency=12.5ms, latency=0.5 (of dense), energy=40mJ or "
            "energy=0.5"
        )
        match, number = match_number(_MEASURED, text, 2, error)
        metric, unit = match.group(1).lower(), (match.group(3) or "").lower()
        if unit and (unit in ("ms", "s")) != (metric == "latency"):
            raise PlanError(f"budget {text!r}: {unit} is not a unit of {metric}")
        if not unit:
            return cls(metric, number, True, batch, threads)
        return cls(metric, number * _UNIT_SCALE[unit], False, batch, threads)

    def absolute(self, dense: float) -> float:
        """The budget in ms (or mJ), given the dense model's measurement ``dense``."""
        return self.value * dense if self.relative else self.value

    def describe(self) -> str:
        amount = f"{self.value:g} of dense" if self.relative else f"{self.value:g} {self.unit}"
        threads = "every core" if self.threads is None else f"{self.threads} threads"
        return f"{self.metric} <= {amount} (batch {self.batch}, {threads})"

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "value": self.value,
            "relative": self.relative,
            "unit": None if self.relative else self.unit,
            "batch": self.batch,
            "threads": self.threads,
        }


def parse_budget(text: str, **measured) -> Budget | MeasuredBudget:
    """A FLOPs/params budget or a measured one (``measured``: `MeasuredBudget.parse`'s batch
    and threads)."""
    if isinstance(text, str) and text.strip().lower().startswith(("latency", "energy")):
        return MeasuredBudget.parse(text, **measured)
    return Budget.parse(text)


class CostModel(Protocol):
    """What pruning costs and saves on a target (higher saving: more worth pruning)."""

    def saving(self, layer: str, shape: tuple[int, int], tokens: int, sparsity: float) -> float:
        """What pruning the fraction ``sparsity`` of a layer's blocks saves."""
        ...

    def model_cost(self, model, structure) -> float:
        """The cost of ``model`` with ``structure`` (a `Structure`) applied."""
        ...


class FlopsCost:
    """The analytic cost: multiply-accumulates."""

    def saving(self, layer: str, shape: tuple[int, int], tokens: int, sparsity: float) -> float:
        return tokens * shape[0] * shape[1] * sparsity

    def model_cost(self, model, structure) -> float:
        return float(flops(model, structure).macs)
