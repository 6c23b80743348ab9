"""`intq train`, `intq quantize` and `intq eval` for any supported architecture and checkpoint.

Checkpoints are pickle-free .npz files (train.save_weights); integer models are IntegerModel .npz.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from intq import model_file
from intq.capture import capture
from intq.config import QConfig
from intq.convert import convert
from intq.data import Dataset, normalize
from intq.integer_model import IntegerModel
from intq.executors.reference import run_integer
from intq.models import ARCHITECTURES
from intq.study import calibrate, calibration_indices
from intq.train import ClassifierRecipe, accuracy, load_weights, predict, save_weights, train_classifier


class CheckpointError(Exception):
    """A checkpoint that does not fit its architecture (names both)."""


def build(arch: str) -> torch.nn.Module:
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]()


def load_checkpoint(path: Path, arch: str) -> torch.nn.Module:
    model = build(arch)
    if load_weights(model, Path(path)) is None:
        raise CheckpointError(f"{path}: not an intq checkpoint of a {arch} (missing, unreadable or other shapes)")
    return model.eval()


def float_accuracy(model: torch.nn.Module, data: Dataset) -> float:
    return accuracy(predict(lambda p: model(normalize(p)), data.test_images, 500), data.test_labels)


def integer_accuracy(model: IntegerModel, data: Dataset) -> float:
    return accuracy(predict(lambda p: run_integer(model, p), data.test_images, 500), data.test_labels)


def train_architecture(arch: str, data: Dataset, recipe: ClassifierRecipe, seed: int, out: Path, log=print) -> dict:
    """Train `arch` from a seeded initialisation, save the checkpoint, return the history."""
    torch.manual_seed(seed)
    model = build(arch)
    start = time.perf_counter()
    history = train_classifier(model, data.train_images, data.train_labels, recipe, seed, log,
                               evaluate=lambda: float_accuracy(model, data))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, [(h["epoch"], 0, h["loss"]) for h in history], out)
    return {"history": history, "seconds": time.perf_counter() - start, "checkpoint": str(out)}


def quantize_checkpoint(model: torch.nn.Module, data: Dataset, config: QConfig, calib_samples: int, seed: int,
                        out: Path, metadata: dict) -> dict:
    """Calibrate on training images, convert with `config`, save the IntegerModel, measure both accuracies."""
    graph = capture(model, normalize(data.train_images[:2]))
    subset = data.train_images[calibration_indices(len(data.train_images), calib_samples, seed)]
    integer = convert(graph, calibrate(graph, subset, "cpu"), config, metadata)
    size = model_file.save(integer, out)
    return {"float_accuracy": float_accuracy(model, data), "integer_accuracy": integer_accuracy(integer, data),
            "bytes": size, "file": str(out)}
