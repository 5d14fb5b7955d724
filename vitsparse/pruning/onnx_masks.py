"""Block-mask plans of an ONNX ViT, and its masked reference in ONNX Runtime.

An ONNX file has no PyTorch module to take gradients of, so its plans use scores that need none:

- ``magnitude`` and ``random`` (`vitsparse.pruning.block_mask`): every layer keeps the same
  fraction of its blocks, chosen as for a PyTorch model;
- ``lpvit``: LPViT's allocation across layers (`vitsparse.pruning.lpvit.allocate`: the equal
  slope of distortion minus saving, under a FLOPs or weights budget) with a second-order score
  read from activations instead of gradients. Pruning weights ``dW`` of a linear layer changes
  its output by ``x dW^T``; over calibration tokens whose input features are taken as
  uncorrelated, its mean squared error is ``sum_ij dW_ij^2 E[x_j^2]`` (the diagonal of the
  layer's Gauss-Newton Hessian). A block's distortion is that sum over its weights, relative to
  the layer's whole ``sum_ij W_ij^2 E[x_j^2]`` so that layers of different scales compare;
  ``E[x_j^2]`` is measured by ONNX Runtime running the file with each layer's input exposed.

Layers carry timm's names (``blocks.<i>.attn.qkv``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``)
from the imported graph (`vitsparse.frontend.ViTGraph`), so an ONNX plan reads like a PyTorch
one, and compiles through the same passes. Its weights hash is over those layers' weights
(`vitsparse.plan.hash_named_weights`). The reference a compiled ONNX plan is checked against is
ONNX Runtime on a copy of the file whose pruned blocks are zero (`masked_onnx`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vitsparse.errors import DataError, ModelError, PlanError
from vitsparse.frontend.vit_graph import BLOCK_LAYERS
from vitsparse.plan import PruningPlan, check_block_geometry, hash_named_weights
from vitsparse.pruning.block_mask import DEFAULT_LAYERS, check_request, layer_mask
from vitsparse.pruning.budget import Budget, FlopsCost
from vitsparse.pruning.lpvit import LayerCurves, allocate

METHODS = ("magnitude", "random", "lpvit")


def onnx_layers(imported) -> dict[str, str]:
    """{timm layer name: ONNX weight name} of an ONNX import's transformer blocks."""
    return {
        f"blocks.{b.index}.{layer}": weight
        for b in imported.graph.blocks
        for layer, weight in zip(BLOCK_LAYERS, b.weight_names(), strict=True)
    }


def onnx_weights_hash(imported) -> str:
    """The weights hash of an ONNX import: its blocks' linear weights, ``(out, in)``."""
    return hash_named_weights(
        (name, imported.params[weight]) for name, weight in onnx_layers(imported).items()
    )


def validate_onnx_plan(plan: PruningPlan, imported) -> None:
    """PlanError unless ``plan`` is block masks of ``imported``'s layers, for its weights."""
    if plan.structure is not None and not plan.structure.empty:
        raise PlanError(
            f"{imported.model_id}: structural pruning (heads, MLP, embedding, tokens) compiles "
            "PyTorch imports only; an ONNX model takes block masks"
        )
    layers = onnx_layers(imported)
    for name, mask in plan.layers.items():
        if name not in layers:
            raise PlanError(
                f"plan layer {name!r} is not a linear layer of {imported.model_id}'s blocks "
                f"(they are {', '.join(list(layers)[:4])}, ...)"
            )
        shape = imported.params[layers[name]].shape
        if tuple(shape) != (mask.out_features, mask.in_features):
            raise PlanError(
                f"plan layer {name!r} masks a {mask.out_features}x{mask.in_features} weight; "
                f"the ONNX model's is {shape[0]}x{shape[1]}"
            )
    if plan.weights_hash != onnx_weights_hash(imported):
        raise PlanError(
            f"the plan was computed for other weights than {imported.model_id}'s (weights hash "
            "differs): prune this ONNX file again"
        )


def onnx_block_mask_plan(
    imported,
    *,
    block: tuple[int, int] = (32, 32),
    keep: float = 0.5,
    method: str = "magnitude",
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> PruningPlan:
    """Every selected layer keeps ``keep`` of its blocks, by magnitude or at random (as
    `vitsparse.pruning.block_mask.block_mask_plan` for a PyTorch model)."""
    score = check_request(keep, method, seed)
    patterns = list(DEFAULT_LAYERS if layers is None else layers)
    masks = {
        name: layer_mask(name, imported.params[w].astype(np.float64), block, keep, score, seed)
        for name, w in _selected(imported, patterns)
    }
    return PruningPlan(
        model_id=imported.model_id,
        weights_hash=onnx_weights_hash(imported),
        method=method,
        budget={
            "blocks": f"{block[0]}x{block[1]}",
            "keep": float(keep),
            "layers": patterns,
            "seed": seed,
        },
        layers=masks,
    )


def onnx_lpvit_plan(
    imported,
    calibration: np.ndarray,
    budget: Budget,
    *,
    block: tuple[int, int] = (16, 16),
    layers: Sequence[str] | None = None,
    beta_scale: float = 1.0,
) -> PruningPlan:
    """The LPViT-style plan of an ONNX import meeting ``budget`` (module docstring), scored on
    ``calibration`` images, ``(N, C, H, W)`` float32."""
    if len(calibration) == 0:
        raise DataError("the calibration set is empty")
    selected = _selected(imported, list(DEFAULT_LAYERS if layers is None else layers))
    moments = input_second_moments(imported.onnx_path, dict(selected).values(), calibration)
    tokens = imported.graph.num_tokens
    curves = [
        _curves(name, imported.params[w].astype(np.float64), moments[w], block, tokens, budget)
        for name, w in selected
    ]
    masks, beta = allocate(
        curves, budget, _dense_metric(imported, budget.metric), block, beta_scale
    )
    return PruningPlan(
        model_id=imported.model_id,
        weights_hash=onnx_weights_hash(imported),
        method="lpvit",
        budget={
            **budget.to_json(),
            "blocks": f"{block[0]}x{block[1]}",
            "beta": beta,
            "score": "activation second moments (no gradients: ONNX input)",
        },
        layers=masks,
    )


def _selected(imported, patterns: list[str]) -> list[tuple[str, str]]:
    """(layer name, ONNX weight name) of the layers matching ``patterns``, in block order."""
    layers = onnx_layers(imported)
    if not patterns:
        raise PlanError("no layer patterns given; leave layers unset for the default")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            raise PlanError(
                f"layer pattern {pattern!r} matches no linear layer of {imported.model_id}'s "
                f"blocks (they are {', '.join(list(layers)[:4])}, ...)"
            )
    return [(n, w) for n, w in layers.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _curves(name, weight, moment, block, tokens: int, budget: Budget) -> LayerCurves:
    rows, cols = block
    check_block_geometry(name, block, weight.shape)
    out_f, in_f = weight.shape
    grid = (out_f // rows, in_f // cols)
    energy = weight**2 * moment[None, :]  # each weight's share of the output's squared error
    per_block = energy.reshape(grid[0], rows, grid[1], cols).sum(axis=(1, 3)).ravel()
    order = np.argsort(per_block, kind="stable")  # lowest distortion first
    delta = np.concatenate([[0.0], np.cumsum(per_block[order])]) / max(energy.sum(), 1e-30)
    fractions = np.arange(order.size + 1) / order.size
    per_token = 1 if budget.metric == "params" else tokens
    saving = np.array([FlopsCost().saving(name, (out_f, in_f), per_token, f) for f in fractions])
    return LayerCurves(name, (out_f, in_f), grid, order, delta, saving, saving)


def kept(imported, plan: PruningPlan, metric: str) -> tuple[float, float]:
    """(kept fraction, kept amount) of the model's MACs (``"flops"``) or weights under
    ``plan``'s block masks, counted as `vitsparse.pruning.flops` does."""
    dense = _dense_metric(imported, metric)
    per = imported.graph.num_tokens if metric == "flops" else 1
    saved = sum(
        (1 - m.density) * m.out_features * m.in_features * per for m in plan.layers.values()
    )
    return (dense - saved) / dense, dense - saved


def _dense_metric(imported, metric: str) -> float:
    """The unpruned model's MACs or weights, counted as `vitsparse.pruning.flops` does."""
    g = imported.graph
    channels = imported.input_shape[1]
    tokens = g.num_tokens
    embed_w = g.embed_dim * channels * g.patch_size * g.patch_size
    total = (g.num_patches if metric == "flops" else 1) * embed_w
    total += g.embed_dim * g.num_classes
    for b in g.blocks:
        linear = (
            b.embed_dim * 3 * b.attn_dim + b.attn_dim * b.embed_dim + 2 * b.embed_dim * b.mlp_dim
        )
        if metric == "flops":
            total += tokens * linear + 2 * b.num_heads * tokens * tokens * b.head_dim
        else:
            total += linear
    return float(total)


def _session(model):
    """A CPU ONNX Runtime session of a file path or a ModelProto."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_onnx(path, images: np.ndarray) -> np.ndarray:
    """The first output of the ONNX file at ``path`` on ``images``, one image at a time (a file
    exported at batch 1 takes no other)."""
    session = _session(path)
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: image[None]})[0] for image in np.asarray(images, np.float32)]
    )


def input_second_moments(path, weights, images: np.ndarray) -> dict[str, np.ndarray]:
    """{ONNX weight name: E[x_j^2] of the input features of the MatMul/Gemm it feeds}, over
    every token of ``images``, run one image at a time by ONNX Runtime."""
    model = onnx.load(str(path))
    feeds = {}
    for weight in weights:
        node = _consumer(model, weight)
        feeds[weight] = node.input[0]
    exposed = sorted(set(feeds.values()) - {o.name for o in model.graph.output})
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in exposed)
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    image_input = session.get_inputs()[0].name
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for image in np.asarray(images, dtype=np.float32):
        outputs = dict(zip(names, session.run(None, {image_input: image[None]}), strict=True))
        for tensor in set(feeds.values()):
            x = np.asarray(outputs[tensor], dtype=np.float64)
            x = x.reshape(-1, x.shape[-1])
            sums[tensor] = sums.get(tensor, 0.0) + (x**2).sum(axis=0)
            count[tensor] = count.get(tensor, 0) + x.shape[0]
    return {w: sums[t] / count[t] for w, t in feeds.items()}


def masked_onnx(path, plan: PruningPlan, imported, out: Path) -> Path:
    """A copy of the ONNX file at ``path`` with ``plan``'s pruned blocks zeroed, at ``out``."""
    model = onnx.load(str(path))
    layers = onnx_layers(imported)
    inits = {t.name: t for t in model.graph.initializer}
    for name, mask in plan.layers.items():
        weight = layers[name]
        node = _consumer(model, weight)
        tensor = inits[weight]
        array = numpy_helper.to_array(tensor)
        keep = np.kron(mask.kept, np.ones((mask.rows, mask.cols), dtype=bool))
        transposed = node.op_type == "MatMul" or not any(
            a.name == "transB" and a.i == 1 for a in node.attribute
        )
        if transposed:  # stored (in, out)
            keep = keep.T
        tensor.CopyFrom(
            numpy_helper.from_array(np.where(keep, array, 0).astype(array.dtype), weight)
        )
    onnx.save(model, str(out))
    return out


def _consumer(model: onnx.ModelProto, weight: str):
    """The one MatMul/Gemm node taking ``weight`` as its second input (ModelError otherwise)."""
    users = [n for n in model.graph.node if weight in n.input]
    if len(users) != 1 or users[0].op_type not in ("MatMul", "Gemm") or users[0].input[1] != weight:
        kinds = ", ".join(f"{n.op_type}" for n in users) or "none"
        raise ModelError(
            f"ONNX weight {weight!r} feeds {kinds}, not one MatMul or Gemm as its weight; "
            "block masks of this file cannot be scored or checked"
        )
    return users[0]
