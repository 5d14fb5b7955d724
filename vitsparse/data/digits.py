"""The built-in dataset and model: scikit-learn's handwritten digits, upsampled, and a small ViT
trained on them.

``digits_split("train" | "test")`` gives the 8x8 grey digits bilinearly upsampled to 32x32, as
3-channel images standardised with the training set's mean and deviation, in a fixed stratified
80/20 split. ``digits_vit()`` returns a timm VisionTransformer (32x32 input, 4x4 patches, so 64
patch tokens plus the class token, width 64, 4 blocks of 4 heads) trained on the training split;
the weights are cached on disk (``$VITSPARSE_CACHE`` or ``~/.cache/vitsparse``), keyed by the
training recipe, so training runs once per machine (~1 min on 2 cores).
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import torch

from vitsparse._io import cache_dir, write_bytes_atomic
from vitsparse.errors import DataError

DIGITS_MODEL = "vitsparse/digits_vit"
IMAGE_SIZE = 32
# The architecture and training recipe; the cache key is a hash of this.
RECIPE = {
    "arch": {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0},
    "epochs": 40,
    "batch": 64,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "seed": 0,
    "test_fraction": 0.2,
    # the initial weights come from the seed too (before, from whatever the caller's RNG held)
    "seeded_init": True,
}


def check_image_size(image_size: int) -> None:
    """DataError unless a model takes the digits' image size."""
    if image_size != IMAGE_SIZE:
        raise DataError(
            f"the digits images are {IMAGE_SIZE}x{IMAGE_SIZE}; this model takes "
            f"{image_size}x{image_size} (use an ImageFolder or 'synthetic' for it)"
        )


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, 32, 32) float32, labels (n,) int64) of the ``"train"`` or ``"test"`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    images = torch.nn.functional.interpolate(
        images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    labels = torch.from_numpy(data.target.astype(np.int64))
    rng = np.random.default_rng(RECIPE["seed"])
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):  # stratified: the same fraction of every class held out
        members = np.flatnonzero(data.target == digit)
        count = round(RECIPE["test_fraction"] * members.size)
        test[rng.choice(members, size=count, replace=False)] = True
    train = ~test
    mean, std = images[train].mean(), images[train].std()
    images = ((images - mean) / std).expand(-1, 3, -1, -1).contiguous()
    chosen = torch.from_numpy(train if split == "train" else test)
    return images[chosen], labels[chosen]


def _architecture() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=IMAGE_SIZE, num_classes=10, **RECIPE["arch"])


def _key() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def digits_vit(*, progress=None) -> torch.nn.Module:
    """The trained digits ViT (eval mode), from the cache or trained now and cached."""
    path = cache_dir() / f"digits_vit-{_key()}.pt"
    if path.exists():
        model = _architecture()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(RECIPE["seed"])
        model = _architecture()
        _train(model, progress or (lambda _msg: None))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes_atomic(path, buffer.getvalue())  # a concurrent reader sees none or all of it
    return model.eval()


def _train(model: torch.nn.Module, say) -> None:
    # On one thread, so that the result cannot depend on how PyTorch splits its reductions
    # between threads (the seed fixes everything else).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_steps(model, say)
    finally:
        torch.set_num_threads(threads)


def _train_steps(model: torch.nn.Module, say) -> None:
    torch.manual_seed(RECIPE["seed"])
    images, labels = digits_split("train")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"]
    )
    steps = RECIPE["epochs"] * ((len(labels) + RECIPE["batch"] - 1) // RECIPE["batch"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, RECIPE["lr"], total_steps=steps)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    model.train()
    for epoch in range(RECIPE["epochs"]):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(labels), RECIPE["batch"]):
            batch = order[start : start + RECIPE["batch"]]
            # Light augmentation: shifts by up to 2 pixels.
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(images[batch], shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        say(f"[digits] epoch {epoch + 1}/{RECIPE['epochs']}: loss {total / len(labels):.4f}")
    model.eval()
