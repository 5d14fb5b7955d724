"""The prune job: from a model source and a budget spec to a PruningPlan, by explicit fractions
(magnitude or random block masks and structures, in one plan) or by a criterion under a budget
(`vitsparse.pruning.criteria`); and what the plan is predicted to keep (FLOPs, weights, and
its fidelity on calibration images where the weights are reproducible)."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vitsparse.data.sources import load_images
from vitsparse.errors import ModelError, PlanError
from vitsparse.frontend import RANDOM_WEIGHTS_SEED, import_model, load_torch_model
from vitsparse.jobs.finetune import check_output
from vitsparse.jobs.finetune import finetune as run_finetune
from vitsparse.jobs.finetune_report import FinetuneReport
from vitsparse.plan import PruningPlan, parse_block_size, structural_support
from vitsparse.pruning import flops as counts
from vitsparse.pruning import onnx_masks
from vitsparse.pruning.budget import Budget, MeasuredBudget
from vitsparse.pruning.compose import compose_plan
from vitsparse.pruning.criteria import criterion, make_plan
from vitsparse.pruning.evaluate import evaluate, fidelity
from vitsparse.pruning.fractions import parse_block_spec, structure_plan


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
    weights_seed: int = RANDOM_WEIGHTS_SEED,
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
        A timm model name or an ``nn.Module`` (see ``vitsparse.frontend.load_torch_model``),
        or an ``.onnx`` file: block masks only (``magnitude``/``random`` with ``blocks``, or
        ``lpvit`` with a budget; see `vitsparse.pruning.onnx_masks`).
    method
        Without a budget: ``"magnitude"`` or ``"random"`` (see ``block_mask_plan``).
    blocks
        ``"ROWSxCOLS:KEEP"``: block size and the fraction of blocks each layer keeps.
    heads, mlp, embed
        Fractions of each block's heads and MLP neurons, and of the embedding channels, kept.
    tokens, token_rule
        ``"KEEP@BLOCKS"`` (e.g. ``"0.7@4,7,10"``) and its scoring rule; see
        ``vitsparse.pruning.fractions``.
    layers
        ``fnmatch`` patterns on linear layer names; default every linear layer of the
        transformer blocks.
    seed
        Seed of the random method.
    checkpoint, pretrained
        Weights to load, as in ``load_torch_model``. Without either, a timm name gets timm's
        random initialisation drawn from ``weights_seed``, the same in every process.

    Raises
    ------
    PlanError
        A malformed spec or a budget the model cannot take (see ``block_mask_plan``).
    ModelError
        The model cannot be loaded.
    """
    fractions = {"heads": heads, "mlp": mlp, "embed": embed, "tokens": tokens}
    given = {name: value for name, value in fractions.items() if value is not None}
    if _is_onnx(source):
        if checkpoint is not None or pretrained:
            raise ModelError(
                f"{source}: an ONNX file holds its weights; drop --checkpoint/--pretrained"
            )
        if given:
            raise PlanError(
                f"{', '.join('--' + k for k in given)}: structural pruning needs the PyTorch "
                "model; an ONNX file takes block masks (--blocks, or --method lpvit with a budget)"
            )
        return _prune_onnx(source, method, blocks, budget, layers, seed, calib, calib_size)
    if budget is not None and given:
        raise PlanError(
            "a budget lets the criterion choose what to keep; do not also give heads, mlp, "
            "embed or tokens fractions"
        )
    if budget is not None or method not in ("magnitude", "random"):
        make = _criterion(method, budget, blocks, layers, knobs, calib, calib_size, progress)
        model, model_id = load_torch_model(
            source, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
        )
        if method in _STRUCTURAL or (knobs or {}).get("kind") == "structure":
            _check_structural(model, method)
        return make(model, model_id)
    if blocks is None and not given:
        raise PlanError("nothing to prune: give blocks, heads, mlp, embed and/or tokens")
    spec = None if blocks is None else parse_block_spec(blocks)
    model, model_id = load_torch_model(
        source, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    if given:
        _check_structural(model, ", ".join(f"--{k}" for k in given))
    structure = structure_plan(model, method=method, token_rule=token_rule, seed=seed, **given)
    return compose_plan(
        model,
        model_id=model_id,
        method=method,
        block_spec=spec,
        structure=structure,
        layers=layers,
        seed=seed,
    )


def _is_onnx(source) -> bool:
    return isinstance(source, (str, Path)) and str(source).lower().endswith(".onnx")


def _prune_onnx(source, method, blocks, budget, layers, seed, calib, calib_size) -> PruningPlan:
    """Block masks of an ONNX file (`vitsparse.pruning.onnx_masks`): explicit fractions by
    magnitude or at random, or LPViT-style under a budget."""
    if method not in onnx_masks.METHODS:
        raise PlanError(
            f"an ONNX file is pruned by {', '.join(onnx_masks.METHODS)} (block masks; no "
            f"gradients or PyTorch module), not {method}"
        )
    if method == "lpvit":
        if budget is None:
            raise PlanError("lpvit needs a budget, e.g. flops=0.5")
        parsed = Budget.parse(budget)
        block = (16, 16) if blocks is None else _block_size(blocks)
        imported = import_model(source)
        size = imported.input_shape[-1]
        images = load_images(calib or "synthetic", image_size=size, limit=calib_size).images
        return onnx_masks.onnx_lpvit_plan(
            imported, images.numpy(), parsed, block=block, layers=layers
        )
    if budget is not None:
        raise PlanError(f"{method} takes explicit --blocks ROWSxCOLS:KEEP, not a budget, for ONNX")
    if blocks is None:
        raise PlanError("nothing to prune: give --blocks ROWSxCOLS:KEEP")
    block, keep = parse_block_spec(blocks)
    return onnx_masks.onnx_block_mask_plan(
        import_model(source),
        block=block,
        keep=keep,
        method=method,
        layers=layers,
        seed=seed,
    )


def _block_size(blocks: str) -> tuple[int, int]:
    try:
        return parse_block_size(blocks)
    except ValueError:
        raise PlanError(
            f"with a budget, blocks is a block size ROWSxCOLS (e.g. 16x16), got {blocks!r}"
        ) from None


# Criteria whose plans prune structure (heads, neurons, channels, tokens).
_STRUCTURAL = ("nvit", "upvit", "cpvit", "combined")


def _check_structural(model, what: str) -> None:
    """PlanError, before any work, where ``model`` has a feature structural pruning lacks."""
    why = structural_support(model)
    if why:
        raise PlanError(f"{why}; {what} needs it (block masks alone work: --blocks, lpvit)")


def _criterion(method, budget, blocks, layers, knobs, calib, calib_size, progress):
    """The request for a criterion's plan under a budget (see `vitsparse.pruning.criteria`),
    checked before any model loads; then the function that makes the plan of the loaded model,
    ``make(model, model_id)``."""
    spec = criterion(method)
    if budget is None:
        raise PlanError(f"{method} needs a budget, e.g. flops=0.5")
    if isinstance(budget, str) and budget.strip().lower().startswith(("latency", "energy")):
        MeasuredBudget.parse(budget)  # a malformed one is named as such
        raise PlanError(
            f"budget {budget!r} is measured on a target; prune spends flops= or params= "
            "budgets. Use `vitsparse search MODEL --target T --budget ...` for measured budgets"
        )
    parsed = Budget.parse(budget)
    knobs = dict(knobs or {})
    if blocks is not None:
        if "block" not in spec.knobs:
            raise PlanError(f"{method} does not prune blocks; --blocks does not apply")
        knobs["block"] = _block_size(blocks)
    if layers is not None:
        if method != "lpvit":
            raise PlanError(
                f"layer patterns apply to lpvit and to explicit block masks, not {method}"
            )
        knobs["layers"] = list(layers)

    def make(model, model_id):
        images = None
        if spec.reads_calibration:
            size = model.patch_embed.img_size[0]
            images = load_images(calib or "synthetic", image_size=size, limit=calib_size).images
        return make_plan(
            method, model, images, parsed, model_id=model_id, knobs=knobs, progress=progress
        )

    return make


@dataclass(frozen=True)
class Prediction:
    """What a plan keeps of its model: MACs and weights, and (where measured) its fidelity to
    the dense model on calibration images."""

    flops_kept: float
    macs: int
    params_kept: float
    params: int
    fidelity_data: str | None = None
    fidelity_images: int = 0
    agreement: float | None = None
    mean_kl: float | None = None


@dataclass(frozen=True)
class PruneResult:
    """What `prune_and_predict` made: the plan, what it keeps, and, with a fine-tune, its
    report (the fine-tuned checkpoint and re-issued plan are in the report's ``out``)."""

    plan: PruningPlan
    prediction: Prediction
    finetuned: FinetuneReport | None = None


def prune_and_predict(
    source,
    *,
    finetune: dict | None = None,
    plan_out: str | Path | None = None,
    **options,
) -> PruneResult:
    """`prune` (``options`` are its keyword arguments), then `predict` of the plan with the same
    weights and calibration images; the plan is saved to ``plan_out`` when given. With
    ``finetune`` (`vitsparse.jobs.finetune.finetune`'s keyword arguments: ``data``, ``out``, the
    budget, ...), the plan is then fine-tuned on the very model it was made for (prune, then
    recover, in one call): its output is checked before pruning starts, and the plan is saved
    before the fine-tune, so an interrupted fine-tune can be resumed from it."""
    keys = ("calib", "calib_size", "checkpoint", "pretrained", "weights_seed")
    if finetune is None:
        plan = prune(source, **options)
        if plan_out is not None:
            plan.save(plan_out)
        return PruneResult(
            plan, predict(source, plan, **{k: options[k] for k in keys if k in options})
        )
    check_output(finetune["out"], finetune.get("resume", False))
    checkpoint, pretrained = options.pop("checkpoint", None), options.pop("pretrained", False)
    weights_seed = options.pop("weights_seed", RANDOM_WEIGHTS_SEED)
    model, model_id = load_torch_model(
        source, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    plan = dataclasses.replace(prune(model, **options), model_id=model_id)
    if plan_out is not None:
        plan.save(plan_out)
    report = run_finetune(
        model, plan=plan, model_id=model_id, progress=options.get("progress"), **finetune
    )
    calib = options.get("calib")
    return PruneResult(plan, _predict(model, plan, calib, options.get("calib_size", 256)), report)


def predict(
    source,
    plan: PruningPlan,
    *,
    calib: str | Path | None = None,
    calib_size: int = 256,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    weights_seed: int = RANDOM_WEIGHTS_SEED,
) -> Prediction:
    """The kept fraction of ``source``'s FLOPs and weights under ``plan``; with ``calib``, the
    fidelity on those images too (timm's random weights come from a seed, so every process
    loads the weights the plan was made for)."""
    if _is_onnx(source):
        return _predict_onnx(source, plan, calib, calib_size)
    model, _ = load_torch_model(
        source, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    return _predict(model, plan, calib, calib_size)


def _predict_onnx(source, plan: PruningPlan, calib, calib_size: int) -> Prediction:
    """`predict` of an ONNX file: the counts from its graph, the fidelity by ONNX Runtime on
    the file and on its masked copy."""
    imported = import_model(source)
    onnx_masks.validate_onnx_plan(plan, imported)
    flops_kept, macs = onnx_masks.kept(imported, plan, "flops")
    params_kept, weights = onnx_masks.kept(imported, plan, "params")
    out = Prediction(flops_kept, round(macs), params_kept, round(weights))
    if not calib:
        return out
    data = load_images(calib, image_size=imported.input_shape[-1], limit=calib_size)
    with tempfile.TemporaryDirectory(prefix="vitsparse-") as tmp:
        masked = onnx_masks.masked_onnx(source, plan, imported, Path(tmp) / "masked.onnx")
        dense_out = onnx_masks.run_onnx(source, data.images.numpy())
        pruned_out = onnx_masks.run_onnx(masked, data.images.numpy())
    agreement, mean_kl = fidelity(dense_out, pruned_out)
    return dataclasses.replace(
        out,
        fidelity_data=data.name,
        fidelity_images=len(data),
        agreement=agreement,
        mean_kl=mean_kl,
    )


def _predict(model, plan: PruningPlan, calib, calib_size: int) -> Prediction:
    pruned, dense = counts.flops(model, plan), counts.flops(model)
    weights = counts.params(model, plan)
    out = Prediction(pruned.ratio(dense), pruned.macs, weights / counts.params(model), weights)
    if not calib:
        return out
    data = load_images(calib, image_size=model.patch_embed.img_size[0], limit=calib_size)
    report = evaluate(model, data, plan)
    return Prediction(
        out.flops_kept,
        out.macs,
        out.params_kept,
        out.params,
        data.name,
        len(data),
        report.agreement,
        report.mean_kl,
    )
