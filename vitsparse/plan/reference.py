"""A plan's meaning in PyTorch: the weights it was computed for (`weights_hash`), whether it fits
a model (`validate_plan`), and the pruned model itself (`apply_plan_to_torch`), the reference
every compiled model is checked against."""

from __future__ import annotations

import copy
import difflib
import hashlib

import numpy as np
import torch

from vitsparse._weights import weights_seed_of
from vitsparse.errors import PlanError
from vitsparse.plan.format import PruningPlan
from vitsparse.plan.pruned_vit import apply_structure, geometry_of
from vitsparse.plan.structure import check_against


def weights_hash(model: torch.nn.Module) -> str:
    """``"sha256:<hex>"`` of the model's linear weights, identifying the weights a plan is for.

    Hashed: every ``torch.nn.Linear`` module of ``model`` (``named_modules``, the classifier head
    included) in ascending order of module name; for each, the UTF-8 name, a NUL byte, the shape
    as ASCII ``"<out>x<in>"``, a NUL byte, then the weight as contiguous little-endian float32
    bytes. Biases and all other parameters are not hashed.
    """
    return hash_named_weights(
        (name, m.weight.detach().to("cpu", torch.float32).contiguous().numpy())
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    )


def hash_named_weights(named) -> str:
    """``"sha256:<hex>"`` of ``(module name, (out, in) weight array)`` pairs, hashed in
    ascending name order as `weights_hash` describes (an ONNX model's blocks are hashed this
    way under their canonical names, ``blocks.<i>.attn.qkv`` ...)."""
    digest = hashlib.sha256()
    for name, weight in sorted(named, key=lambda item: item[0]):
        weight = np.ascontiguousarray(weight, dtype="<f4")
        digest.update(name.encode("utf-8") + b"\0")
        digest.update("x".join(map(str, weight.shape)).encode("ascii") + b"\0")
        digest.update(weight.tobytes())
    return f"sha256:{digest.hexdigest()}"


def validate_plan(plan: PruningPlan, model: torch.nn.Module, *, check_hash: bool = True) -> None:
    """Check ``plan`` against ``model``; raises PlanError naming the layer and the problem.

    The structure must fit the model's geometry (block count, heads, head and MLP widths,
    embedding width, tokens left at each pruning point). Every block-masked layer must be an
    ``nn.Linear`` of the model whose weight, as the structure leaves it, has the mask's shape.
    With ``check_hash`` the model's ``weights_hash`` must equal the plan's.
    """
    _validate(plan, model, check_hash=check_hash)


def _validate(plan: PruningPlan, model, *, check_hash: bool):
    """validate_plan; returns the structurally pruned model (or ``model`` without a structure)."""
    shaped = model
    if plan.structure is not None:
        check_against(plan.structure, geometry_of(model), plan.model_id)
        if not plan.structure.empty:
            shaped = apply_structure(model, plan.structure)
    modules = dict(shaped.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    for name, mask in plan.layers.items():
        module = modules.get(name)
        if module is None:
            close = difflib.get_close_matches(name, linear_names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PlanError(
                f"layer {name!r} is not a module of model {plan.model_id!r}{hint} "
                f"(its {len(linear_names)} linear layers include {_preview(linear_names)})"
            )
        if not isinstance(module, torch.nn.Linear):
            raise PlanError(
                f"layer {name!r} is a {type(module).__name__}, not a torch.nn.Linear; only linear "
                f"layers take a block mask (e.g. {_preview(linear_names, 3)})"
            )
        shape = tuple(module.weight.shape)
        if shape != mask.weight_shape:
            pruned = " after the plan's structural pruning" if shaped is not model else ""
            raise PlanError(
                f"layer {name!r}: the plan's mask is for a weight of shape {mask.weight_shape}, "
                f"but the model's weight has shape {shape} (out, in){pruned}"
            )
    if check_hash:
        actual = weights_hash(model)
        if actual != plan.weights_hash:
            theirs, ours = plan.weights_seed, weights_seed_of(model)
            origin = ""
            if theirs is not None and theirs != ours:
                origin = (
                    f" (the plan's are timm's random weights of seed {theirs}: load the model "
                    f"with --weights-seed {theirs})"
                )
            raise PlanError(
                f"the plan was computed for other weights of {plan.model_id!r}: plan "
                f"{plan.weights_hash[:19]}..., model {actual[:19]}...{origin}; recompute the "
                "plan for these weights, or skip the check (check_hash=False) to apply it anyway"
            )
    return shaped


def apply_plan_to_torch(
    model: torch.nn.Module, plan: PruningPlan, *, check_hash: bool = True
) -> torch.nn.Module:
    """The PyTorch reference of a pruned model: a new module with the plan's structure applied
    (weights physically sliced, tokens dropped; `vitsparse.plan.pruned_vit`) and each
    masked layer's weight zero outside its kept blocks (biases and unmasked layers unchanged).

    ``model`` itself is not modified. The plan is checked first with ``validate_plan``.
    """
    shaped = _validate(plan, model, check_hash=check_hash)
    pruned = copy.deepcopy(model) if shaped is model else shaped
    with torch.no_grad():
        for name, mask in plan.layers.items():
            weight = pruned.get_submodule(name).weight
            keep = torch.from_numpy(mask.element_mask()).to(weight.device)
            weight.masked_fill_(~keep, 0)
    return pruned


def _preview(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown}, ..." if len(items) > limit else shown
