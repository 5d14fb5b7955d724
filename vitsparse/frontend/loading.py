"""Getting a PyTorch model: a timm name or a module, plus optional weights from a checkpoint."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path

import timm
import torch

from vitsparse._weights import WEIGHTS_SEED_ATTR
from vitsparse.data.digits import DIGITS_MODEL, digits_vit
from vitsparse.errors import ModelError

# The seed of a timm model's random initialisation (no checkpoint, not pretrained): the same
# name gives the same weights in every process, so a plan made in one process (it carries its
# weights' hash) compiles in another.
RANDOM_WEIGHTS_SEED = 0

# Keys under which training scripts commonly nest the state dict of a checkpoint.
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")


def load_torch_model(
    source: str | torch.nn.Module,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    seed: int = RANDOM_WEIGHTS_SEED,
) -> tuple[torch.nn.Module, str]:
    """Return ``(module in eval mode, model_id)`` for a timm model name or an ``nn.Module``.

    Parameters
    ----------
    source
        A timm model name (``"deit_tiny_patch16_224"``, a ``.tag`` suffix is allowed), the
        built-in ``"vitsparse/digits_vit"`` (trained here on scikit-learn's digits, cached), or a
        module.
    checkpoint
        A local file saved with ``torch.save``: a state dict, or a dict holding one under
        ``"model"``, ``"state_dict"`` or ``"model_state_dict"``. Loaded with ``weights_only=True``
        and strict key matching.
    pretrained
        Fetch timm's pretrained weights (needs network access). The default leaves timm's random
        initialisation, which is enough for compiling and timing.
    seed
        The seed of that random initialisation (``--weights-seed``; default
        ``RANDOM_WEIGHTS_SEED``): every process gets the same weights for the same name and seed.
        The module records it as ``vitsparse_weights_seed`` (plans carry it).

    Raises
    ------
    ModelError
        Unknown timm name (with close matches), pretrained weights that cannot be fetched, a
        checkpoint file that is missing, unreadable or does not match the model.
    """
    if pretrained and checkpoint is not None:
        raise ModelError(
            "give either pretrained=True (--pretrained) or a checkpoint (--checkpoint), not both"
        )
    if isinstance(source, torch.nn.Module):
        if pretrained:
            raise ModelError(
                f"pretrained=True needs a timm model name; module {_module_id(source)!r} keeps "
                "its own weights (pass a checkpoint to load others)"
            )
        model, model_id = source, _module_id(source)
    elif isinstance(source, str) and source == DIGITS_MODEL:
        if pretrained:
            raise ModelError(f"{source!r} is trained here; it has no pretrained weights")
        model, model_id = digits_vit(), source
    elif isinstance(source, str):
        model, model_id = _create_timm_model(source, pretrained=pretrained, seed=seed), source
        if not pretrained and checkpoint is None:
            setattr(model, WEIGHTS_SEED_ATTR, seed)
    else:
        raise ModelError(
            "model source must be a timm model name or a torch.nn.Module, "
            f"got {type(source).__name__}"
        )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_id=model_id)
    return model.eval(), model_id


def load_checkpoint(model: torch.nn.Module, path: str | Path, *, model_id: str) -> None:
    """Load the weights in ``path`` into ``model`` (strict), raising ModelError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint file {str(path)!r} for model {model_id!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or pickled-object files
        raise ModelError(
            f"checkpoint file {str(path)!r} could not be read as a PyTorch weights file: "
            f"{_first_line(err)}"
        ) from err
    state_dict = _extract_state_dict(obj, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"checkpoint file {str(path)!r} does not match model {model_id!r}: "
            f"{len(missing)} missing key(s) {_preview(missing)}, "
            f"{len(unexpected)} unexpected key(s) {_preview(unexpected)}"
        )
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    if wrong_shape:
        raise ModelError(
            f"checkpoint file {str(path)!r} does not match model {model_id!r}: "
            f"{len(wrong_shape)} tensor(s) have the wrong shape (checkpoint vs model): "
            f"{_preview(wrong_shape)}"
        )
    model.load_state_dict(state_dict, strict=True)


def suggest_model_names(name: str, limit: int = 5) -> list[str]:
    """timm model names close to ``name``: whole-name matches, then names it misspells a prefix
    of (``deit_tinyy`` -> ``deit_tiny_patch16_224``)."""
    names = timm.list_models()
    whole = difflib.get_close_matches(name, names, n=limit, cutoff=0.75)

    def prefix_score(candidate: str) -> float:
        return difflib.SequenceMatcher(None, name, candidate[: len(name)]).ratio()

    by_prefix = sorted(
        (n for n in names if prefix_score(n) >= 0.8),
        key=lambda n: (-prefix_score(n), len(n), n),
    )
    suggestions: list[str] = []
    for candidate in [*whole, *by_prefix]:
        if candidate not in suggestions:
            suggestions.append(candidate)
    return suggestions[:limit]


def _create_timm_model(name: str, *, pretrained: bool, seed: int) -> torch.nn.Module:
    if not timm.is_model(name):
        close = suggest_model_names(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown timm model {name!r}{hint}")
    try:
        if pretrained:
            return timm.create_model(name, pretrained=True)
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed)
            return timm.create_model(name, pretrained=False)
    except Exception as err:
        if not pretrained:
            raise ModelError(f"timm could not build model {name!r}: {_first_line(err)}") from err
        raise ModelError(
            f"pretrained weights for {name!r} could not be fetched ({_first_line(err)}); "
            "download them on a machine with network access and pass the file with --checkpoint"
        ) from err


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelError(
            f"checkpoint file {str(path)!r} holds no state dict (expected name -> tensor, "
            f"at the top level or under one of {', '.join(_STATE_DICT_KEYS)})"
        )
    state_dict = dict(obj)
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def _module_id(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _preview(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... (+{len(items) - limit})" if len(items) > limit else ""
    return f"[{shown}{more}]"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
