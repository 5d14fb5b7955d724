"""The eval job: top-1 accuracy of a model on a data source, and, with a plan, of the pruned
model and its fidelity to the dense one (all in PyTorch, the reference the compiled models
match)."""

from __future__ import annotations

from pathlib import Path

import torch

from vitsparse.data.sources import load_images
from vitsparse.frontend import load_torch_model
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
) -> tuple[str, EvalReport]:
    """(model id, report) of ``source`` on the images of ``data`` (an ImageFolder directory,
    ``"digits"``, ``"digits-train"`` or ``"synthetic"``; at most ``limit``), pruned by ``plan``
    too when given. A bad plan file fails before the model loads."""
    plan = load_plan(plan)
    model, model_id = load_torch_model(source, checkpoint=checkpoint, pretrained=pretrained)
    images = load_images(data, image_size=model.patch_embed.img_size[0], limit=limit)
    return model_id, evaluate(model, images, plan)
