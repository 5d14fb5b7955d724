"""A whole plan's cost on a target, predicted from its cost table and corrected by what was
measured: the model `vitsparse search` re-plans with.

A plan's prediction is a sum of components, each named by its shape:

- one per transformer block, ``block embed=.. heads=.. head_dim=.. mlp=.. tokens=..`` (the cost
  table's ``block_ms``, extrapolated beyond its grid);
- one per block-masked linear layer, ``bsr MxKxN block=RxC density=D`` (D to 0.05): what its
  kernel saves, the table's BSR kernel minus its dense kernel (none where BSR is slower: the
  compiler keeps the dense kernel above the break-even density);
- one for the rest, ``rest embed=..``: the patch embedding and the classifier as dense kernels.

The runtime's own overhead is in no component; the correction absorbs it.

**Correction.** Every component shape has a factor, measured ms per predicted ms, fitted from
the measured candidates in the order they were measured. A candidate's shapes that an earlier
one already fixed keep their factors; what it measured beyond them, divided by the raw cost of
its new shapes, is the factor of each new shape (bounded to a quarter..4x of its whole-plan
ratio). A candidate with no new shape of weight spreads its ratio of measured to predicted over
its shapes (a shape seen several times: the geometric mean of its estimates). So the dense
model fixes the dense block and the rest; a token plan whose first blocks are dense is then
explained by its pruned blocks alone, not by a ratio smeared over all of them. A plan's
prediction is the sum of its components, each times its factor; a shape never measured takes
the factor of the nearest measured shape of its kind (block, BSR saving, rest: nearest in
log cost), the latest measurement's whole-plan ratio when there is none. The factors carry from
one candidate (and one method) to the next. The same model predicts energy: its factors then
turn the table's milliseconds into measured millijoules.

It is also a criterion cost model (`vitsparse.pruning.budget.CostModel`): ``saving`` and
``model_cost`` are the table's, scaled by the latest measurement's whole-plan ratio, so NViT and
LPViT plan in what the target measured (one factor for every plan: per-shape factors could make
a smaller model cost more than a larger one, and NViT takes differences of these).
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


# A candidate's new shapes are fitted alone when they hold at least this share of its raw cost;
# a fitted factor stays within BOUND times the candidate's whole-plan ratio.
NEW_SHARE = 0.05
BOUND = 4.0


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
    _units: dict[str, float] = field(default_factory=dict, repr=False)  # key: one instance's ms

    # --- prediction ----------------------------------------------------------------------------

    def components(self, model: torch.nn.Module, plan: PruningPlan | Structure | None) -> dict:
        """{component shape: raw predicted ms} of ``model`` pruned by ``plan``."""
        shapes = block_shapes(model, plan)
        out: dict[str, float] = {}
        for shape in shapes:
            key = block_key(shape)
            self._units[key] = self.table.block_ms(**shape, extrapolate=True)
            out[key] = out.get(key, 0.0) + self._units[key]
        rest = self._rest(model, shapes[0]["embed"] if shapes else None)
        if rest is not None:
            out[rest[0]] = self._units[rest[0]] = rest[1]
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
            self._units[key] = sparse - dense
            out[key] = out.get(key, 0.0) + sparse - dense
        return out

    def _rest(self, model, embed: int | None) -> tuple[str, float] | None:
        """(key, raw ms) of the patch embedding and the classifier at embedding ``embed``, as
        dense kernels; None for a model without them or a table without dense kernels."""
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        weight = getattr(proj, "weight", None)
        if embed is None or weight is None or weight.dim() != 4:
            return None
        patches = int(model.patch_embed.num_patches)
        head = getattr(model, "head", None)
        classes = int(head.out_features) if isinstance(head, torch.nn.Linear) else 0
        try:
            ms = self.table.kernel_ms(
                "dense", patches, int(weight[0].numel()), embed, extrapolate=True
            )
            if classes:
                ms += self.table.kernel_ms("dense", 1, embed, classes, extrapolate=True)
        except TargetError:
            return None
        return f"rest embed={embed}", ms

    def raw(self, model, plan) -> float:
        """The cost table's prediction alone."""
        return _positive(sum(self.components(model, plan).values()))

    def factors(self) -> dict[str, float]:
        """{component shape: factor} fitted from the observations (module docstring)."""
        estimates: dict[str, list[float]] = {}
        for o in self.observations:
            fixed = {k: _geomean(estimates[k]) for k in o.components if k in estimates}
            known = sum(fixed[k] * c for k, c in o.components.items() if k in fixed)
            new = {k: c for k, c in o.components.items() if k not in fixed}
            weight = sum(abs(c) for c in o.components.values()) or 1.0
            if new and abs(sum(new.values())) >= NEW_SHARE * weight:
                f = (o.measured - known) / sum(new.values())
                f = min(max(f, o.ratio / BOUND), o.ratio * BOUND)
                for k in new:
                    estimates[k] = [f]
                continue
            predicted = known + sum(new.values()) * o.ratio
            r = o.measured / predicted if predicted > 0 else o.ratio
            for k in o.components:
                estimates.setdefault(k, []).append(fixed.get(k, o.ratio) * r)
        return {k: _geomean(v) for k, v in estimates.items()}

    def factor(self, components: dict[str, float]) -> float:
        """The correction of a plan of ``components``: its prediction over its raw cost (1
        before any observation; the latest measurement's ratio for no components)."""
        if not self.observations:
            return 1.0
        if not components:
            return self.observations[-1].ratio
        raw = _positive(sum(components.values()))
        return _positive(self._corrected(components)) / raw

    def _corrected(self, components: dict[str, float]) -> float:
        fitted = self.factors()
        carried = self.observations[-1].ratio
        total = 0.0
        for key, c in components.items():
            f = fitted.get(key)
            if f is None:
                f = self._nearest(key, fitted, carried)
            total += f * c
        return total

    def _nearest(self, key: str, fitted: dict[str, float], carried: float) -> float:
        """The factor of the measured shape of ``key``'s kind nearest it in log unit cost."""
        kind = key.split(" ", 1)[0]
        unit = abs(self._units.get(key, 0.0))
        same = [k for k in fitted if k.split(" ", 1)[0] == kind and self._units.get(k)]
        if not same or unit <= 0:
            return carried
        nearest = min(same, key=lambda k: abs(math.log(abs(self._units[k]) / unit)))
        return fitted[nearest]

    def predict(self, model, plan) -> float:
        """The corrected prediction of ``model`` pruned by ``plan``."""
        components = self.components(model, plan)
        if not self.observations:
            return _positive(sum(components.values()))
        return _positive(self._corrected(components))

    def observe(self, model, plan, measured: float, label: str = "") -> Observation:
        """Record a measurement of ``model`` pruned by ``plan``; later predictions use it."""
        components = self.components(model, plan)
        if not measured or measured <= 0:
            raise TargetError(f"{label or 'a plan'} measured {measured!r}; nothing to learn from")
        obs = Observation(label, _positive(sum(components.values())), float(measured), components)
        self.observations.append(obs)
        return obs

    # --- the criteria's cost model -------------------------------------------------------------

    def saving(self, layer: str, shape: tuple[int, int], tokens: int, sparsity: float) -> float:
        cost = TableCost(self.table, self.block)
        return cost.saving(layer, shape, tokens, sparsity) * self.factor({})

    def model_cost(self, model, structure) -> float:
        return self.raw(model, structure) * self.factor({})

    def for_block(self, block: tuple[int, int]) -> LatencyModel:
        """This model pricing BSR kernels of ``block`` (observations shared)."""
        return LatencyModel(self.table, tuple(block), self.observations, self._units)


def _positive(ms: float) -> float:
    """A prediction kept above zero: BSR savings priced from separately measured kernels can
    exceed a tiny block's own cost."""
    return max(ms, 1e-6)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
