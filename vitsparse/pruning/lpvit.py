"""LPViT: block-structured pruning by first/second-order Taylor scores, with sparsity allocated
across layers at equal slope of distortion minus cost saving (../shared/PAPERS.md, section 1).

1. Gradients of the label-free loss ``mean(f(x)^2)`` over the calibration images.
2. A block's score is ``mean |W * g|`` over its elements; a layer with k blocks pruned drops its
   k lowest-scoring blocks.
3. Each layer's distortion curve ``delta(k) = mean((dW*g)^2) + 1/2 (g.dW)^2 + 1/2 lambda |dW|^2``
   (empirical-Fisher second order, lambda 1e-7) for k = 0..n (every block count, not a 1% grid:
   a layer of few blocks would otherwise show flat steps).
4. Each layer's saving curve from a cost model (`budget.FlopsCost` by default), weighted by
   ``beta = beta_scale * mean_l max ddelta/ds / mean_l max dsaving/ds`` (``beta_scale`` 1: the
   paper's auto-scaling).
5. For a slope ``mu``, each layer takes the largest s up to which the slope of
   ``delta - beta * saving`` (made non-decreasing by running maxima) stays at or below ``mu``;
   ``mu`` is bisected until the budget holds. **Sign, decided on purpose:** the saving
   is *subtracted*, so a layer that saves more per unit of sparsity reaches the slope later and is
   pruned more (the published code adds it, which protects the costly layers).
6. Each layer's sparsity is capped at ``1 - min(0.05, (1 - target) / 2)``.

Calibration images only need to be representative inputs (no labels). The budget is FLOPs or
weights (`budget.Budget`). docs/results/criteria.md has its accuracy against the baselines and the
other criteria, and where it loses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vitsparse.errors import DataError, PlanError
from vitsparse.plan import (
    BlockMask,
    PruningPlan,
    check_block_geometry,
    geometry_of,
    weights_hash,
    weights_seed_of,
)
from vitsparse.pruning.block_mask import DEFAULT_LAYERS, select_linear_layers
from vitsparse.pruning.budget import Budget, CostModel, FlopsCost

LAMBDA = 1e-7


@dataclass
class LayerCurves:
    """One layer's curves over k = 0..n pruned blocks (lowest score first)."""

    name: str
    shape: tuple[int, int]
    grid: tuple[int, int]
    order: np.ndarray  # block indices, lowest score first
    delta: np.ndarray  # (n + 1,) distortion with k blocks pruned
    metric: np.ndarray  # (n + 1,) the budget's metric saved (multiply-adds or weights)
    saving: np.ndarray  # (n + 1,) the cost model's saving

    @property
    def n(self) -> int:
        return int(self.order.size)


def calibration_gradients(model, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean gradient of ``mean(f(x)^2)`` w.r.t. every linear weight, over ``images``."""
    if len(images) == 0:
        raise DataError("the calibration set is empty")
    model = model.eval()
    model.zero_grad(set_to_none=True)
    batches = 0
    for start in range(0, len(images), batch_size):
        out = model(images[start : start + batch_size])
        out.pow(2).mean().backward()
        batches += 1
    grads = {
        name: module.weight.grad.detach() / batches
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.weight.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return grads


def _curves(name, weight, grad, block, tokens, cost: CostModel, metric: str) -> LayerCurves:
    rows, cols = block
    out_f, in_f = weight.shape
    grid = (out_f // rows, in_f // cols)

    def blocks(a):
        tiles = a.reshape(grid[0], rows, grid[1], cols).transpose(0, 2, 1, 3)
        return tiles.reshape(-1, rows * cols)

    wg = blocks(weight * grad)
    order = np.argsort(np.abs(wg).mean(axis=1), kind="stable")  # Taylor score, lowest first
    # dW = -W on the pruned blocks: mean((dW g)^2), (g . dW)^2 and |dW|^2 as cumulative sums.
    sq = np.concatenate([[0.0], np.cumsum((wg**2).sum(axis=1)[order])])
    dot = np.concatenate([[0.0], np.cumsum(wg.sum(axis=1)[order])])
    norm = np.concatenate([[0.0], np.cumsum((blocks(weight) ** 2).sum(axis=1)[order])])
    delta = sq / weight.size + 0.5 * dot**2 + 0.5 * LAMBDA * norm
    n = order.size
    fractions = np.arange(n + 1) / n
    per_token = 1 if metric == "params" else tokens  # weights saved do not scale with tokens
    return LayerCurves(
        name,
        (out_f, in_f),
        grid,
        order,
        delta,
        np.array([FlopsCost().saving(name, (out_f, in_f), per_token, f) for f in fractions]),
        np.array([cost.saving(name, (out_f, in_f), tokens, f) for f in fractions]),
    )


def allocate(
    curves: list[LayerCurves],
    budget: Budget,
    dense: float,
    block: tuple[int, int],
    beta_scale: float = 1.0,
) -> tuple[dict[str, BlockMask], float]:
    """({layer: mask}, beta): each layer's pruned block count at the common slope ``mu`` of
    distortion minus beta times saving at which the budget holds (steps 4-6 of the module
    docstring); ``dense`` is the model's metric unpruned."""
    # Slopes per pruned block, in units of sparsity (one block is 1/n of the layer).
    d_delta = [np.diff(c.delta) * c.n for c in curves]
    d_save = [np.diff(c.saving) * c.n for c in curves]
    beta = (
        beta_scale
        * float(np.mean([d.max() for d in d_delta]))
        / max(float(np.mean([d.max() for d in d_save])), 1e-30)
    )
    cap = 1 - min(0.05, (1 - budget.fraction) / 2)
    tops = [min(int(np.floor(cap * c.n + 1e-9)), c.n - 1) for c in curves]
    # Saving is subtracted: more saving per unit of sparsity -> lower slope -> pruned further.
    # Running maxima make each slope curve non-decreasing, so a layer's pick grows with mu.
    hulls = [
        np.maximum.accumulate((dd - beta * ds)[:top])
        for dd, ds, top in zip(d_delta, d_save, tops, strict=True)
    ]
    target = (1 - budget.fraction) * dense

    def saved(picks):
        return sum(c.metric[k] for c, k in zip(curves, picks, strict=True))

    def choose(mu):
        return [int(np.searchsorted(h, mu, side="right")) for h in hulls]

    if saved(tops) < target * (1 - 1e-9):
        most = saved(tops) / dense
        raise PlanError(
            f"budget {budget.metric}={budget.fraction} cannot be met by block pruning of these "
            f"layers: with the per-layer cap of {cap:.2f} sparsity they remove at most "
            f"{most:.3f} of the model's {budget.metric} (keeping {1 - most:.3f})"
        )
    lo = min(float(h.min()) for h in hulls if h.size) - 1.0
    hi = max(float(h.max()) for h in hulls if h.size) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if saved(choose(mid)) >= target:
            hi = mid
        else:
            lo = mid
    picks = choose(hi)
    masks = {}
    for curve, k in zip(curves, picks, strict=True):
        kept = np.ones(curve.n, dtype=bool)
        kept[curve.order[:k]] = False
        masks[curve.name] = BlockMask(
            rows=block[0],
            cols=block[1],
            out_features=curve.shape[0],
            in_features=curve.shape[1],
            kept=kept.reshape(curve.grid),
        )
    return masks, beta


def lpvit_plan(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    budget: Budget,
    *,
    model_id: str,
    block: tuple[int, int] = (16, 16),
    cost: CostModel | None = None,
    layers=None,
    beta_scale: float = 1.0,
    progress=None,
) -> PruningPlan:
    """The LPViT block-mask plan of ``model`` meeting ``budget`` (see the module docstring);
    ``progress`` is unused (one backward pass over the calibration images is quick)."""
    del progress
    geo = geometry_of(model)
    cost = cost or FlopsCost()
    if hasattr(cost, "for_block"):  # a measured cost table: the kernels of this block size
        cost = cost.for_block(block)
    tokens = geo.num_patches + geo.num_prefix_tokens
    selected = select_linear_layers(model, list(DEFAULT_LAYERS if layers is None else layers))
    grads = calibration_gradients(model, calibration)
    curves = []
    for name, module in selected:
        weight = module.weight.detach().double().numpy()
        check_block_geometry(name, block, weight.shape)
        grad = grads[name].double().numpy()
        curves.append(_curves(name, weight, grad, block, tokens, cost, budget.metric))
    dense = budget.measure(model)
    masks, beta = allocate(curves, budget, dense, block, beta_scale)
    return PruningPlan(
        model_id=model_id,
        weights_hash=weights_hash(model),
        weights_seed=weights_seed_of(model),
        method="lpvit",
        budget={**budget.to_json(), "blocks": f"{block[0]}x{block[1]}", "beta": beta},
        layers=masks,
    )
