"""``prune``: from a model source and a budget spec to a PruningPlan."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from vitsparse.errors import ModelError, PlanError
from vitsparse.plan import PruningPlan, weights_hash
from vitsparse.plan_structure import Structure
from vitsparse.pruning.block_mask import block_mask_plan
from vitsparse.pruning.structure import structure_plan
from vitsparse.pruning.structured_torch import apply_structure

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
    blocks: str | None = None,
    heads: float | None = None,
    mlp: float | None = None,
    embed: float | None = None,
    tokens: str | None = None,
    token_rule: str = "cls_attention",
    layers: Sequence[str] | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    budget: str | None = None,
    calib: str | Path | None = None,
    calib_size: int = 256,
    knobs: dict | None = None,
    progress=None,
) -> PruningPlan:
    """Make a pruning plan for a model: structures (heads, MLP neurons, embedding channels,
    tokens) and/or block masks, composed in one plan (the masks on the sliced weights); or, with
    ``method="lpvit"`` (block masks) or ``"upvit"`` (heads, MLP neurons, embedding channels),
    the criterion's plan that meets ``budget`` (``"flops=0.5"``), computed from ``calib_size``
    calibration images of ``calib`` (see ``vitsparse.data.sources``; default ``"synthetic"``).

    Parameters
    ----------
    source
        A timm model name or an ``nn.Module`` (see ``vitsparse.frontend.load_torch_model``).
        Pruning reads the PyTorch weights, so ONNX files are not accepted.
    method
        Without a budget: ``"magnitude"`` or ``"random"`` (see ``block_mask_plan``).
    blocks
        ``"ROWSxCOLS:KEEP"``: block size and the fraction of blocks each layer keeps.
    heads, mlp, embed
        Fractions of each block's heads and MLP neurons, and of the embedding channels, kept.
    tokens, token_rule
        ``"KEEP@BLOCKS"`` (e.g. ``"0.7@4,7,10"``) and its scoring rule; see
        ``vitsparse.pruning.structure``.
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
    if budget is not None and any(v is not None for v in (heads, mlp, embed, tokens)):
        raise PlanError(
            "a budget lets the criterion choose what to keep; do not also give heads, mlp, "
            "embed or tokens fractions"
        )
    if budget is not None or method not in ("magnitude", "random"):
        options = {"calib": calib, "calib_size": calib_size, "checkpoint": checkpoint}
        options.update(pretrained=pretrained, layers=layers, knobs=knobs, progress=progress)
        return _criterion(method, source, budget, blocks, **options)
    if blocks is None and all(v is None for v in (heads, mlp, embed, tokens)):
        raise PlanError("nothing to prune: give blocks, heads, mlp, embed and/or tokens")
    spec = None if blocks is None else parse_block_spec(blocks)
    model, model_id = load_torch_model(source, checkpoint=checkpoint, pretrained=pretrained)
    return compose_plan(
        model,
        model_id=model_id,
        method=method,
        block_spec=spec,
        structure=structure_plan(
            model,
            method=method,
            heads=heads,
            mlp=mlp,
            embed=embed,
            tokens=tokens,
            token_rule=token_rule,
            seed=seed,
        ),
        layers=layers,
        seed=seed,
    )


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


def _criterion(
    method,
    source,
    budget,
    blocks,
    *,
    calib,
    calib_size,
    checkpoint,
    pretrained,
    layers,
    knobs,
    progress,
):
    """A criterion's plan under a budget (see `vitsparse.pruning.criteria`)."""
    from vitsparse.data.sources import load_images
    from vitsparse.frontend import load_torch_model
    from vitsparse.pruning.budget import Budget
    from vitsparse.pruning.criteria import criterion, make_plan

    spec = criterion(method)
    if budget is None:
        raise PlanError(f"{method} needs a budget, e.g. flops=0.5")
    parsed = Budget.parse(budget)
    knobs = dict(knobs or {})
    if blocks is not None:
        if "block" not in spec.knobs:
            raise PlanError(f"{method} does not prune blocks; --blocks does not apply")
        knobs["block"] = _block_only(blocks)
    if layers is not None:
        if method != "lpvit":
            raise PlanError(
                f"layer patterns apply to lpvit and to explicit block masks, not {method}"
            )
        knobs["layers"] = list(layers)
    model, model_id = load_torch_model(source, checkpoint=checkpoint, pretrained=pretrained)
    images = None
    if spec.reads_calibration:
        size = model.patch_embed.img_size[0]
        images = load_images(calib or "synthetic", image_size=size, limit=calib_size).images
    return make_plan(
        method, model, images, parsed, model_id=model_id, knobs=knobs, progress=progress
    )


def _block_only(spec: str) -> tuple[int, int]:
    """``"16x16"`` (a budgeted criterion chooses the densities itself)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", spec)
    if not match:
        raise PlanError(
            f"with a budget, blocks is a block size ROWSxCOLS (e.g. 16x16), got {spec!r}"
        )
    return int(match.group(1)), int(match.group(2))
