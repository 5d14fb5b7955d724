"""Reading an ONNX ViT and bringing its graph to the form the PyTorch import has.

Two differences matter to vitsparse and are removed here, on the ONNX graph, before TVM imports it:

* Exporters store linear weights pre-transposed, ``(in, out)``, and feed them straight to MatMul.
  The weights are transposed back to ``(out, in)`` and a Transpose node is put in front of the
  MatMul, so the Relax module has ``matmul(x, permute_dims(W))`` exactly as from PyTorch.
* Exporters merge initializers with equal contents. A randomly initialised timm model has all-zero
  biases, so e.g. one tensor named ``blocks.0.norm1.bias`` ends up as the attention-proj and fc2
  bias of every block. Each use gets its own copy, so pruning one layer cannot change another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vitsparse.errors import ModelError

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class OnnxInput:
    """The image input of an ONNX model: its name and shape (batch may be symbolic)."""

    name: str
    batch: int | str  # a dim_param name when the batch is dynamic
    channels: int
    height: int
    width: int


def load_onnx(path: Path) -> onnx.ModelProto:
    """``onnx.load`` with ModelError for a missing or unreadable file."""
    if not path.is_file():
        raise ModelError(f"ONNX file {str(path)!r} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError, OSError for external data, ...
        raise ModelError(f"ONNX file {str(path)!r} could not be read: {err}") from err


def image_input(model: onnx.ModelProto, model_id: str) -> OnnxInput:
    """The single non-initializer input; it must be (batch, C, H, W) with static C, H, W."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(
            f"ONNX model {model_id!r} has {len(inputs)} inputs "
            f"({', '.join(i.name for i in inputs)}); vitsparse needs exactly one image input"
        )
    value = inputs[0]
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4 or any(not d.HasField("dim_value") for d in dims[1:]):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
        raise ModelError(
            f"ONNX model {model_id!r}: input {value.name!r} has shape {shape}; vitsparse needs "
            "(batch, channels, H, W) with static channels, H and W"
        )
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else (dims[0].dim_param or "?")
    return OnnxInput(value.name, batch, dims[1].dim_value, dims[2].dim_value, dims[3].dim_value)


def canonicalize_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with unshared float initializers and ``(out, in)`` MatMul weights."""
    model = _copy(model)
    graph = model.graph
    if model.ir_version >= 4:  # initializers listed as inputs too (old exporters) are not inputs
        names = {t.name for t in graph.initializer}
        kept = [i for i in graph.input if i.name not in names]
        del graph.input[:]
        graph.input.extend(kept)
    _unshare_initializers(graph)
    _transpose_matmul_weights(graph)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _unshare_initializers(graph: onnx.GraphProto) -> None:
    """Give every use of a float initializer with more than one element its own tensor."""
    initializers = {t.name: t for t in graph.initializer}
    taken = set(initializers) | {o for n in graph.node for o in n.output}
    seen: set[str] = set()
    for node in graph.node:
        for slot, name in enumerate(node.input):
            tensor = initializers.get(name)
            if tensor is None or tensor.data_type not in _FLOAT_TYPES or _numel(tensor) <= 1:
                continue
            if name not in seen:
                seen.add(name)
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = _fresh_name(f"{name}_copy", taken)
            graph.initializer.append(copy)
            node.input[slot] = copy.name


def _transpose_matmul_weights(graph: onnx.GraphProto) -> None:
    """MatMul(x, W[in, out]) -> MatMul(x, Transpose(W_t[out, in])); Gemm(transB=0) -> transB=1."""
    initializers = {t.name: t for t in graph.initializer}
    taken = set(initializers) | {o for n in graph.node for o in n.output}
    nodes = []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        is_weight = (
            weight is not None and weight.data_type in _FLOAT_TYPES and len(weight.dims) == 2
        )
        if is_weight and node.op_type == "MatMul":
            _transpose_in_place(weight)
            name = _fresh_name(f"{weight.name}_transposed", taken)
            nodes.append(
                onnx.helper.make_node("Transpose", [weight.name], [name], perm=[1, 0], name=name)
            )
            node.input[1] = name
        elif is_weight and node.op_type == "Gemm" and not _attr(node, "transB", 0):
            _transpose_in_place(weight)
            _set_attr(node, "transB", 1)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _transpose_in_place(tensor: onnx.TensorProto) -> None:
    array = np.ascontiguousarray(numpy_helper.to_array(tensor).T)
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(onnx.helper.get_attribute_value(attr))
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])


def _numel(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _fresh_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name
