"""The one pipeline: float model -> graph -> statistics -> IntegerModel.

Every command (run, sweep, sensitivity, inspect, quantize, compare) and the Python API reach an
integer model through these functions, with plain arguments:

    name, model = float_model("Net", data, cache_dir, seed=0)       # trained (or cached), or a checkpoint
    pixels = calibration_images(data.train_images, 10_000, seed=0)  # a seeded subset, uint8
    result = quantize_model(model, pixels, RECOMMENDED)             # Quantized(graph, stats, integer_model)

`calibrated` stops after the statistics, for workflows that convert one calibration under many
configurations (the sweep's cells, the sensitivity search, the study's presets). Nothing here
writes outputs or reports; the weights cache is the only file it touches.
"""
from __future__ import annotations

import logging
import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing
from intq.graph.capture import Graph, capture
from intq.graph.config import QConfig
from intq.graph.convert import collect_statistics, convert
from intq.cifar.data import Dataset, normalize
from intq.files import remove_stale_temporaries
from intq.graph.integer_model import IntegerModel
from intq.cifar.models import ARCHITECTURES, MODELS
from intq.calibrate.observers import TensorStats
from intq.progress import progress
from intq.ptq.equalization import equalize
from intq.ptq.reconstruction import LearnedRounding, learned_integer_model
from intq.cifar.train import Recipe, load_weights, save_weights, train, weights_key

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr

CALIBRATION_BATCH = 1000  # images per float batch of the statistics pass


@dataclass(frozen=True)
class Trained:
    model: torch.nn.Module
    losses: list  # (epoch, step, loss) entries of the training log
    cached: bool  # True when the weights came from the cache


@dataclass(frozen=True)
class Calibrated:
    """A captured float graph and the statistics of one calibration pass over it."""

    graph: Graph
    stats: dict[str, TensorStats]

    def integer_model(self, config: QConfig, metadata: dict | None = None) -> IntegerModel:
        """The IntegerModel under `config` (convert); the same calibration serves any config."""
        return convert(self.graph, self.stats, config, metadata)

    def rounded_model(self, config: QConfig, pixels: torch.Tensor, metadata: dict | None = None,
                      device: str = "cpu") -> tuple[IntegerModel, LearnedRounding | None]:
        """(the IntegerModel under `config`, the learning's record or None): `integer_model` with nearest
        rounding; a learned rounding (config.rounding) learns on the first config.rounding.images of the
        uint8 calibration `pixels`, preprocessed as the graph's input (ptq.reconstruction)."""
        if not config.rounding.learned:
            return self.integer_model(config, metadata), None
        images = self.graph.preprocessing.apply(pixels[: config.rounding.images].to(device))
        return learned_integer_model(self.graph, self.stats, config, images, metadata)


@dataclass(frozen=True)
class Quantized:
    graph: Graph
    stats: dict[str, TensorStats]
    integer_model: IntegerModel
    rounding: LearnedRounding | None = None  # the learning's record when the config's rounding is learned


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A cheap identity of the training data: labels and every 50th image, hashed."""
    digest = hashlib.sha256(labels.numpy().tobytes())
    digest.update(images[::50].contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def model_log(name: str) -> Callable[[str], None]:
    """A progress message logger prefixed with the model's name (worker processes interleave lines)."""
    return lambda line: _log.info(f"[{name}] {line}")


def weights_path(name: str, recipe: Recipe, seed: int, train_images: torch.Tensor, train_labels: torch.Tensor,
                 cache_dir: Path | str) -> Path:
    """Where the weights cache keeps study model `name` trained with `recipe` and `seed` on this data."""
    key = weights_key(name, recipe, seed, data_fingerprint(train_images, train_labels))
    return Path(cache_dir) / "weights" / f"{name}-{key}.npz"


def trained_model(name: str, train_images: torch.Tensor, train_labels: torch.Tensor, cache_dir: Path | str,
                  seed: int = 0, *, recipe: Recipe = Recipe(), device: str = "cpu",
                  log: Callable[[str], None] | None = None) -> Trained:
    """Study model `name` trained with `recipe`, from the weights cache when the same run was done before.

    Every command reaches trained weights through here, and `train` runs on the recipe's thread
    count, which the cache key holds: the same seed and recipe give the same weights from any
    command. A killed run's temporary weight files are removed before a new one is written.
    `log` (default: print with a "[name]" prefix) receives the progress lines.
    """
    log = log or model_log(name)
    torch.manual_seed(seed)
    model = MODELS[name]()
    path = weights_path(name, recipe, seed, train_images, train_labels, cache_dir)
    losses = load_weights(model, path)
    if losses is not None:
        log(f"trained weights loaded from cache {path}")
        return Trained(model.to(device), losses, True)
    model = model.to(device)
    losses = train(model, normalize(train_images).to(device), train_labels.to(device), recipe, seed, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    save_weights(model, losses, path)
    return Trained(model, losses, False)


def float_model(model: str, data: Dataset, cache_dir: Path | str, *, seed: int = 0,
                arch: str = "Net") -> tuple[str, torch.nn.Module]:
    """(name, float model) for a study model's name (Net, NetWithBias: trained with the study's recipe
    on `data`, or loaded from the cache) or the path of a checkpoint written by `intq train` of
    architecture `arch` (named by the file's stem)."""
    if model not in MODELS:
        return Path(model).stem, load_checkpoint(Path(model), arch)
    return model, trained_model(model, data.train_images, data.train_labels, cache_dir, seed).model


def calibration_indices(count: int, samples: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of `samples` training images (all of them, in order, when None)."""
    if samples is None or samples >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:samples]


def calibration_images(images: torch.Tensor, samples: int | None, seed: int) -> torch.Tensor:
    """The uint8 `images` that calibration_indices picks."""
    return images[calibration_indices(len(images), samples, seed)]


def capture_graph(model: torch.nn.Module, pixels: torch.Tensor, device: str = "cpu",
                  preprocessing: Preprocessing = STUDY_PREPROCESSING) -> Graph:
    """capture(model), its graph checked against the model on the first two uint8 `pixels`,
    preprocessed as the model expects (eq. 25)."""
    return capture(model, pixels[:2].to(device), preprocessing)


def statistics(graph: Graph, pixels: torch.Tensor, device: str = "cpu") -> dict[str, TensorStats]:
    """One streaming pass over uint8 `pixels`, preprocessed batch by batch with the graph's
    preprocessing (collect_statistics)."""
    starts = progress(range(0, len(pixels), CALIBRATION_BATCH), "calibrating")
    batches = (pixels[start : start + CALIBRATION_BATCH].to(device) for start in starts)
    return collect_statistics(graph, batches)


def calibrated(model: torch.nn.Module, pixels: torch.Tensor, *, device: str = "cpu",
               example: torch.Tensor | None = None, preprocessing: Preprocessing = STUDY_PREPROCESSING,
               equalization: bool = False) -> Calibrated:
    """Capture `model` and observe it on the uint8 calibration `pixels` under `preprocessing` (the
    float input the model expects). The capture is checked on the first two of `example` (default:
    of `pixels`). With `equalization`, the captured graph is equalized (eq. 36) before it is observed:
    it then serves the configs with equalization on, and only those."""
    graph = capture_graph(model, pixels if example is None else example, device, preprocessing)
    graph = equalize(graph) if equalization else graph
    return Calibrated(graph, statistics(graph, pixels, device))


def quantize_model(model: torch.nn.Module, pixels: torch.Tensor, config: QConfig, *, device: str = "cpu",
                   metadata: dict | None = None, example: torch.Tensor | None = None,
                   preprocessing: Preprocessing = STUDY_PREPROCESSING) -> Quantized:
    """model -> graph -> statistics on the uint8 calibration `pixels` -> IntegerModel under `config`; a
    learned rounding (config.rounding) learns on the first images of `pixels` (ptq.reconstruction)."""
    calibration = calibrated(model, pixels, device=device, example=example, preprocessing=preprocessing,
                             equalization=config.equalization)
    integer, learned = calibration.rounded_model(config, pixels, metadata, device)
    return Quantized(calibration.graph, calibration.stats, integer, learned)


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
