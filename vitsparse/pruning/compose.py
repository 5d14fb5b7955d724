"""One plan from a structure and block masks: the block masks are chosen on the weights the
structure leaves. Every plan maker below the criteria ends here, so the criteria import it and
it imports none of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitsparse.plan import (
    PruningPlan,
    Structure,
    apply_structure,
    weights_hash,
    weights_seed_of,
)
from vitsparse.pruning.block_mask import block_mask_plan


def compose_plan(
    model: torch.nn.Module,
    *,
    model_id: str,
    method: str,
    structure: Structure | None,
    block_spec: tuple[tuple[int, int], float] | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> PruningPlan:
    """One plan from a structure and an optional block budget: the block masks are chosen on
    the weights the structure leaves (``block_spec`` is ``((rows, cols), keep)``)."""
    structure = None if structure is None or structure.empty else structure
    budget: dict = {"seed": seed}
    masks: dict = {}
    if structure is not None:
        budget["structure"] = _structure_budget(structure)
    if block_spec is not None:
        shaped = model if structure is None else apply_structure(model, structure)
        block, keep = block_spec
        masked = block_mask_plan(
            shaped,
            model_id=model_id,
            block=block,
            keep=keep,
            method=method,
            layers=layers,
            seed=seed,
        )
        budget.update(masked.budget)
        masks = dict(masked.layers)
    return PruningPlan(
        model_id=model_id,
        weights_hash=weights_hash(model),
        weights_seed=weights_seed_of(model),
        method=method,
        budget=budget,
        layers=masks,
        structure=structure,
    )


def _structure_budget(structure: Structure) -> dict:
    """What the structure keeps, in words a reader of the plan's budget can check."""
    out: dict = {}
    if structure.embed is not None:
        out["embed"] = len(structure.embed.kept)
    for name in ("heads", "qk_dims", "v_dims", "mlp"):
        counts = [
            len(getattr(b, name).kept)
            for b in structure.blocks.values()
            if getattr(b, name) is not None
        ]
        if counts:
            out[name] = counts
    tokens = {str(i): b.tokens.keep for i, b in structure.blocks.items() if b.tokens is not None}
    if tokens:
        out["tokens"] = tokens
    return out
