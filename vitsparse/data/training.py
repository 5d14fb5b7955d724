"""Data to fine-tune on: augmented batches in a seeded order, and a held-out set to evaluate on.

``training_data(source, image_size=...)`` takes the sources `load_images` takes:

- ``"digits-train"`` (or ``"digits"``): the training split of the built-in digits, shifted by up
  to 2 pixels at random. The digits test split (``"digits"``) is never trained on or selected
  by: it stays the test of the result.
- an ImageFolder directory: the usual augmentation (random resized crop, horizontal flip);
  held-out images are resized and centre-cropped.
- ``"synthetic"``: fresh standard-normal images every step, unlabelled: data-free distillation,
  where the teacher's outputs are the only targets; held out: a fixed synthetic set.

A seeded ``held_out_fraction`` of the source's images (at most ``held_out_size``) is held out:
the fine-tune evaluates on it after every epoch and keeps the best epoch by it.

Every random draw (order, augmentation, synthetic images) comes from a generator seeded by the
seed, the epoch and the step, so a batch is the same whenever it is drawn again (a resumed job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vitsparse.data.digits import check_image_size, digits_split
from vitsparse.data.sources import IMAGENET_MEAN, IMAGENET_STD, ImageSet, load_images
from vitsparse.errors import DataError

DIGITS_SHIFT = 2


@dataclass(frozen=True)
class TrainingData:
    """What a fine-tune trains on: ``size`` images an epoch (labelled or not), drawn by `batch`,
    and the ``held_out`` images it is evaluated on."""

    name: str
    size: int
    labelled: bool
    data_free: bool
    held_out: ImageSet
    draw: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]
    classes: int | None = None  # how many classes the labels name (None: unlabelled)

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        """The epoch's order of the training images."""
        return torch.randperm(self.size, generator=generator(seed, epoch))

    def batch(
        self, epoch: int, step: int, indices: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, labels or None) of ``indices``, augmented the same way every time."""
        return self.draw(indices, generator(seed, epoch, step))


def generator(seed: int, *path: int) -> torch.Generator:
    """A generator for the draw at ``path`` (epoch, step, ...) of a run seeded by ``seed``."""
    value = seed
    for part in path:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def training_data(
    source: str | Path,
    *,
    image_size: int,
    seed: int = 0,
    held_out_fraction: float = 0.1,
    synthetic_size: int = 1024,
    held_out_size: int = 256,
) -> TrainingData:
    """The training data of ``source`` (see the module docstring); DataError names a source
    that cannot be used (missing, empty, too small to hold any image out, wrong image size)."""
    name = str(source)
    if name in ("digits", "digits-train"):
        check_image_size(image_size)
        images, labels = digits_split("train")
        train, held = _split(len(labels), held_out_fraction, held_out_size, seed, "digits-train")
        return TrainingData(
            "digits-train",
            len(train),
            labelled=True,
            data_free=False,
            held_out=ImageSet("digits-train (held out)", images[held], labels[held]),
            draw=lambda idx, g: (_shift(images[train[idx]], g), labels[train[idx]]),
            classes=10,
        )
    if name == "synthetic":

        def synthetic(idx: torch.Tensor, g: torch.Generator):
            return torch.randn((len(idx), 3, image_size, image_size), generator=g), None

        held_out = load_images(
            "synthetic", image_size=image_size, limit=held_out_size, seed=seed + 1
        )
        return TrainingData(
            "synthetic",
            synthetic_size,
            labelled=False,
            data_free=True,
            held_out=held_out,
            draw=synthetic,
        )
    return _image_folder(Path(source), image_size, seed, held_out_fraction, held_out_size)


def _split(
    count: int, fraction: float, most: int, seed: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices, sorted) of ``count`` images: a seeded ``fraction``
    (at least one, at most ``most``) held out; DataError when that leaves none to train on."""
    held = min(most, max(1, round(fraction * count)))
    if count - held < 1:
        raise DataError(
            f"image source {name!r} holds {count} image(s): too few to train on some and hold "
            "some out"
        )
    order = torch.randperm(count, generator=generator(seed, -1))
    return order[held:].sort().values, order[:held].sort().values


def _shift(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image rolled by up to `DIGITS_SHIFT` pixels each way."""
    shifts = torch.randint(-DIGITS_SHIFT, DIGITS_SHIFT + 1, (len(images), 2), generator=g)
    return torch.stack(
        [torch.roll(x, shifts=s.tolist(), dims=(1, 2)) for x, s in zip(images, shifts, strict=True)]
    )


def _image_folder(
    path: Path, image_size: int, seed: int, fraction: float, most: int
) -> TrainingData:
    if not path.is_dir():
        raise DataError(
            f"image source {str(path)!r} is not a directory, nor one of 'digits', "
            "'digits-train', 'synthetic'"
        )
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_transform = transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    try:
        folder = datasets.ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"image folder {str(path)!r}: {err}") from None
    train_idx, held_idx = _split(len(folder), fraction, most, seed, str(path))
    held_images = torch.stack([eval_transform(folder[int(i)][0]) for i in held_idx])
    held_labels = torch.tensor([folder[int(i)][1] for i in held_idx], dtype=torch.int64)

    def draw(idx: torch.Tensor, g: torch.Generator):
        xs, ys = [], []
        for i in idx.tolist():
            image, label = folder[int(train_idx[i])]
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
                torch.default_generator.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
                xs.append(train_transform(image))
            ys.append(label)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)

    return TrainingData(
        str(path),
        len(train_idx),
        labelled=True,
        data_free=False,
        held_out=ImageSet(f"{path} (held out)", held_images, held_labels),
        draw=draw,
        classes=len(folder.classes),
    )
