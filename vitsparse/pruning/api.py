"""``prune``: from a model source and a budget spec to a PruningPlan."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from vitsparse.errors import ModelError, PlanError
from vitsparse.plan import PruningPlan
from vitsparse.pruning.block_mask import block_mask_plan

_BLOCK_SPEC = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*:\s*([0-9.eE+-]+)\s*")


def parse_block_spec(spec: str) -> tuple[tuple[int, int], float]:
    """Parse ``"ROWSxCOLS:KEEP"`` (e.g. ``"32x32:0.5"``) into ``((rows, cols), keep)``.

    Only the syntax is checked here; block sizes and ``keep`` are checked by the pruner.
    """
    match = _BLOCK_SPEC.fullmatch(spec) if isinstance(spec, str) else None
    keep = None
    if match:
        try:
            keep = float(match.group(3))
        except ValueError:
            keep = None
    if keep is None:
        raise PlanError(
            f"block spec {spec!r} is not ROWSxCOLS:KEEP (block rows x cols, then the fraction "
            "of blocks to keep), e.g. 32x32:0.5"
        )
    return (int(match.group(1)), int(match.group(2))), keep


def prune(
    source: str | torch.nn.Module,
    *,
    method: str,
    blocks: str,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
) -> PruningPlan:
    """Make a block-mask pruning plan for a model.

    Parameters
    ----------
    source
        A timm model name or an ``nn.Module`` (see ``vitsparse.frontend.load_torch_model``).
        Pruning reads the PyTorch weights, so ONNX files are not accepted.
    method
        ``"magnitude"`` or ``"random"`` (see ``block_mask_plan``).
    blocks
        ``"ROWSxCOLS:KEEP"``: block size and the fraction of blocks each layer keeps.
    layers
        ``fnmatch`` patterns on linear layer names; default every linear layer of the
        transformer blocks.
    seed
        Seed of the random method.
    checkpoint, pretrained
        Weights to load, as in ``load_torch_model``. Without either, a timm name gets timm's
        random initialisation, different on every call, and the plan's weights hash matches
        only that one model.

    Raises
    ------
    PlanError
        A malformed spec or a budget the model cannot take (see ``block_mask_plan``).
    ModelError
        The model cannot be loaded.
    """
    from vitsparse.frontend import load_torch_model

    if isinstance(source, (str, Path)) and str(source).lower().endswith(".onnx"):
        raise ModelError(
            f"pruning reads the PyTorch weights; {str(source)!r} is an ONNX file. Give the timm "
            "model name, with --checkpoint FILE for your weights"
        )
    block, keep = parse_block_spec(blocks)
    model, model_id = load_torch_model(source, checkpoint=checkpoint, pretrained=pretrained)
    return block_mask_plan(
        model, model_id=model_id, block=block, keep=keep, method=method, layers=layers, seed=seed
    )
