"""Reduced precision (int8, bf16 and fp16): what it computes, once, for the compiler and for its
PyTorch reference.

The reduced layers are the blocks' linear layers (qkv, proj, fc1, fc2) with at least two input
features; the patch embedding, the classifier, attention's matmuls, LayerNorm, softmax and GELU
stay in float32, in every precision.

bf16 and fp16 (the half precisions, ``HALF``): the layer's input and weight are rounded to
bfloat16 or IEEE half (to nearest, ties to even), their products summed in float32, and the
bias added in float32. `half_values` is the compiler's rounding (bf16 as its uint16 bits),
`half_model` the reference (the sums in float64, where both halves' products are exact).

int8: for a quantized layer with input x, weight W (N, K) and bias b:

    s_w[n] = max_k |W[n, k]| / 127          per output channel, symmetric (1 for a zero row)
    Wq     = clip(round(W / s_w), -127, 127)
    xq     = clip(round(x * (1 / s_x)), -127, 127)      per tensor, s_x from calibration
    y      = float32(sum_k xq * Wq  [exact, int32]) * (s_x * s_w[n]) + b[n]

`Quantization` holds the activation scales (calibrated on images; `vitsparse.pruning.calibrate`)
and how they were calibrated. `quantize_weight` and `dequant_scales` are the compiler's weight
and scale arithmetic; `fake_quant_model` is the PyTorch model of the same computation, which
every int8 compile is checked against.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F

QMAX = 127
_LAYER_SUFFIXES = (".attn.qkv", ".attn.proj", ".mlp.fc1", ".mlp.fc2")


@dataclass(frozen=True)
class Quantization:
    """Per-tensor int8 activation scales of the quantized layers (PyTorch layer name -> s_x),
    and what they were calibrated on."""

    scales: Mapping[str, float]
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name, scale in self.scales.items():
            if not (np.isfinite(scale) and scale > 0):
                raise ValueError(f"activation scale of {name!r} must be positive, got {scale}")

    def inverse(self, layer: str) -> np.float32:
        """1 / s_x in float32, as the compiled model and the reference both multiply by it."""
        return np.float32(1.0) / np.float32(self.scales[layer])

    def to_json(self) -> dict:
        return {"scales": dict(self.scales), "calibration": dict(self.calibration)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Quantization:
        return cls({k: float(v) for k, v in data["scales"].items()}, data.get("calibration", {}))


def is_reduced_layer(name: str, in_features: int) -> bool:
    """Whether the linear layer ``name`` (a PyTorch name) with ``in_features`` inputs runs in
    the reduced precision: the blocks' linear layers with at least two inputs (a layer pruned to
    one input has no reduction for the paired kernels)."""
    return name.startswith("blocks.") and name.endswith(_LAYER_SUFFIXES) and in_features >= 2


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """The layers reduced precision (int8 or bf16) applies to in ``model`` (`is_reduced_layer`)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and is_reduced_layer(name, module.in_features)
    ]


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float weight -> (int8 values (N, K), float32 per-output-channel scales (N,))."""
    w = np.asarray(weight, dtype=np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(QMAX)).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequant_scales(activation_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """S[n] = s_x * s_w[n] in float32: what multiplies the int32 sums."""
    return (np.float32(activation_scale) * weight_scale.astype(np.float32)).astype(np.float32)


class FakeQuantLinear(torch.nn.Module):
    """The int8 computation of one linear layer in PyTorch (see the module docstring)."""

    def __init__(self, linear: torch.nn.Linear, activation_scale: float):
        super().__init__()
        q, w_scale = quantize_weight(linear.weight.detach().cpu().numpy())
        self.register_buffer("wq", torch.from_numpy(q.astype(np.float64)))
        self.register_buffer("scale", torch.from_numpy(dequant_scales(activation_scale, w_scale)))
        inverse = np.float32(1.0) / np.float32(activation_scale)
        self.register_buffer("inverse", torch.tensor(inverse, dtype=torch.float32))
        bias = linear.bias if linear.bias is not None else torch.zeros(q.shape[0])
        self.register_buffer("bias", bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        xq = torch.clamp(torch.round(x * self.inverse), -QMAX, QMAX)
        acc = F.linear(xq.double(), self.wq)  # exact integer sums
        return acc.float() * self.scale + self.bias


def fake_quant_model(model: torch.nn.Module, quantization: Quantization) -> torch.nn.Module:
    """A copy of ``model`` with each quantized layer replaced by its int8 computation; the
    layers must be those `quantized_layers` names and ``quantization`` scales."""
    layers = quantized_layers(model)
    missing = sorted(set(layers) - set(quantization.scales))
    extra = sorted(set(quantization.scales) - set(layers))
    if missing or extra:
        raise ValueError(
            f"the quantization does not fit the model: no scale for {missing[:3]}, "
            f"scales for layers it lacks {extra[:3]}"
        )
    out = copy.deepcopy(model)
    for name in layers:
        parent, _, child = name.rpartition(".")
        owner = out.get_submodule(parent)
        setattr(owner, child, FakeQuantLinear(getattr(owner, child), quantization.scales[name]))
    return out.eval()


# -- bf16 and fp16 -----------------------------------------------------------------------------

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the half precisions, as PyTorch's dtypes


def bf16_bits(values) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even), as their uint16 bits."""
    return np.asarray(values, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def half_values(values, precision: str) -> np.ndarray:
    """float32 values rounded to ``precision`` (nearest, ties to even) as the kernels store
    them: bf16 as its uint16 bits, fp16 as float16."""
    if precision == "bf16":
        return bf16_bits(values)
    if precision == "fp16":
        return np.asarray(values, np.float32).astype(np.float16)
    raise ValueError(f"{precision!r} is not a half precision ({', '.join(HALF)})")


class HalfLinear(torch.nn.Module):
    """The bf16 or fp16 computation of one linear layer in PyTorch (see the module docstring)."""

    def __init__(self, linear: torch.nn.Linear, precision: str = "bf16"):
        super().__init__()
        self.dtype = HALF[precision]
        weight = linear.weight.detach().float().cpu()
        self.register_buffer("weight", weight.to(self.dtype).double())
        bias = linear.bias if linear.bias is not None else torch.zeros(weight.shape[0])
        self.register_buffer("bias", bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        sums = F.linear(x.to(self.dtype).double(), self.weight)  # half products: exact in float64
        return sums.float() + self.bias


def half_model(model: torch.nn.Module, precision: str = "bf16") -> torch.nn.Module:
    """A copy of ``model`` with each reduced layer (`quantized_layers`) computing in
    ``precision`` (bf16 or fp16)."""
    if precision not in HALF:
        raise ValueError(f"{precision!r} is not a half precision ({', '.join(HALF)})")
    out = copy.deepcopy(model)
    for name in quantized_layers(model):
        parent, _, child = name.rpartition(".")
        owner = out.get_submodule(parent)
        setattr(owner, child, HalfLinear(getattr(owner, child), precision))
    return out.eval()


def reference_model(
    model: torch.nn.Module, precision: str, quantization: Quantization | None = None
) -> torch.nn.Module:
    """The PyTorch model of what ``precision`` compiles ``model`` to (``model`` itself for
    fp32; int8 needs the ``quantization``)."""
    if precision == "fp32":
        return model
    if precision in HALF:
        return half_model(model, precision)
    if precision == "int8":
        if quantization is None:
            raise ValueError("the int8 reference needs the quantization (activation scales)")
        return fake_quant_model(model, quantization)
    raise ValueError(f"no reference for precision {precision!r}")
