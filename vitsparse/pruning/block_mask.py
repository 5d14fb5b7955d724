"""Block masks by a per-block score: the magnitude (L1) baseline and a random control.

Each selected linear layer keeps, independently of the others, its ``round(keep * n_blocks)``
highest-scoring blocks (halves round up, at least one block). Ties go to the block that comes
first in row-major order, so the result is deterministic.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from vitsparse.errors import PlanError
from vitsparse.plan import (
    BlockMask,
    PruningPlan,
    check_block_geometry,
    weights_hash,
    weights_seed_of,
)

# The linear layers of timm's transformer blocks (attention qkv/proj, MLP fc1/fc2).
DEFAULT_LAYERS = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")

# A score takes the weight as blocks, shape (grid_rows, grid_cols, rows, cols) in float64, and
# the layer's random generator; it returns one score per block, shape (grid_rows, grid_cols).
BlockScore = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _l1_norm(blocks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.abs(blocks).sum(axis=(2, 3))


def _uniform(blocks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Top-k of i.i.d. uniform scores is a uniformly random k-subset.
    return rng.random(blocks.shape[:2])


BLOCK_SCORES: dict[str, BlockScore] = {"magnitude": _l1_norm, "random": _uniform}


def block_mask_plan(
    model: torch.nn.Module,
    *,
    model_id: str,
    block: tuple[int, int] = (32, 32),
    keep: float = 0.5,
    method: str = "magnitude",
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> PruningPlan:
    """A plan that keeps the fraction ``keep`` of the ``block``-sized blocks of each layer.

    Parameters
    ----------
    model
        The PyTorch model (not modified).
    model_id
        Recorded in the plan.
    block
        ``(rows, cols)``; each must be one of ``vitsparse.plan.BLOCK_SIZES`` and divide the
        selected layers' weights.
    keep
        Fraction of blocks kept in every layer, in (0, 1]. A layer keeps
        ``floor(keep * n_blocks + 0.5)`` blocks, at least one.
    method
        ``"magnitude"``: the blocks with the largest L1 norm; ``"random"``: a uniformly random
        choice, drawn for each layer from ``numpy.random.default_rng([seed, crc32(layer name)])``
        so that a layer's mask does not depend on which other layers are selected.
    layers
        ``fnmatch`` patterns (case-sensitive, ``*`` also crosses dots) on the names of the
        model's ``nn.Linear`` modules; default ``DEFAULT_LAYERS``, every linear layer inside the
        transformer blocks. Each pattern must match at least one linear layer.
    seed
        Seed of the random method (a non-negative integer; recorded for every method).

    Raises
    ------
    PlanError
        Unknown method, keep outside (0, 1], a pattern matching no linear layer, a block size
        that is not handled or does not divide a selected layer (naming the layer).
    """
    score = check_request(keep, method, seed)
    patterns = list(DEFAULT_LAYERS if layers is None else layers)
    if not patterns:
        raise PlanError("no layer patterns given; leave layers unset for the default")
    rows, cols = block
    masks = {
        name: layer_mask(
            name, module.weight.detach().to("cpu", torch.float64).numpy(), block, keep, score, seed
        )
        for name, module in select_linear_layers(model, patterns)
    }
    return PruningPlan(
        model_id=model_id,
        weights_hash=weights_hash(model),
        weights_seed=weights_seed_of(model),
        method=method,
        budget={"blocks": f"{rows}x{cols}", "keep": float(keep), "layers": patterns, "seed": seed},
        layers=masks,
    )


def check_request(keep, method: str, seed) -> BlockScore:
    """The score of ``method``, after checking ``keep`` and ``seed`` (PlanError naming them)."""
    score = BLOCK_SCORES.get(method)
    if score is None:
        raise PlanError(f"unknown pruning method {method!r}; known: {', '.join(BLOCK_SCORES)}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise PlanError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PlanError(f"seed must be a non-negative integer, got {seed!r}")
    return score


def layer_mask(
    name: str, weight: np.ndarray, block: tuple[int, int], keep: float, score: BlockScore, seed: int
) -> BlockMask:
    """The mask keeping ``keep`` of the blocks of one ``(out, in)`` weight, by ``score``."""
    rows, cols = block
    check_block_geometry(name, (rows, cols), weight.shape)
    out_features, in_features = weight.shape
    grid = (out_features // rows, in_features // cols)
    blocks = weight.reshape(grid[0], rows, grid[1], cols).transpose(0, 2, 1, 3)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    scores = score(blocks, rng).ravel()
    n_keep = max(1, math.floor(keep * scores.size + 0.5))
    # Stable sort of the negated scores: largest first, ties in row-major order.
    order = np.argsort(-scores, kind="stable")
    kept = np.zeros(scores.size, dtype=bool)
    kept[order[:n_keep]] = True
    return BlockMask(
        rows=rows,
        cols=cols,
        out_features=out_features,
        in_features=in_features,
        kept=kept.reshape(grid),
    )


def select_linear_layers(
    model: torch.nn.Module, patterns: Sequence[str]
) -> list[tuple[str, torch.nn.Linear]]:
    """The model's linear layers whose names match a pattern, in module order."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in linears):
            names = [n for n, _ in linears]
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise PlanError(
                f"layer pattern {pattern!r} matches no linear layer of the model "
                f"(its linear layers: {shown or 'none'})"
            )
    return [(n, m) for n, m in linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def block_mask_plan_for_budget(
    model: torch.nn.Module,
    budget,
    *,
    model_id: str,
    block: tuple[int, int] = (16, 16),
    method: str = "magnitude",
    seed: int = 0,
) -> PruningPlan:
    """The uniform block-mask plan (every layer the same kept fraction) with the largest kept
    fraction whose model stays within ``budget`` (a `vitsparse.pruning.budget.Budget` of FLOPs
    or weights): the magnitude baseline at a criterion's budget."""
    dense = budget.measure(model)
    for step in range(100, 0, -1):  # kept fraction 1.00, 0.99, .., 0.01: the first that fits
        plan = block_mask_plan(
            model, model_id=model_id, block=block, keep=step / 100, method=method, seed=seed
        )
        if budget.fits(model, plan, dense):
            return dataclasses.replace(plan, budget={**budget.to_json(), **plan.budget})
    raise PlanError(
        f"budget {budget.metric}={budget.fraction} is below what uniform block masks of the "
        "blocks' linear layers reach (1% of their blocks kept)"
    )
