"""Where a model's weights came from, as the frontend records it on the module: the seed of
timm's random initialisation (plans carry it, so a mismatch can say which seed to load)."""

from __future__ import annotations

WEIGHTS_SEED_ATTR = "vitsparse_weights_seed"


def weights_seed_of(model) -> int | None:
    """The seed of the random initialisation ``model``'s weights came from, where the frontend
    made them (None otherwise: a checkpoint, pretrained weights, a module of the user's)."""
    seed = getattr(model, WEIGHTS_SEED_ATTR, None)
    return seed if type(seed) is int else None
