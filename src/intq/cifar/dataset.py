"""CIFAR-10 in memory: the Dataset (uint8 images, int64 labels, checked on construction), the
study's input normalisation, batching, and DataError, the one-line error every data problem raises
(intq.cifar.data loads a Dataset from disk)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# The ten classes in label order (the order of batches.meta; also alphabetical).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_SIDE = 32

_HINT = (
    "point intq at CIFAR-10 with --data DIR or the INTQ_DATA environment variable "
    "(accepted layouts: cifar-10-batches-py/, cifar-10-python.tar.gz, "
    "or train/<class>/*.png|jpg with test/<class>/*.png|jpg)"
)

Progress = Callable[[str], None]


class DataError(Exception):
    """A data folder or file that cannot be used; the message is one line naming the path."""


def data_error(message: str) -> DataError:
    """DataError whose single line is `message` followed by how to point intq at the data."""
    one_line = " ".join(message.split())
    return DataError(f"{one_line}; {_HINT}")


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """CIFAR-10 splits as uint8 images (N, 3, 32, 32) in CHW order and int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, IMAGE_SIDE, IMAGE_SIDE):
                raise DataError(f"{split} images must be uint8 (N, 3, 32, 32), "
                                f"got {images.dtype} {tuple(images.shape)} from {self.source}")
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise DataError(f"{split} labels must be int64 ({images.shape[0]},), "
                                f"got {labels.dtype} {tuple(labels.shape)} from {self.source}")
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.classes):
                raise DataError(f"{split} labels fall outside 0..{len(self.classes) - 1} "
                                f"in {self.source}")

    def __repr__(self) -> str:
        return (f"Dataset(train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"classes={len(self.classes)}, source={self.source!r})")


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """The study's input normalisation: float32 y = (x / 255 − 0.5) / 0.5, i.e. [0, 255] -> [−1, 1].

    Computed in the same order as torchvision's ToTensor + Normalize(0.5, 0.5) so results match
    bit for bit. Worked numbers: 0 -> −1.0, 255 -> 1.0, 51 -> (0.2 − 0.5) / 0.5 = −0.6.
    """
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    return (images_uint8.to(torch.float32) / 255.0 - 0.5) / 0.5


def batches(images: torch.Tensor, labels: torch.Tensor,
            batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (images, labels) slices of at most `batch_size` items; views, never copies."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]
