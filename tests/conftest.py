"""Shared fixtures: small seeded models and synthetic data, no network, no shared data."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from intq.capture import capture
from intq.convert import collect_statistics
from intq.data import CIFAR10_CLASSES
from intq.models import Net, NetWithBias


def make_pixels(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)


def calibrated(model: torch.nn.Module, pixels: torch.Tensor):
    """(graph, stats) of `model` observed on `pixels`."""
    images = (pixels.float() / 255 - 0.5) / 0.5
    graph = capture(model, images[:2])
    return graph, collect_statistics(graph, [images])


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    return make_pixels(64)


@pytest.fixture(scope="session", params=["Net", "NetWithBias"])
def seeded_model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    model = {"Net": Net, "NetWithBias": NetWithBias}[request.param]().eval()
    if request.param == "NetWithBias":
        with torch.no_grad():
            model.fc3.bias.uniform_(-0.5, 0.5)
    return model


def write_image_folder(root: Path, train_per_class: int, test_per_class: int, classes: int = 10, seed: int = 0) -> Path:
    """A CIFAR-like image folder of PNGs whose class shows in the mean colour (learnable); the class
    folders carry CIFAR-10's names, as intq requires."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in range(classes):
            folder = root / split / CIFAR10_CLASSES[label]
            folder.mkdir(parents=True)
            for index in range(count):
                base = np.array([label * 25, 255 - label * 25, (label * 70) % 256], dtype=np.float64)
                image = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{index:04d}.png")
    return root
