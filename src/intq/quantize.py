"""`intq train`, `intq quantize` and `intq eval` for any supported architecture and checkpoint.

Checkpoints are pickle-free .npz files (train.save_weights); integer models are IntegerModel .npz.
"""
from __future__ import annotations

import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
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
from intq.train import ClassifierRecipe, accuracy, predict, save_weights, train_classifier


class CheckpointError(Exception):
    """A checkpoint that does not fit its architecture (names both)."""


def build(arch: str) -> torch.nn.Module:
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]()


def load_checkpoint(path: Path, arch: str) -> torch.nn.Module:
    """The `arch` module with the weights of checkpoint `path`, every array checked first
    (read_checkpoint); any problem is a CheckpointError naming the file and the array."""
    model = build(arch)
    model.load_state_dict(read_checkpoint(Path(path), model.state_dict(), arch))
    return model.eval()


def read_checkpoint(path: Path, expected: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The arrays `param.<name>` of a checkpoint written by train.save_weights, as tensors.

    Rules, each checked from the .npy headers before any array is decompressed: the file is a
    readable .npz; it holds `param.<name>` for every entry of `expected` (the architecture's
    state_dict) and no other `param.` array; each has exactly the expected shape and dtype.
    Other arrays (the loss log) are not read. Non-finite weights are left to capture, which names
    the layer.
    """
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {name[: -len(".npy")]: _npy_header(archive, name) for name in archive.namelist()
                       if name.endswith(".npy") and name.startswith("param.")}
            _check_arrays(path, headers, expected, arch)
            return {key: torch.from_numpy(_read_array(path, archive, f"param.{key}")) for key in expected}
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({err})") from None


def _npy_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from an .npy member's header without decompressing its data; None if unreadable."""
    try:
        with archive.open(name) as stream:
            version = np.lib.format.read_magic(stream)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = read[version](stream)
    except (KeyError, ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile):
        return None
    return tuple(shape), dtype


def _check_arrays(path: Path, headers: dict, expected: dict[str, torch.Tensor], arch: str) -> None:
    extra = sorted(name for name in headers if name[len("param."):] not in expected)
    if extra:
        raise CheckpointError(f"{path}: array {extra[0]!r} is not a parameter of a {arch} (another architecture?)")
    for key, tensor in expected.items():
        name = f"param.{key}"
        if name not in headers:
            raise CheckpointError(f"{path}: missing array {name!r} (a {arch} has {len(expected)} parameter arrays)")
        if headers[name] is None:
            raise CheckpointError(f"{path}: array {name!r} is unreadable (truncated or not an .npy)")
        shape, dtype = headers[name]
        want = tensor.numpy().dtype
        if dtype != want:
            raise CheckpointError(f"{path}: array {name!r} is {dtype}, a {arch} needs {want}")
        if shape != tuple(tensor.shape):
            raise CheckpointError(f"{path}: array {name!r} has shape {shape}, a {arch} needs {tuple(tensor.shape)}")


def _read_array(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    try:
        with archive.open(f"{name}.npy") as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: array {name!r} is unreadable ({err})") from None


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
