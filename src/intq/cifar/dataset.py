"""CIFAR-10 in memory: its class names and image side, the study's input normalisation, and
`data_error`, the one-line DataError that also says how to point intq at CIFAR-10. The Dataset,
DataError, Progress and batches live in intq.data.dataset and are re-exported here (intq.cifar.data
loads a Dataset from disk)."""
from __future__ import annotations

import torch

from intq.data.dataset import DataError, Dataset, Progress, batches

__all__ = ["CIFAR10_CLASSES", "IMAGE_SIDE", "DataError", "Dataset", "Progress", "batches", "data_error",
           "normalize"]

# The ten classes in label order (the order of batches.meta; also alphabetical).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_SIDE = 32

_HINT = (
    "point intq at CIFAR-10 with --data DIR or the INTQ_DATA environment variable "
    "(accepted layouts: cifar-10-batches-py/, cifar-10-python.tar.gz, "
    "or train/<class>/*.png|jpg with test/<class>/*.png|jpg)"
)


def data_error(message: str) -> DataError:
    """DataError whose single line is `message` followed by how to point intq at the data."""
    one_line = " ".join(message.split())
    return DataError(f"{one_line}; {_HINT}")


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """The study's input normalisation: float32 y = (x / 255 − 0.5) / 0.5, i.e. [0, 255] -> [−1, 1].

    Computed in the same order as torchvision's ToTensor + Normalize(0.5, 0.5) so results match
    bit for bit. Worked numbers: 0 -> −1.0, 255 -> 1.0, 51 -> (0.2 − 0.5) / 0.5 = −0.6.
    """
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    return (images_uint8.to(torch.float32) / 255.0 - 0.5) / 0.5
