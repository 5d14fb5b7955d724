"""int8 quantization: what it computes, once, for the compiler and for its PyTorch reference.

The quantized layers are the blocks' linear layers (qkv, proj, fc1, fc2) with at least two
input features; the patch embedding, the classifier, attention's matmuls, LayerNorm, softmax and
GELU stay in float32. For a quantized layer with input x, weight W (N, K) and bias b:

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


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """The layers int8 quantizes in ``model``: the blocks' linear layers with at least two
    input features (a layer pruned to one input has no reduction for the int8 kernel)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith("blocks.")
        and name.endswith(_LAYER_SUFFIXES)
        and module.in_features >= 2
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
