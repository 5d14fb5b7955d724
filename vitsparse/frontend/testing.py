"""Small deterministic ViTs for tests (fast to export, import and compile)."""

from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(
    depth: int = 2,
    embed_dim: int = 64,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    img_size: int = 32,
    patch_size: int = 8,
    num_classes: int = 10,
    distilled: bool = False,
    seed: int = 0,
    **family,
) -> torch.nn.Module:
    """A timm ViT (or distilled DeiT) in eval mode whose weights depend only on ``seed``.

    Every parameter, biases and LayerNorm affine terms included, is drawn at random, so no two
    tensors are equal (timm's own init zeroes biases, which hides mix-ups between them and lets
    ONNX exporters merge them). ``family``: more VisionTransformer options, e.g. DeiT III's
    ``no_embed_class=True, init_values=1e-5`` (LayerScale), ``reg_tokens=4``,
    ``global_pool="avg"``.
    """
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
        **family,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(".weight") and param.ndim == 1:  # LayerNorm scale: around 1
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim >= 2 and "embed" not in name and "token" not in name:
                fan_in = param[0].numel()
                param.copy_(noise / fan_in**0.5)
            else:
                param.copy_(0.1 * noise)
    return model.eval()
