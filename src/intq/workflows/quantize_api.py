"""intq.quantize: a float model and calibration data in, an IntegerModel out, in one call.

    int_model = intq.quantize(model, loader, input={"mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.243, 0.261)})

It runs the four public steps (capture, collect_statistics, convert; run_integer then executes
the result) on whatever form the calibration images come in: a tensor or NumPy array, an iterable
or DataLoader of batches, a torch Dataset of single images, or an image folder. Every form becomes
one lazy stream of checked (N, C, H, W) batches of at most CHUNK images; float images are checked
against the declared preprocessing, never trusted. Every problem is one line.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset as TorchDataset

from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing, PreprocessingError
from intq.graph.capture import capture
from intq.graph.config import PRESETS, QConfig
from intq.graph.convert import collect_statistics
from intq.graph.integer_model import IntegerModel
from intq.ptq.equalization import equalize
from intq.ptq.reconstruction import learned_integer_model

CHUNK = 256  # images per calibration batch: larger batches are sliced, Dataset items stacked
PROGRESS_INTERVAL = 0.1  # seconds between two updates of the progress line
DEFAULT_INPUT = "input=None declares the default, the study's (p/255 - 0.5)/0.5"
IMAGE_TYPES = "accepted: uint8 pixels or float32 images"
ACCEPTED = (f"{IMAGE_TYPES} (N, C, H, W) as a torch tensor or NumPy array, an "
            "iterable or DataLoader of such batches or of (images, labels) pairs, a torch Dataset of (C, H, W) "
            "images or (image, label) pairs, or an image folder path")


class QuantizeError(ValueError):
    """An argument of intq.quantize that cannot be used; the message is one line naming it."""


class DataInputError(QuantizeError):
    """Calibration data that cannot be used: one line naming what was given and what is accepted."""


def quantize(model: nn.Module, data, *, input: Preprocessing | dict | tuple | None = None,
             config: QConfig | str = "recommended", example=None, max_images: int | None = None,
             progress: bool | None = None, metadata: dict | None = None) -> IntegerModel:
    """The IntegerModel of float `model`, calibrated on `data`: capture, collect_statistics, convert.

    `input` is the preprocessing the float model expects of uint8 pixels p, x = (p/255 - mean)/std per
    channel: a Preprocessing, {"mean": ..., "std": ...} or a (mean, std) pair; None declares the
    default, the study's (p/255 - 0.5)/0.5. `data` is any form ACCEPTED names; uint8 pixels are
    preprocessed with `input`, float32 images must be what `input` makes of pixels (else
    DataInputError). `config` is a QConfig or a preset name (PRESETS); its `equalization` equalizes the
    captured graph before calibration, its `bias_correction` corrects the biases in convert. The capture
    is checked on `example` (default: the first two calibration images). `max_images` stops after the
    first that many images. A learned rounding (config.rounding) learns on the first config.rounding.images of
    them (ptq.reconstruction). `progress` False hides the stderr line "calibrating: 3,000 images", shown only on a
    terminal. The model's metadata holds {"api": "intq.quantize", "calibration_images": N} and `metadata`.
    Example: quantize(model, torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)) calibrates
    on 100 images under the default input and the recommended preset."""
    preprocessing = declared_input(input)
    qconfig = preset(config)
    line = ProgressLine.on_terminal(progress)
    calibration = CalibrationStream(_image_limit(max_images), line)
    kept = KeptImages(qconfig.rounding.images if qconfig.rounding.learned else 0, preprocessing)
    batches = kept.stream(calibration.stream(image_batches(data, preprocessing, input is None, line)))
    try:
        first = next(batches, None)  # a generator is read once: the first batch is chained back below
        if first is None:
            raise DataInputError(f"no images in the data: {describe(data)} holds none")
        example = first[:2] if example is None else _example_tensor(example)
        graph = capture(model, example, preprocessing)
        graph = equalize(graph) if qconfig.equalization else graph
        stats = collect_statistics(graph, itertools.chain([first], batches))
    finally:
        line.close()
    extra = {**(metadata or {}), "api": "intq.quantize", "calibration_images": calibration.images}
    return learned_integer_model(graph, stats, qconfig, kept.images(), extra)[0]


def declared_input(input: Preprocessing | dict | tuple | list | None) -> Preprocessing:
    """The Preprocessing `input` declares; QuantizeError (one line) for anything else.
    Examples: None -> the study's mean 0.5, std 0.5; {"mean": 0.5, "std": 0.25} and (0.5, 0.25) ->
    mean 0.5, std 0.25 for every channel; {"mean": 0.5} -> QuantizeError naming the missing "std"."""
    if input is None:
        return STUDY_PREPROCESSING
    if isinstance(input, Preprocessing):
        return input
    if isinstance(input, dict) and set(input) == {"mean", "std"}:
        mean, std = input["mean"], input["std"]
    elif isinstance(input, (tuple, list)) and len(input) == 2:
        mean, std = input
    else:
        raise QuantizeError(f"input must be a Preprocessing, {{'mean': ..., 'std': ...}} or a (mean, std) pair "
                            f"({DEFAULT_INPUT}), got {_shown(input)}")
    try:
        return Preprocessing(mean, std)
    except PreprocessingError as err:
        raise QuantizeError(f"input: {err}") from None


def preset(config: QConfig | str) -> QConfig:
    """`config` itself, or the preset it names. Example: "x86" -> X86; "fast" -> QuantizeError
    listing study, recommended, x86."""
    if isinstance(config, QConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    raise QuantizeError(f"config {_shown(config)} is not a preset name ({', '.join(PRESETS)}) nor a QConfig")


def _image_limit(max_images: int | None) -> int | None:
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise QuantizeError(f"max_images must be a whole number of at least 1 (or None: every image), "
                            f"got {_shown(max_images)}")
    return max_images


def _example_tensor(example) -> torch.Tensor:
    tensor = _as_tensor(example, "example")
    if tensor.dim() != 4:
        raise DataInputError(f"example is {describe(example)}; it must be images (N, C, H, W)")
    return tensor


def _shown(value) -> str:
    return _clipped(repr(value))


def _clipped(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value) -> str:
    """What a value is, for one-line messages. Examples: 'torch.Tensor uint8 (3, 32, 32)',
    'numpy.ndarray float64 (2, 32, 32, 3)', 'list of 0 items', "str 'cat.png'", 'dict with keys image, label'."""
    if isinstance(value, torch.Tensor):
        return f"torch.Tensor {str(value.dtype).replace('torch.', '')} {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"numpy.ndarray {value.dtype} {value.shape}"
    if isinstance(value, (str, bytes, os.PathLike)):
        return f"{type(value).__name__} {_shown(value)}"
    if isinstance(value, dict):
        return f"dict with keys {_clipped(', '.join(str(key) for key in value))}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__


# ------------------------------------------------------------------------------- data -> batches

def image_batches(data, preprocessing: Preprocessing, default_input: bool = False,
                  line: ProgressLine | None = None) -> Iterator[torch.Tensor]:
    """Every accepted form of `data` as one lazy stream of checked batches (N <= CHUNK, C, H, W).

    Rules: uint8 or float32 only; batches 4-D (a 3-D batch is refused: one image is x.unsqueeze(0)),
    Dataset items 3-D (single images, stacked CHUNK at a time); NumPy's channels-last layout is not
    guessed; every image has the first one's (C, H, W); C fits the preprocessing; float images are
    whole pixels in 0..255 under it. `default_input` adds DEFAULT_INPUT to the float data's refusal.
    Example: a DataLoader of ((64, 3, 32, 32) uint8, labels) pairs gives its (64, 3, 32, 32) images."""
    first_shape, first_where = None, ""
    for where, batch in _located_batches(data, line):
        if len(batch) == 0:
            continue
        shape = tuple(batch.shape[1:])
        if first_shape is None:
            first_shape, first_where = shape, where
            _check_channels(preprocessing, shape, where)
        elif shape != first_shape:
            raise mixed_shapes(where, shape, first_where, first_shape)
        for start in range(0, len(batch), CHUNK):
            chunk = batch[start : start + CHUNK]
            if chunk.is_floating_point():  # checked a chunk at a time: the check copies what it checks
                _check_float_images(chunk, where, preprocessing, default_input)
            yield chunk


def _located_batches(data, line: ProgressLine | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(where, 4-D tensor) for each batch `data` holds, `where` naming it in messages."""
    if isinstance(data, (str, os.PathLike)):
        yield f"image folder {data}", _folder_images(data, line)
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        yield "data", _as_batch(data, "data", dims=4)
    elif isinstance(data, TorchDataset):
        yield from _dataset_batches(data)
    elif isinstance(data, Iterable) and not isinstance(data, (bytes, dict)):
        for index, item in enumerate(data, 1):
            yield f"batch {index}", _as_batch(item, f"batch {index}", dims=4)
    else:
        raise DataInputError(f"data is {describe(data)}; {ACCEPTED}")


def _dataset_batches(dataset: TorchDataset) -> Iterator[tuple[str, torch.Tensor]]:
    """A Dataset's single images (C, H, W), or the first element of (image, label) items, stacked
    into (CHUNK, C, H, W) batches. Example: 600 items give batches of 256, 256 and 88 images."""
    try:
        items = (dataset[index] for index in range(len(dataset)))
    except TypeError:  # no len(): an IterableDataset, or a map-style one without __len__
        items = iter(dataset)
    images, first_shape = [], None
    for index, item in enumerate(items):
        where = f"dataset item {index}"
        image = _as_batch(item, where, dims=3)
        if first_shape is None:
            first_shape = tuple(image.shape)
        elif tuple(image.shape) != first_shape:
            raise mixed_shapes(where, tuple(image.shape), "dataset item 0", first_shape)
        images.append(image)
        if len(images) == CHUNK:
            yield f"dataset items {index + 1 - CHUNK} to {index}", torch.stack(images)  # CHUNK x (C, H, W)
            images = []
    if images:
        yield f"dataset items {index + 1 - len(images)} to {index}", torch.stack(images)


def _folder_images(folder: str | os.PathLike, line: ProgressLine | None) -> torch.Tensor:
    """Every train image of the image folder, uint8 (N, C, H, W); its DataError as a DataInputError."""
    from intq.data.dataset import DataError
    from intq.data.image_folder import load_image_folder

    try:
        return load_image_folder(folder, progress=line.message if line else None).train_images
    except DataError as err:
        raise DataInputError(str(err)) from None


def _as_tensor(value, where: str) -> torch.Tensor:
    """A tensor, or a NumPy array of uint8 or float32 as one; anything else is refused naming its type."""
    if isinstance(value, np.ndarray):
        if value.dtype not in (np.uint8, np.float32):
            raise DataInputError(f"{where} is {describe(value)}; {IMAGE_TYPES} (e.g. x.astype(np.float32))")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        raise DataInputError(f"{where} is a {describe(value)}: pass the images themselves, e.g. "
                             f"(batch['image'] for batch in loader); {ACCEPTED}")
    raise DataInputError(f"{where} is {describe(value)}; {ACCEPTED}")


def _as_batch(value, where: str, *, dims: int) -> torch.Tensor:
    """`value` as a uint8 or float32 tensor of `dims` dimensions: 4 for a batch, 3 for a Dataset item;
    of a tuple or list, its first element (the images of an (images, labels) pair).
    Example: a (3, 32, 32) tensor as a batch -> DataInputError suggesting x.unsqueeze(0)."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    tensor = _as_tensor(value, where)
    _check_channels_first(tuple(tensor.shape), where, describe(value))
    if dims == 4 and tensor.dim() == 3:
        raise DataInputError(f"{where} is {describe(value)}, one image, not a batch (N, C, H, W): "
                             f"pass x.unsqueeze(0) for one image")
    if tensor.dim() != dims or tensor.dtype not in (torch.uint8, torch.float32):
        layout = "(N, C, H, W)" if dims == 4 else "(C, H, W), one image per item"
        raise DataInputError(f"{where} is {describe(value)}; {IMAGE_TYPES} {layout}")
    return tensor


def _check_channels_first(shape: tuple[int, ...], where: str, given: str) -> None:
    """Refuse the channels-last layout rather than guess it: the last axis holds 1 or 3 values and
    the channel axis does not. Example: (10, 32, 32, 3) is refused; (10, 3, 32, 32) and
    (10, 3, 32, 3) are channels-first."""
    if len(shape) in (3, 4) and shape[-1] in (1, 3) and shape[-3] not in (1, 3):
        order, axes = ("(N, H, W, C)", "(0, 3, 1, 2)") if len(shape) == 4 else ("(H, W, C)", "(2, 0, 1)")
        raise DataInputError(f"{where} is {given}, channels-last {order}; intq does not guess the layout: "
                             f"give channels-first {order.replace('H, W, C', 'C, H, W')}, e.g. "
                             f"x.transpose{axes} for NumPy or x.permute{axes} for torch")


def _check_channels(preprocessing: Preprocessing, shape: tuple[int, ...], where: str) -> None:
    try:
        preprocessing.for_channels(shape[0])
    except PreprocessingError as err:
        raise DataInputError(f"{where}: {err}") from None


def _check_float_images(batch: torch.Tensor, where: str, preprocessing: Preprocessing, default_input: bool) -> None:
    """Float images must be what the declared preprocessing makes of uint8 pixels (check_batch)."""
    try:
        preprocessing.check_batch(batch, where)
    except PreprocessingError as err:
        hint = (f"; {DEFAULT_INPUT}: declare the model's own with input={{'mean': ..., 'std': ...}}"
                if default_input else "; are these images normalised with the declared mean and std?")
        raise DataInputError(f"{err}{hint}") from None


def mixed_shapes(where: str, shape: tuple, first_where: str, first_shape: tuple) -> DataInputError:
    """The one-line error for images of two shapes: 'batch 2 has images (C, H, W) = (3, 28, 28), batch 1 ...'."""
    return DataInputError(f"{where} has images (C, H, W) = {shape}, {first_where} has {first_shape}: "
                          f"every calibration image must have one shape")


# ---------------------------------------------------------------------------- counting, progress

@dataclass
class ProgressLine:
    """'calibrating: 3,000 images' on a terminal's stderr, rewritten in place with '\\r' at most
    every PROGRESS_INTERVAL seconds and once more, with the final count, on close; `stream` None
    prints nothing (stderr is not a terminal, or progress was turned off)."""

    stream: TextIO | None
    count: int | None = None  # the images last reported; None before the first report
    shown_at: float = field(default=-1.0)

    @classmethod
    def on_terminal(cls, progress: bool | None) -> "ProgressLine":
        """On when `progress` is not False and stderr is a terminal (None: auto; True asks for it)."""
        shown = progress is not False and sys.stderr.isatty()
        return cls(sys.stderr if shown else None)

    def __bool__(self) -> bool:
        return self.stream is not None

    def images(self, count: int) -> None:
        self.count = count
        now = time.monotonic()
        if now - self.shown_at >= PROGRESS_INTERVAL:
            self._write(f"\rcalibrating: {count:,} images")
            self.shown_at = now

    def message(self, text: str) -> None:
        """A line of its own (the image folder's loading messages)."""
        self._write(f"{text}\n")

    def close(self) -> None:
        if self.count is not None:
            self._write(f"\rcalibrating: {self.count:,} images\n")
            self.count, self.shown_at = None, -1.0

    def _write(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()


@dataclass
class CalibrationStream:
    """Counts the images it passes on, stops after `limit` (None: all) and reports to `line`.
    Example: limit 300 over batches of 256 passes 256, then the first 44 of the next, then stops
    without asking the source for more."""

    limit: int | None
    line: ProgressLine
    images: int = 0

    def stream(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for batch in batches:
            if self.limit is not None:
                batch = batch[: self.limit - self.images]
            self.images += len(batch)
            self.line.images(self.images)
            yield batch
            if self.limit is not None and self.images >= self.limit:
                return


@dataclass
class KeptImages:
    """Keeps the first `limit` images of the batches it passes on, as the float32 images the model
    reads (uint8 pixels preprocessed), for a learned rounding; `limit` 0 keeps none."""

    limit: int
    preprocessing: Preprocessing
    kept: list = field(default_factory=list)
    count: int = 0

    def stream(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for batch in batches:
            if self.count < self.limit:
                part = batch[: self.limit - self.count]
                self.kept.append(self.preprocessing.apply(part) if part.dtype == torch.uint8 else part.clone())
                self.count += len(part)
            yield batch

    def images(self) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.empty(0)
