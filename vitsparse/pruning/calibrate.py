"""int8 calibration: the per-tensor activation scale of every quantized layer, read off the
model (the plan applied, so that the scales are those of the model being compiled) running on
calibration images.

The rule is ``max``: s_x = max |x| / 127 over every image, token and channel the layer sees,
so no calibration activation is clipped. The scales depend only on the model and the images, in
the order given: calibrating twice gives the same scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vitsparse.errors import DataError
from vitsparse.plan.quantize import QMAX, Quantization, quantized_layers
from vitsparse.pruning._hooks import hooked

RULE = "max"


def calibrate(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch: int = 32,
    describe: Mapping[str, Any] | None = None,
) -> Quantization:
    """The activation scales of ``model``'s quantized layers over ``images`` (N, 3, H, W);
    ``describe`` (the image source and count) is recorded with them."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(
            "int8 calibration needs at least one image (got a tensor of shape "
            f"{tuple(images.shape)}); pass --calib with an image source"
        )
    layers = quantized_layers(model)
    if not layers:
        raise DataError("the model has no linear layers in blocks to quantize")
    peaks = dict.fromkeys(layers, 0.0)

    def observe(name):
        def hook(_module, args):
            peaks[name] = max(peaks[name], float(args[0].detach().abs().max()))

        return hook

    hooks = [(model.get_submodule(name), "pre", observe(name)) for name in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), hooked(hooks):
            for start in range(0, images.shape[0], batch):
                model(images[start : start + batch].float())
    finally:
        model.train(was_training)
    scales = {name: (peak / QMAX if peak > 0 else 1.0) for name, peak in peaks.items()}
    info = {"rule": RULE, "images": int(images.shape[0]), **dict(describe or {})}
    return Quantization(scales, info)
