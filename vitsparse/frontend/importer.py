"""Importing a ViT into Relax: a timm name, a torch module or an ONNX file -> ImportedModel."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitsparse._tvm import IRModule, from_exported_program, from_onnx, relax, struct_dtype, tvm
from vitsparse.errors import ModelError, UnsupportedOpError
from vitsparse.frontend.canonicalize import canonicalize
from vitsparse.frontend.extract import extract_vit_graph
from vitsparse.frontend.loading import RANDOM_WEIGHTS_SEED, load_torch_model
from vitsparse.frontend.onnx_prep import canonicalize_onnx, image_input, load_onnx
from vitsparse.frontend.vit_graph import BLOCK_LAYERS, ViTGraph

_DEFAULT_INPUT = (3, 224, 224)


@dataclass(frozen=True)
class ImportedModel:
    """A ViT in Relax with its weights split out.

    Attributes
    ----------
    mod
        Relax module whose ``main(x, *params)`` takes the image batch and then every weight.
        Linear layers are ``matmul(x, permute_dims(W))`` with ``W`` of shape ``(out, in)``.
    params
        Relax parameter name -> weights, in ``main``'s parameter order (after ``x``).
    graph
        The ViT geometry read from ``mod``.
    model_id
        timm name, module class name, or the ONNX file's stem.
    input_shape
        ``(batch, channels, H, W)`` of ``x``.
    torch_model
        The eval-mode torch module (``None`` for ONNX input).
    onnx_path
        The ONNX file imported (``None`` for torch input).
    """

    mod: IRModule
    params: dict[str, np.ndarray]
    graph: ViTGraph
    model_id: str
    input_shape: tuple[int, ...]
    torch_model: torch.nn.Module | None
    onnx_path: Path | None

    def param_list(self) -> list[np.ndarray]:
        """The weights as a list, ready to pass after ``x`` to ``main``."""
        return list(self.params.values())


def import_model(
    source: str | Path | torch.nn.Module,
    *,
    batch: int = 1,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    seed: int = RANDOM_WEIGHTS_SEED,
) -> ImportedModel:
    """Import a ViT into Relax and read its geometry.

    Parameters
    ----------
    source
        A timm model name, a ``torch.nn.Module``, or a path to an ``.onnx`` file.
    batch
        Static batch size of the imported module.
    checkpoint, pretrained
        Weights for a torch model, see :func:`load_torch_model`.

    Raises
    ------
    ModelError
        The model or its weights cannot be loaded (see :func:`load_torch_model`), a missing or
        unreadable ONNX file, or an importer failure.
    UnsupportedOpError
        TVM's importer lacks an operator the model uses.
    NotAViTError
        The model imported but is not a ViT vitsparse can map.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ModelError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(source, Path) or (isinstance(source, str) and source.lower().endswith(".onnx")):
        path = Path(source)
        if path.suffix.lower() != ".onnx":
            raise ModelError(f"model file {str(path)!r}: only .onnx files can be imported")
        if checkpoint is not None or pretrained:
            raise ModelError(
                f"ONNX model {str(path)!r} carries its own weights; checkpoint and pretrained "
                "apply to timm / PyTorch models only"
            )
        return _import_onnx(path, batch=batch)
    model, model_id = load_torch_model(
        source, checkpoint=checkpoint, pretrained=pretrained, seed=seed
    )
    return _import_torch(model, model_id, batch=batch)


def export_torch(
    model: torch.nn.Module, example: torch.Tensor, *, model_id: str
) -> tuple[IRModule, dict[str, np.ndarray], torch.export.ExportedProgram]:
    """``model`` at the input ``example`` through torch.export into Relax: the module (weights
    as parameters of ``main`` after the input, cleaned up by `frontend.canonicalize`), its
    weights by Relax parameter name, and the ExportedProgram. Any torch module, a ViT or not."""
    try:
        with torch.no_grad():
            exported = torch.export.export(model, (example,))
    except Exception as err:
        raise ModelError(
            f"torch.export could not trace model {model_id!r} with an input of shape "
            f"{tuple(example.shape)}: {_first_line(err)}"
        ) from err
    try:
        mod = from_exported_program(
            exported, keep_params_as_input=True, unwrap_unit_return_tuple=True
        )
    except Exception as err:
        raise _importer_error(err, model_id, "PyTorch") from err
    mod, params = _detach(mod)
    return canonicalize(mod), params, exported


def _import_torch(model: torch.nn.Module, model_id: str, *, batch: int) -> ImportedModel:
    input_shape = (batch, *_torch_input_chw(model))
    mod, params, exported = export_torch(model, torch.zeros(input_shape), model_id=model_id)
    signature = exported.graph_signature
    param_map = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    graph = extract_vit_graph(mod, model_id=model_id, param_map=param_map, torch_model=model)
    return ImportedModel(mod, params, graph, model_id, input_shape, model, None)


def _import_onnx(path: Path, *, batch: int) -> ImportedModel:
    model_id = path.stem
    onnx_model = load_onnx(path)
    spec = image_input(onnx_model, model_id)
    if isinstance(spec.batch, int) and spec.batch != batch:
        raise ModelError(
            f"ONNX model {model_id!r} was exported with a fixed batch of {spec.batch}, not "
            f"{batch}; import it with batch={spec.batch} or export it with a dynamic batch axis"
        )
    input_shape = (batch, spec.channels, spec.height, spec.width)
    try:
        mod = from_onnx(
            canonicalize_onnx(onnx_model),
            shape_dict={spec.name: list(input_shape)},
            keep_params_in_input=True,
        )
    except Exception as err:
        raise _importer_error(err, model_id, "ONNX") from err
    mod, params = _detach(mod)
    mod, params = _bind_non_float_params(mod, params)
    mod = canonicalize(mod)
    graph = extract_vit_graph(mod, model_id=model_id)
    # The blocks' linear weights take timm's names, so that block-mask plans name them alike.
    named = {
        weight: f"blocks.{b.index}.{layer}.weight"
        for b in graph.blocks
        for layer, weight in zip(BLOCK_LAYERS, b.weight_names(), strict=True)
    }
    graph = dataclasses.replace(graph, param_map={**graph.param_map, **named})
    return ImportedModel(mod, params, graph, model_id, input_shape, None, path)


def _torch_input_chw(model: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: timm's patch_embed, else its config, else 3x224x224."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    channels = int(getattr(proj, "in_channels", _DEFAULT_INPUT[0]))
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        return channels, int(h), int(w)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if len(cfg.get("input_size", ())) == 3:
        c, h, w = cfg["input_size"]
        return int(c), int(h), int(w)
    return _DEFAULT_INPUT


def _detach(mod: IRModule) -> tuple[IRModule, dict[str, np.ndarray]]:
    """Split the weights out of ``main``; returns them by Relax parameter name, in order."""
    mod, detached = relax.frontend.detach_params(mod)
    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else 1
    names = [p.name for p in func.params[num_input:]]
    arrays = detached.get("main", [])
    if len(names) != len(arrays) or len(set(names)) != len(names):
        raise ModelError(
            f"unexpected importer output: {len(names)} weight parameters ({len(set(names))} "
            f"distinct names) but {len(arrays)} weight arrays"
        )
    return mod, {name: array.numpy() for name, array in zip(names, arrays, strict=True)}


def _bind_non_float_params(
    mod: IRModule, params: dict[str, np.ndarray]
) -> tuple[IRModule, dict[str, np.ndarray]]:
    """Fold integer/boolean initializers (shapes, indices) into the module as constants.

    The ONNX importer makes every initializer a parameter, including the int64 shape and index
    tensors the exporter leaves behind; only float weights should stay parameters.
    """
    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else 1
    weights = func.params[num_input:]
    fixed = {p.name: params[p.name] for p in weights if "float" not in struct_dtype(p)}
    if not fixed:
        return mod, params
    bound = {name: tvm.runtime.tensor(value) for name, value in fixed.items()}
    mod = relax.transform.BindParams("main", bound)(mod)
    return mod, {k: v for k, v in params.items() if k not in fixed}


_TORCH_UNSUPPORTED = re.compile(r"Unsupported function types \[(.*)\]")
_ONNX_UNSUPPORTED = re.compile(r"not supported for frontend ONNX: (.*)")


def _importer_error(err: Exception, model_id: str, frontend: str) -> ModelError:
    text = str(err)
    match = _TORCH_UNSUPPORTED.search(text) or _ONNX_UNSUPPORTED.search(text)
    if match:
        ops = [op.strip(" '\"") for op in match.group(1).split(",") if op.strip(" '\"")]
        plural = "s" if len(ops) > 1 else ""
        return UnsupportedOpError(
            f"model {model_id!r} uses operator{plural} {', '.join(ops)} that TVM's {frontend} "
            "importer does not support"
        )
    return ModelError(
        f"TVM's {frontend} importer failed on model {model_id!r}: "
        f"{type(err).__name__}: {_first_line(err)}"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
