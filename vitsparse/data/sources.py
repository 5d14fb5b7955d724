"""Image sources for calibration and evaluation: a labelled ImageFolder directory, the built-in
digits split, or synthetic images.

``load_images(source, image_size=...)``: ``source`` is a directory (torchvision ImageFolder: one
sub-directory per class; resized and centre-cropped to ``image_size``, ImageNet normalisation),
``"digits"`` / ``"digits-train"`` (the held-out / training split of `vitsparse.data.digits`), or
``"synthetic"`` (seeded standard-normal images, no labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vitsparse.data.digits import check_image_size, digits_split
from vitsparse.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageSet:
    """Images ``(n, 3, H, W)`` float32 and their labels ``(n,)`` (None when unlabelled)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    classes: tuple[str, ...] | None = None  # label i's class name (an ImageFolder's folders)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, size: int):
        for start in range(0, len(self), size):
            yield self.images[start : start + size]


def load_images(
    source: str | Path, *, image_size: int, limit: int | None = None, seed: int = 0
) -> ImageSet:
    """The images of ``source`` (see the module docstring), at most ``limit`` of them."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    name = str(source)
    if name in ("digits", "digits-train"):
        check_image_size(image_size)
        images, labels = digits_split("test" if name == "digits" else "train")
        out = ImageSet(name, images, labels, tuple(str(d) for d in range(10)))
    elif name == "synthetic":
        generator = torch.Generator().manual_seed(seed)
        count = limit or 64
        images = torch.randn((count, 3, image_size, image_size), generator=generator)
        out = ImageSet(name, images, None)
    else:
        out = _image_folder(Path(source), image_size, limit, seed)
    if limit is not None and len(out) > limit:
        labels = None if out.labels is None else out.labels[:limit]
        out = ImageSet(out.name, out.images[:limit], labels, out.classes)
    if len(out) == 0:
        raise DataError(f"image source {name!r} holds no images")
    return out


def _image_folder(path: Path, image_size: int, limit: int | None, seed: int) -> ImageSet:
    if not path.is_dir():
        raise DataError(
            f"image source {str(path)!r} is not a directory, nor one of 'digits', "
            "'digits-train', 'synthetic'"
        )
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    try:
        folder = datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"image folder {str(path)!r}: {err}") from None
    if len(folder) == 0:
        raise DataError(f"image folder {str(path)!r} holds no images")
    # ImageFolder lists class by class: a limited subset is a seeded sample of all classes.
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))
    chosen = sorted(order[: len(folder) if limit is None else limit].tolist())
    pairs = [folder[i] for i in chosen]
    images = torch.stack([p[0] for p in pairs])
    labels = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return ImageSet(str(path), images, labels, tuple(folder.classes))
