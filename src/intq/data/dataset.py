"""Images in memory: the Dataset (uint8 images of any channel count and size, int64 labels, checked
on construction), batching, and DataError, the one-line error every data problem raises."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

Progress = Callable[[str], None]


class DataError(Exception):
    """A data folder or file that cannot be used; the message is one line naming the path."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Train and test splits as uint8 images (N, C, H, W) in CHW order and int64 labels (N,).

    Rules, checked on construction (each failure a one-line DataError naming `source`): any
    C, H, W >= 1, the same (C, H, W) in both splits (an empty split is (0, C, H, W)), labels in
    0..len(classes) - 1, and at least one class name. Example: 60 grayscale 28x28 images split
    50/10 over ("cat", "dog") are train_images (50, 1, 28, 28), test_images (10, 1, 28, 28),
    labels in {0, 1}; image_shape is (1, 28, 28).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.classes, tuple) or not self.classes \
                or not all(isinstance(name, str) for name in self.classes):
            raise DataError(f"classes must be a non-empty tuple of names, got {self.classes!r:.80} "
                            f"from {self.source}")
        for split in ("train", "test"):
            _check_split(split, getattr(self, f"{split}_images"), getattr(self, f"{split}_labels"),
                         len(self.classes), self.source)
        train_shape, test_shape = tuple(self.train_images.shape[1:]), tuple(self.test_images.shape[1:])
        if train_shape != test_shape:
            raise DataError(f"train images are (C, H, W) = {train_shape} but test images are "
                            f"{test_shape} in {self.source}; both splits must share one image shape")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, e.g. (3, 32, 32) for CIFAR-10."""
        channels, height, width = self.train_images.shape[1:]
        return int(channels), int(height), int(width)

    def __repr__(self) -> str:
        return (f"Dataset(train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"classes={len(self.classes)}, image_shape={self.image_shape}, source={self.source!r})")


def _check_split(split: str, images: torch.Tensor, labels: torch.Tensor, n_classes: int,
                 source: str) -> None:
    """Raise DataError unless `images` is uint8 (N, C, H, W) with C, H, W >= 1 and `labels` is
    int64 (N,) in 0..n_classes - 1. Example: uint8 (0, 1, 28, 28) with int64 (0,) passes."""
    shape = tuple(images.shape)
    if images.dtype != torch.uint8 or len(shape) != 4 or min(shape[1:]) < 1:
        raise DataError(f"{split} images must be uint8 (N, C, H, W) with C, H, W >= 1, "
                        f"got {images.dtype} {shape} from {source}")
    if labels.dtype != torch.int64 or labels.shape != (shape[0],):
        raise DataError(f"{split} labels must be int64 ({shape[0]},), "
                        f"got {labels.dtype} {tuple(labels.shape)} from {source}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes:
        raise DataError(f"{split} labels fall outside 0..{n_classes - 1} in {source}")


def batches(images: torch.Tensor, labels: torch.Tensor,
            batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (images, labels) slices of at most `batch_size` items; views, never copies.

    Example: 10 items in batches of 4 give slices of 4, 4 and 2.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]
