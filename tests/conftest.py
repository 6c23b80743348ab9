"""Shared fixtures: small seeded models and synthetic data, no network, no shared data."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from intq.graph.capture import capture
from intq.graph.convert import collect_statistics
from intq.graph.model_file import ModelFileError, load, to_arrays
from intq.cifar.data import CIFAR10_CLASSES
from intq.cifar.models import Net, NetWithBias


class Strided(nn.Module):
    """Padding, stride, dilation and groups, so the window arithmetic is exercised."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.fc = nn.Linear(6 * 16 * 16, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    """conv-BN-ReLU, a residual block with a 1x1 projection, ReLU6, average pools, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv_b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.project = nn.Conv2d(8, 16, 1, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu6(self.conv_a(x))
        y = self.conv_b(y)
        x = F.relu(y + self.project(x))
        x = self.pool(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(torch.flatten(x, 1))


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


def round_tripped(model, pixels: torch.Tensor, folder: Path):
    """`model` saved to and loaded from folder/m.npz: the same bytes and the same integers on `pixels`."""
    from intq.executors.reference import run_integer
    from intq.graph.model_file import load, save, to_bytes

    save(model, folder / "m.npz")
    loaded = load(folder / "m.npz")
    assert to_bytes(loaded) == to_bytes(model)
    assert torch.equal(run_integer(loaded, pixels), run_integer(model, pixels))
    return loaded


def edited_file_refusal(tmp_path, model, edit) -> str:
    """The one-line ModelFileError of `model`'s file after `edit` changed its metadata ({op name: op fields})."""
    arrays = to_arrays(model)
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    edit({op["name"]: op for op in meta["layers"]})
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(tmp_path / "edited.npz", **arrays)
    with pytest.raises(ModelFileError) as error:
        load(tmp_path / "edited.npz")
    assert "\n" not in str(error.value)
    return str(error.value)


def with_mantissa_off_by_one(model, op_name: str):
    """`model` with op `op_name`'s first mantissa one more than its scales give (written as it is)."""
    op = model.layer(op_name)
    edited = replace(op, mantissa=op.mantissa + np.int32(1))
    return replace(model, layers=[edited if layer is op else layer for layer in model.layers])
