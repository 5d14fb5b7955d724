"""A whole plan's cost on a target, predicted from its cost table and corrected by what was
measured: the model `vitsparse search` re-plans with.

A plan's prediction is a sum of components, each named by its shape:

- one per transformer block, ``block embed=.. heads=.. head_dim=.. mlp=.. tokens=..`` (the cost
  table's ``block_ms``, extrapolated beyond its grid);
- one per block-masked linear layer, ``bsr MxKxN block=RxC density=D`` (D to 0.05): what its
  kernel saves, the table's BSR kernel minus its dense kernel (none where BSR is slower: the
  compiler keeps the dense kernel above the break-even density).

The patch embedding, the classifier and the runtime's own overhead are in no component; the
correction absorbs them. **Correction.** Each measured candidate gives the ratio of its
measurement to its raw prediction; every component shape in it takes that ratio as an estimate
of its own factor (a shape in several candidates: the geometric mean of theirs). A new plan's
prediction is its raw prediction times the mean of its components' factors (log-space, weighted
by each component's size), a shape never measured taking the latest measurement's ratio (the
candidate the loop just measured, usually the nearest plan). A plan made only of shapes already
measured is predicted as they measured; the factors carry from one candidate (and one method)
to the next. The same model predicts energy: its factors then turn
the table's milliseconds into measured millijoules.

It is also a criterion cost model (`vitsparse.pruning.budget.CostModel`): ``saving`` and
``model_cost`` are the table's, scaled by the current factors, so NViT and LPViT plan with what
the target measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vitsparse.errors import TargetError
from vitsparse.plan import PruningPlan, Structure
from vitsparse.pruning.cost import TableCost
from vitsparse.pruning.flops import block_shapes
from vitsparse.targets.cost_table import CostTable, block_key

_LAYER_SHAPE = {  # (in, out) of a block's linear layers, from its block shape
    "attn.qkv": lambda s: (s["embed"], 3 * s["heads"] * s["head_dim"]),
    "attn.proj": lambda s: (s["heads"] * s["head_dim"], s["embed"]),
    "mlp.fc1": lambda s: (s["embed"], s["mlp"]),
    "mlp.fc2": lambda s: (s["mlp"], s["embed"]),
}


@dataclass
class Observation:
    """One measured candidate: its raw prediction, the measurement, and its components."""

    label: str
    raw: float
    measured: float
    components: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.measured / self.raw


@dataclass
class LatencyModel:
    """The cost table's prediction of whole plans, corrected by observations (module docstring).
    ``block``: the BSR block size the criteria's savings are priced for."""

    table: CostTable
    block: tuple[int, int] = (16, 16)
    observations: list[Observation] = field(default_factory=list)

    # --- prediction ----------------------------------------------------------------------------

    def components(self, model: torch.nn.Module, plan: PruningPlan | Structure | None) -> dict:
        """{component shape: raw predicted ms} of ``model`` pruned by ``plan``."""
        shapes = block_shapes(model, plan)
        out: dict[str, float] = {}
        for shape in shapes:
            key = block_key(shape)
            out[key] = out.get(key, 0.0) + self.table.block_ms(**shape, extrapolate=True)
        layers = plan.layers if isinstance(plan, PruningPlan) else {}
        for name, mask in layers.items():
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blocks" or ".".join(parts[2:]) not in _LAYER_SHAPE:
                continue
            shape = shapes[int(parts[1])]
            m, k, n = shape["tokens"], mask.in_features, mask.out_features
            dense = self.table.kernel_ms("dense", m, k, n, extrapolate=True)
            sparse = self.table.kernel_ms(
                "bsr", m, k, n, mask.block, max(mask.density, 1e-3), extrapolate=True
            )
            if sparse >= dense:
                continue
            key = (
                f"bsr {m}x{k}x{n} block={mask.block[0]}x{mask.block[1]} "
                f"density={round(mask.density * 20) / 20:g}"
            )
            out[key] = out.get(key, 0.0) + sparse - dense
        return out

    def raw(self, model, plan) -> float:
        """The cost table's prediction alone."""
        return _positive(sum(self.components(model, plan).values()))

    def factor(self, components: dict[str, float]) -> float:
        """The correction for a plan of ``components`` (1 before any observation)."""
        if not self.observations:
            return 1.0
        carried = self.observations[-1].ratio  # the latest: usually the nearest plan
        if not components:
            return carried
        per_shape: dict[str, list[float]] = {}
        for o in self.observations:
            for key in o.components:
                per_shape.setdefault(key, []).append(o.ratio)
        weights = {k: abs(v) for k, v in components.items()}
        total = sum(weights.values()) or 1.0
        logs = sum(
            w * math.log(_geomean(per_shape[k]) if k in per_shape else carried)
            for k, w in weights.items()
        )
        return math.exp(logs / total)

    def predict(self, model, plan) -> float:
        """The corrected prediction of ``model`` pruned by ``plan``."""
        components = self.components(model, plan)
        return _positive(sum(components.values())) * self.factor(components)

    def observe(self, model, plan, measured: float, label: str = "") -> Observation:
        """Record a measurement of ``model`` pruned by ``plan``; later predictions use it."""
        components = self.components(model, plan)
        if not measured or measured <= 0:
            raise TargetError(f"{label or 'a plan'} measured {measured!r}; nothing to learn from")
        obs = Observation(label, _positive(sum(components.values())), float(measured), components)
        self.observations.append(obs)
        return obs

    # --- the criteria's cost model -------------------------------------------------------------

    # One factor for every plan here (the latest measurement's): per-shape factors could make
    # a smaller model cost more than a larger one, and NViT takes differences of these.
    def saving(self, layer: str, shape: tuple[int, int], tokens: int, sparsity: float) -> float:
        cost = TableCost(self.table, self.block)
        return cost.saving(layer, shape, tokens, sparsity) * self.factor({})

    def model_cost(self, model, structure) -> float:
        return self.raw(model, structure) * self.factor({})

    def for_block(self, block: tuple[int, int]) -> LatencyModel:
        """This model pricing BSR kernels of ``block`` (observations shared)."""
        return LatencyModel(self.table, tuple(block), self.observations)


def _positive(ms: float) -> float:
    """A prediction kept above zero: BSR savings priced from separately measured kernels can
    exceed a tiny block's own cost."""
    return max(ms, 1e-6)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
