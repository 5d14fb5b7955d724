"""The eval job: top-1 accuracy of a model on a data source, and, with a plan, of the pruned
model and its fidelity to the dense one (all in PyTorch, the reference the compiled models
match)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vitsparse.data.digits import DIGITS_MODEL
from vitsparse.data.sources import ImageSet, load_images
from vitsparse.frontend import RANDOM_WEIGHTS_SEED, load_torch_model
from vitsparse.plan import PruningPlan, load_plan
from vitsparse.pruning.evaluate import EvalReport, evaluate


def evaluate_model(
    source: str | torch.nn.Module,
    data: str | Path,
    *,
    plan: PruningPlan | str | Path | None = None,
    limit: int | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    weights_seed: int = RANDOM_WEIGHTS_SEED,
) -> tuple[str, EvalReport]:
    """(model id, report) of ``source`` on the images of ``data`` (an ImageFolder directory,
    ``"digits"``, ``"digits-train"`` or ``"synthetic"``; at most ``limit``), pruned by ``plan``
    too when given. A bad plan file fails before the model loads."""
    plan = load_plan(plan)
    model, model_id = load_torch_model(
        source, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    images = load_images(data, image_size=model.patch_embed.img_size[0], limit=limit)
    mismatch = class_mismatch(model, model_id, images)
    if mismatch:
        warnings.warn(mismatch, stacklevel=2)
    return model_id, evaluate(model, images, plan)


def model_classes(model: torch.nn.Module, model_id: str) -> tuple[str, ...] | None:
    """The names of ``model``'s output classes, where known: the digits ViT's digits, the
    ImageNet synsets (``n01440764``, ...) of a timm ImageNet-1k/22k classifier."""
    if model_id == DIGITS_MODEL:
        return tuple(str(d) for d in range(10))
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    return None if subset is None else tuple(ImageNetInfo(subset).label_names())


def class_mismatch(model: torch.nn.Module, model_id: str, images: ImageSet) -> str | None:
    """Why top-1 on ``images`` means nothing for ``model`` (their class names differ: label i
    of the data is not the model's class i), or None where they match or cannot be told."""
    if images.labels is None or images.classes is None:
        return None
    known = model_classes(model, model_id)
    if known is None or images.classes == known[: len(images.classes)]:
        return None
    wrong = [i for i, c in enumerate(images.classes) if i >= len(known) or known[i] != c]
    first = wrong[0]
    theirs = f"class {known[first]!r}" if first < len(known) else f"only {len(known)} classes"
    return (
        f"the class names of {images.name!r} are not {model_id!r}'s classes: data label i is "
        f"compared with the model's class i, so top-1 is meaningless ({len(wrong)} of "
        f"{len(images.classes)} differ; label {first} is {images.classes[first]!r}, the model "
        f"has {theirs}). Name the folders after the model's classes; fidelity to the dense "
        "model does not depend on them"
    )
