"""What a command works on: the data, the float model and the preprocessing that model expects.

    inputs = InputOptions(size=(28, 28), channels=1, preprocessing=Preprocessing((0.1307,), (0.3081,)))
    data = load_data("my_images/", cache_dir, inputs)                  # CIFAR-10, or the user's folder
    name, model = load_float_model("my_model.py:build", data, cache_dir, weights=Path("my.pt"))

The data is CIFAR-10 (any of its layouts, the study's default) or the user's own image folder (any
image size and channel count, `intq.data.image_folder`); the model a study model (Net, NetWithBias:
trained on the data with the study's recipe, or from the cache), a checkpoint of `intq train`, or the
user's model (`FILE.py:factory` or `module:attr`, with --weights). The preprocessing is declared
once, defaulting to the study's (p/255 - 0.5)/0.5, and said so.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing
from intq.cifar.data import CIFAR10_CLASSES, load_cifar10
from intq.cifar.models import MODELS
from intq.data.dataset import DataError, Dataset, Progress
from intq.data.image_folder import load_image_folder
from intq.graph.integer_model import IntegerModel
from intq.workflows.pipeline import CheckpointError, float_model
from intq.workflows.user_model import UserModelError, load_user_model, parse_model_spec

CIFAR_SIDE = 32
CIFAR_MARKERS = ("cifar-10-batches-py", "cifar-10-python.tar.gz", "data_batch_1")  # CIFAR-10's own layouts
CIFAR_LOOKALIKE = 5  # class folders sharing this many of CIFAR-10's names are CIFAR-10, held to its rules


@dataclass(frozen=True)
class InputOptions:
    """--size (height, width) and --channels the images are converted to, and --mean/--std."""

    size: tuple[int, int] | None = None
    channels: int | None = None
    preprocessing: Preprocessing | None = None  # None: the study's default, STUDY_PREPROCESSING

    @property
    def declared(self) -> Preprocessing:
        return self.preprocessing or STUDY_PREPROCESSING

    def describe(self) -> str:
        note = "" if self.preprocessing else " (the default; --mean/--std to change)"
        return f"{self.declared.describe()}{note}"


def _is_user_model(model: str) -> bool:
    """FILE.py:factory or module:attr: a ':' in it, and not a study model or an intq checkpoint (.npz)."""
    return model not in MODELS and ":" in model and not model.endswith(".npz")


def model_name(model: str) -> str:
    """A file-name-safe name: 'nets/small.py:build' -> 'small.build'; a checkpoint's stem; a study model's name."""
    if _is_user_model(model):
        source, _, attribute = model.rpartition(":")
        source = Path(source).stem if source.endswith(".py") else source
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{source}.{attribute}")[:80]
    return model if model in MODELS else Path(model).stem


def load_float_model(model: str, data: Dataset, cache_dir: Path | str, *, seed: int = 0, arch: str = "Net",
                     weights: Path | None = None) -> tuple[str, torch.nn.Module]:
    """(name, float model in eval mode) for a study model, an `intq train` checkpoint of `arch`, or a
    user's FILE.py:factory / module:attr with `weights`. --weights with a study model or a checkpoint
    is refused (their weights are their own)."""
    if _is_user_model(model):
        return model_name(model), load_user_model(model, weights)
    check_not_user_weights(model, weights)
    name, module = float_model(model, data, cache_dir, seed=seed, arch=arch)
    return name, module.eval()


def check_model_files(model: str, weights: Path | None) -> None:
    """Before any data is read: a model file, checkpoint or weights file that does not exist is one
    line (UserModelError or CheckpointError), and --weights belongs to a model file."""
    if _is_user_model(model):
        spec = parse_model_spec(model)
        if spec.path is not None and not spec.path.is_file():
            raise UserModelError(f"--model: no such file: {spec.path}")
        if weights is not None and not Path(weights).is_file():
            raise UserModelError(f"--weights: no such file: {weights}")
        return
    check_not_user_weights(model, weights)
    if model not in MODELS and not Path(model).is_file():
        raise CheckpointError(f"{model} is not a file" if Path(model).exists() else f"no such file: {model}")


def check_not_user_weights(model: str, weights: Path | None) -> None:
    if weights is not None:
        raise CheckpointError(f"--weights {weights}: only with a model file (--model FILE.py:factory or module:attr); "
                              f"{model} brings its own weights")


def _looks_like_cifar(folder: Path) -> bool:
    """A folder CIFAR-10's loader should judge: one of its own layouts, or class folders that share at
    least CIFAR_LOOKALIKE of its ten names (a renamed class must be refused, not relabelled)."""
    if any((folder / marker).exists() for marker in CIFAR_MARKERS):
        return True
    names = set()
    for split in (folder / "train", folder):
        try:
            names |= {entry.name.lower() for entry in os.scandir(split) if entry.is_dir()}
        except OSError:
            continue
    return len(names & set(CIFAR10_CLASSES)) >= CIFAR_LOOKALIKE


def load_data(data_dir: str | Path | None, cache_dir: Path | str, inputs: InputOptions = InputOptions(), *,
              download: bool = False, progress: Progress | None = None) -> Dataset:
    """The dataset of --data: CIFAR-10 when the folder is CIFAR-10 (or ./data by default) and no other
    size or channel count than its 3x32x32 is asked for; otherwise the user's image folder, converted
    and resized as asked."""
    if inputs.size in (None, (CIFAR_SIDE, CIFAR_SIDE)) and inputs.channels in (None, 3):  # CIFAR-10's own shape
        try:
            return load_cifar10(data_dir, cache_dir, download, progress)
        except DataError:
            if data_dir is None or not Path(data_dir).is_dir() or _looks_like_cifar(Path(data_dir)):
                raise
    if data_dir is None:
        raise DataError("--size/--channels need --data DIR, an image folder")
    return load_image_folder(Path(data_dir), size=inputs.size, channels=inputs.channels, cache_dir=Path(cache_dir),
                             progress=progress)


def inputs_for(model: IntegerModel, inputs: InputOptions) -> InputOptions:
    """The data options that give images of the integer model's shape: --size and --channels where
    given, else the model's own size and channel count."""
    channels, height, width = model.input.shape
    return InputOptions(inputs.size or (height, width), inputs.channels or channels, inputs.preprocessing)


def check_data_fits(data: Dataset, model: IntegerModel, split: str = "test") -> torch.Tensor:
    """The split's uint8 images, once their (C, H, W) is the model's; DataError naming both otherwise."""
    images = getattr(data, f"{split}_images")
    if tuple(images.shape[1:]) != tuple(model.input.shape):
        raise DataError(f"{data.source}: images are {tuple(images.shape[1:])} (C, H, W), the model takes "
                        f"{tuple(model.input.shape)}; pass --size H W and --channels C")
    if len(images) == 0:
        raise DataError(f"{data.source}: no {split} images (a {split}/ folder of class folders is needed here)")
    return images
