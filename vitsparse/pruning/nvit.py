"""NViT: global structural pruning by Hessian-aware (Fisher) group saliency, with latency-aware
regularisation (../shared/PAPERS.md, section 2).

Units: embedding channels (one set for the whole model), and per block heads, q/k dims and v dims
(shared by the block's heads) and MLP neurons; all physically removed by the plan's structure.

1. **Saliency.** Every unit ``u`` gets a gate ``m_u = 1`` on its output (the residual stream
   writes for an embedding channel, the head's output before proj, the q entry of a q/k dim, the
   v entry of a v dim, the MLP activation). ``c_u = dL/dm_u`` is the first-order change of the
   loss when ``u`` is removed: the sum of ``theta * dL/dtheta`` over the weights leaving ``u``,
   NViT's ``c_u``, and one quantity for every unit type, so no per-type normalisation is needed.
   The loss is label-free: the negative log-likelihood of labels drawn (seeded) from the dense
   model's softmax on the calibration images, so that ``E[c^2]`` is the Fisher, the Hessian of
   ``KL(dense || pruned)`` (the KL's own gradient is zero at the dense model). Gates are per image,
   so one backward pass gives every per-image ``c_u``; a group ``G``'s saliency is
   ``mean over images of (sum_{u in G} c_u)^2``.
2. **Groups.** Within each dimension, units are sorted by their own saliency and chunked lowest
   first (paper sizes: embedding 16, heads 2, q/k 8, v 8, MLP 16; a dimension smaller than 8
   groups uses ``size // 8``, at least 1), never below the floors (heads 2, q/k 8, v 8, MLP 16,
   embedding 16, or the whole dimension where it is smaller).
3. **Latency-aware regularisation.** ``score = S / median(S) - eta * saving / median(saving)``,
   where ``saving`` is the cost model's drop in model cost when the group is removed
   (`budget.FlopsCost` by default: MACs; a measured cost table plugs into ``model_cost``). A
   group that saves more is removed earlier.
4. **Global iterative removal.** In ``steps`` steps towards the budget (a linear schedule of the
   budget's metric), the lowest-scoring groups across the whole model are removed until the
   step's target holds; saliencies and savings are then recomputed on the pruned model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from vitsparse._progress import ProgressBar
from vitsparse.errors import DataError, PlanError
from vitsparse.plan import (
    BlockStructure,
    IndexSet,
    PruningPlan,
    Structure,
    apply_structure,
    geometry_of,
)
from vitsparse.pruning._hooks import hooked
from vitsparse.pruning.budget import Budget, CostModel, FlopsCost
from vitsparse.pruning.compose import compose_plan

GROUPS = {"embed": 16, "heads": 2, "qk": 8, "v": 8, "mlp": 16}
FLOORS = {"embed": 16, "heads": 2, "qk": 8, "v": 8, "mlp": 16}
ETA = 0.1
BLOCK_PARTS = ("heads", "qk", "v", "mlp")


@dataclasses.dataclass
class _Kept:
    """Kept original indices per dimension: ``embed`` and ``(block, part)``."""

    dims: dict  # key -> list of original indices
    sizes: dict  # key -> original size

    def structure(self) -> Structure:
        def index(key):
            return IndexSet(self.sizes[key], tuple(self.dims[key]))

        depth = 1 + max(k[0] for k in self.dims if k != "embed")
        blocks = {
            i: BlockStructure(
                heads=index((i, "heads")),
                qk_dims=index((i, "qk")),
                v_dims=index((i, "v")),
                mlp=index((i, "mlp")),
            )
            for i in range(depth)
        }
        return Structure(embed=index("embed"), blocks=blocks)

    def without(self, key, positions) -> _Kept:
        """A copy with the units at ``positions`` (indices into the kept list) of ``key`` gone."""
        drop = set(positions)
        dims = dict(self.dims)
        dims[key] = [u for j, u in enumerate(self.dims[key]) if j not in drop]
        return _Kept(dims, self.sizes)


class _Gates:
    """Per-image gates (rows, units) on the units of a `PrunedViT`, and the forward hooks that
    apply them (``hooks``, registered by `hooked`)."""

    def __init__(self, pruned, rows: int):
        self.gates: dict = {}
        self.hooks: list = []

        def gate(key, size):
            g = torch.ones(rows, size, requires_grad=True)
            self.gates[key] = g
            return g

        embed = gate("embed", pruned.pos_embed.shape[-1])

        def stream(_m, _i, out):
            return out * embed[:, None, :]

        self.hooks.append((pruned.norm_pre, "forward", stream))
        for i, blk in enumerate(pruned.blocks):
            attn = blk.attn
            heads, qk = gate((i, "heads"), attn.heads), gate((i, "qk"), attn.qk_dim)
            vd = gate((i, "v"), attn.v_dim)
            mlp = gate((i, "mlp"), blk.mlp.fc1.out_features)

            def qkv_hook(_m, _i, out, attn=attn, qk=qk, vd=vd):
                k_part = torch.ones(out.shape[0], attn.heads * attn.qk_dim)
                mult = torch.cat([qk.repeat(1, attn.heads), k_part, vd.repeat(1, attn.heads)], 1)
                return out * mult[:, None, :]

            def head_hook(_m, inputs, attn=attn, heads=heads):
                return (inputs[0] * heads.repeat_interleave(attn.v_dim, dim=1)[:, None, :],)

            def mlp_hook(_m, _i, out, mlp=mlp):
                return out * mlp[:, None, :]

            self.hooks += [
                (attn.qkv, "forward", qkv_hook),
                (attn.proj, "pre", head_hook),
                (attn.proj, "forward", stream),
                (blk.mlp.act, "forward", mlp_hook),
                (blk.mlp.fc2, "forward", stream),
            ]


def unit_gradients(
    model: torch.nn.Module,
    structure: Structure,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch: int = 32,
) -> dict:
    """Per-image ``c_u = dL/dm_u`` of every kept unit of ``model`` with ``structure`` applied:
    ``{key: (images, units)}`` (keys ``"embed"`` and ``(block, part)``)."""
    pruned = apply_structure(model, structure)
    for p in pruned.parameters():
        p.requires_grad_(False)
    out: dict = {}
    for start in range(0, len(images), batch):
        x, y = images[start : start + batch], labels[start : start + batch]
        gates = _Gates(pruned, len(x))
        with hooked(gates.hooks):
            logits = pruned(x)
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
        for key, g in gates.gates.items():
            out.setdefault(key, []).append(g.grad.detach().double())
    return {key: torch.cat(parts).numpy() for key, parts in out.items()}


def _group_size(key, size: int, groups: dict) -> int:
    part = "embed" if key == "embed" else key[1]
    return max(1, min(groups[part], size // 8))


def _floor(key, original: int, floors: dict) -> int:
    part = "embed" if key == "embed" else key[1]
    return min(floors[part], original)


def nvit_plan(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    budget: Budget,
    *,
    model_id: str,
    cost: CostModel | None = None,
    eta: float = ETA,
    steps: int = 10,
    groups: dict | None = None,
    floors: dict | None = None,
    batch: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> PruningPlan:
    """The NViT structural plan of ``model`` within ``budget`` (see the module docstring)."""
    if len(calibration) == 0:
        raise DataError("the calibration set is empty")
    if steps < 1:
        raise PlanError(f"nvit steps must be at least 1, got {steps}")
    if eta < 0:
        raise PlanError(f"nvit eta must be >= 0 (a saving makes a group cheaper), got {eta}")
    groups = {**GROUPS, **(groups or {})}
    floors = {**FLOORS, **(floors or {})}
    cost = cost or FlopsCost()
    geo = geometry_of(model)
    model = model.eval()
    with torch.no_grad():
        probs = model(calibration).softmax(-1)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
    sizes = {"embed": geo.embed_dim}
    for i in range(geo.depth):
        sizes.update(
            {(i, "heads"): geo.num_heads[i], (i, "qk"): geo.head_dim[i]}
            | {(i, "v"): geo.head_dim[i], (i, "mlp"): geo.mlp_dim[i]}
        )
    kept = _Kept({key: list(range(n)) for key, n in sizes.items()}, sizes)
    dense = budget.measure(model)

    bar = ProgressBar(f"[nvit] {steps} steps to {budget.metric}={budget.fraction}", steps, progress)
    for step in range(1, steps + 1):
        target = dense * (1 - (1 - budget.fraction) * step / steps)
        if budget.measure(model, kept.structure()) <= target * (1 + 1e-9):
            bar.advance()
            continue
        grads = unit_gradients(model, kept.structure(), calibration, labels, batch=batch)
        candidates = _candidates(model, kept, grads, cost, groups, floors)
        if not candidates:
            break
        score = np.array([c[0] for c in candidates])
        saving = np.array([c[1] for c in candidates])
        rank = score / _median(score) - eta * saving / _median(saving)
        removed: dict = {}
        trial = kept
        for j in np.argsort(rank, kind="stable"):
            _, _, key, positions = candidates[j]
            removed.setdefault(key, set()).update(positions)
            trial = kept
            for k, gone in removed.items():
                trial = trial.without(k, gone)
            if budget.measure(model, trial.structure()) <= target * (1 + 1e-9):
                break
        kept = trial
        bar.advance()
    plan = compose_plan(model, model_id=model_id, method="nvit", structure=kept.structure())
    if not budget.fits(model, plan, dense):
        raise PlanError(
            f"budget {budget.metric}={budget.fraction} is below what nvit reaches at its floors "
            f"(keeping {budget.kept(model, plan, dense):.3f}: heads {floors['heads']}, "
            f"q/k {floors['qk']}, v {floors['v']}, MLP {floors['mlp']}, "
            f"embedding {floors['embed']})"
        )
    return dataclasses.replace(
        plan, budget={**budget.to_json(), "eta": eta, "steps": steps, **plan.budget}
    )


def _median(values: np.ndarray) -> float:
    positive = values[values > 0]
    return float(np.median(positive)) if positive.size else 1.0


def _candidates(model, kept: _Kept, grads: dict, cost: CostModel, groups, floors) -> list:
    """Removable groups: ``(saliency, cost saving, key, positions in the kept list)``."""
    base = cost.model_cost(model, kept.structure())
    out = []
    for key, units in kept.dims.items():
        c = grads[key]  # (images, units)
        removable = len(units) - _floor(key, kept.sizes[key], floors)
        if removable <= 0:
            continue
        size = _group_size(key, len(units), groups)
        order = np.argsort((c**2).mean(axis=0), kind="stable")[:removable]
        # The saving of one group in this dimension, per unit (linear in the units removed).
        first = order[:size]
        per_unit = (base - cost.model_cost(model, kept.without(key, first).structure())) / size
        for start in range(0, removable, size):
            chunk = order[start : start + size]
            saliency = float((c[:, chunk].sum(axis=1) ** 2).mean())
            out.append((saliency, per_unit * len(chunk), key, [int(p) for p in chunk]))
    return out
