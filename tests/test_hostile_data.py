"""Hostile data and calibration input (issue 10): each crafted or broken input gets one clear line.

Data folder cases go through the real CLI (`intq run` stops at the data, before any training);
cache cases succeed, and their outcome is the one progress line saying the cache was rebuilt;
calibration cases call collect_statistics, since every command normalises its own batches.
"""
from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import make_pixels, write_image_folder
from hostile import Hostile, run_cli
from intq.graph.capture import capture
from intq.graph.convert import ConversionError, collect_statistics
from intq.cifar.data import load_cifar10, normalize
from intq.cifar.models import Net
from test_data import make_batches_folder, py2_meta_pickle

CASES = [
    Hostile("renamed-class-folders", "3 of 10 train class folders renamed (cat -> Cat, dog -> doggo, frog -> zfrog)",
            "missing ['cat', 'dog', 'frog']; unexpected ['Cat', 'doggo', 'zfrog']"),
    Hostile("missing-class-folders", "test/ lacks the ship and truck folders",
            "are not CIFAR-10's ten (missing ['ship', 'truck'])"),
    Hostile("extra-class-folder", "test/ holds an eleventh folder, dogs",
            "are not CIFAR-10's ten (unexpected ['dogs'])"),
    Hostile("batches-meta-other-classes", "batches.meta names three other classes",
            "lists the classes [plane, car, bird], not CIFAR-10's ten"),
    Hostile("data-folder-typo", "--data names a folder that does not exist (must not create it or download)",
            "no such folder"),
    Hostile("data-folder-empty", "--data names an existing empty folder (must not download into it)",
            "is empty"),
    Hostile("cache-array-altered", "one byte of the cached test images flipped, file still a valid .npy",
            "test_images.npy does not match the SHA-256 recorded in meta.json), rebuilding"),
    Hostile("cache-array-truncated", "the cached training labels cut short by 8 bytes", "corrupt (ValueError"),
    Hostile("cache-meta-not-json", "the cache's meta.json is not JSON", "corrupt (JSONDecodeError"),
    Hostile("cache-meta-deep-json", "the cache's meta.json nests 100,000 lists", "corrupt (RecursionError"),
    Hostile("calibration-mean-std", "calibration batches normalised with CIFAR-10's per-channel mean and std",
            "are pixels in [-126.2, 399.2] under the declared preprocessing (x = (p/255 - mean)/std, mean 0.5, "
            "std 0.5), outside 0..255"),
    Hostile("calibration-unit-range", "calibration batches scaled to [0, 1] (p / 255): inside [-1, 1], off the grid",
            "under the declared preprocessing (x = (p/255 - mean)/std, mean 0.5, std 0.5), not a whole pixel"),
    Hostile("calibration-nan", "a NaN in the second calibration batch", "calibration batch 2: holds NaN or Inf"),
    Hostile("calibration-wrong-rank", "a calibration batch of shape (3, 32, 32), no batch dimension",
            "expected uint8 pixels or float32 images of shape (N, C, H, W), got torch.float32 (3, 32, 32)"),
    Hostile("calibration-numpy", "a numpy array instead of a tensor", "got ndarray"),
    Hostile("calibration-channels", "one-channel batches for a three-channel model",
            "cannot run on a batch of shape (2, 1, 32, 32)"),
    Hostile("calibration-empty", "calibration batches holding no images", "calibration saw no images"),
    Hostile("calibration-layer-overflow", "finite weights x 1e20: a layer's float sums overflow to Inf",
            "tensor contains NaN or Inf"),
]


# ---- data folders, through `intq run` ---------------------------------------------------------

def _run_error(tmp_path: Path, data: Path) -> str:
    """The one error line of `intq run --data data`; asserts nothing was written to --out."""
    out = tmp_path / "out"
    result = run_cli(["run", "--data", data, "--out", out, "--cache", tmp_path / "cache"])
    assert result.code == 2
    assert not out.exists() or not any(out.iterdir())
    return result.err.strip()


def _image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data", train_per_class=1, test_per_class=1)


def _renamed_class_folders(tmp_path: Path) -> str:
    data = _image_folder(tmp_path)
    for old, new in (("cat", "Cat"), ("dog", "doggo"), ("frog", "zfrog")):
        (data / "train" / old).rename(data / "train" / new)
    return _run_error(tmp_path, data)


def _missing_class_folders(tmp_path: Path) -> str:
    data = _image_folder(tmp_path)
    for name in ("ship", "truck"):
        for image in (data / "test" / name).iterdir():
            image.unlink()
        (data / "test" / name).rmdir()
    return _run_error(tmp_path, data)


def _extra_class_folder(tmp_path: Path) -> str:
    data = _image_folder(tmp_path)
    (data / "test" / "dogs").mkdir()
    return _run_error(tmp_path, data)


def _batches_meta_other_classes(tmp_path: Path) -> str:
    make_batches_folder(tmp_path / "batches")
    (tmp_path / "batches" / "batches.meta").write_bytes(py2_meta_pickle([b"plane", b"car", b"bird"]))
    return _run_error(tmp_path, tmp_path / "batches")


def _data_folder_typo(tmp_path: Path) -> str:
    line = _run_error(tmp_path, tmp_path / "dtaa")
    assert not (tmp_path / "dtaa").exists()
    return line


def _data_folder_empty(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    line = _run_error(tmp_path, tmp_path / "empty")
    assert not any((tmp_path / "empty").iterdir())
    return line


# ---- the decoded-data cache -------------------------------------------------------------------

def _rebuilt_after(tmp_path: Path, damage: Callable[[Path], None]) -> str:
    """Load once, damage the cache folder, load again: the reload must equal the first load, and
    its one progress line about the cache is the outcome."""
    data = _image_folder(tmp_path)
    first = load_cifar10(data, tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    damage(folder)
    messages: list[str] = []
    second = load_cifar10(data, tmp_path / "cache", progress=messages.append)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_images, second.test_images)
    assert torch.equal(first.train_labels, second.train_labels)
    (line,) = [message for message in messages if message.startswith("cache ")]
    return line


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def _cache_array_altered(tmp_path: Path) -> str:
    return _rebuilt_after(tmp_path, lambda folder: _flip_last_byte(folder / "test_images.npy"))


def _cache_array_truncated(tmp_path: Path) -> str:
    def truncate(folder: Path) -> None:
        path = folder / "train_labels.npy"
        path.write_bytes(path.read_bytes()[:-8])

    return _rebuilt_after(tmp_path, truncate)


def _cache_meta_not_json(tmp_path: Path) -> str:
    return _rebuilt_after(tmp_path, lambda folder: (folder / "meta.json").write_text("{not json"))


def _cache_meta_deep_json(tmp_path: Path) -> str:
    return _rebuilt_after(tmp_path, lambda folder: (folder / "meta.json").write_text("[" * 100_000 + "]" * 100_000))


# ---- calibration batches ----------------------------------------------------------------------

def _calibration_error(batches: list, weight_factor: float = 1.0) -> str:
    """The ConversionError line of collect_statistics on `batches` for a seeded Net whose captured
    weights are multiplied by `weight_factor`."""
    torch.manual_seed(0)
    graph = capture(Net().eval(), normalize(make_pixels(2)))
    with torch.no_grad():
        for node in graph.weighted():
            node.op.weight.mul_(weight_factor)
    with pytest.raises(ConversionError) as caught:
        collect_statistics(graph, batches)
    return str(caught.value)


def _calibration_mean_std(tmp_path: Path) -> str:
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).reshape(1, 3, 1, 1)
    std = torch.tensor((0.247, 0.243, 0.261)).reshape(1, 3, 1, 1)
    return _calibration_error([(make_pixels(8).float() / 255 - mean) / std])


def _calibration_nan(tmp_path: Path) -> str:
    second = normalize(make_pixels(4, seed=1))
    second[2, 1, 0, 5] = float("nan")
    return _calibration_error([normalize(make_pixels(4)), second])


CALIBRATION = {
    "calibration-mean-std": _calibration_mean_std,
    "calibration-unit-range": lambda tmp_path: _calibration_error([make_pixels(8).float() / 255]),
    "calibration-nan": _calibration_nan,
    "calibration-wrong-rank": lambda tmp_path: _calibration_error([normalize(make_pixels(1))[0]]),
    "calibration-numpy": lambda tmp_path: _calibration_error([normalize(make_pixels(2)).numpy()]),
    "calibration-channels": lambda tmp_path: _calibration_error([torch.full((2, 1, 32, 32), -1.0)]),
    "calibration-empty": lambda tmp_path: _calibration_error([normalize(make_pixels(0))]),
    "calibration-layer-overflow": lambda tmp_path: _calibration_error([normalize(make_pixels(4))], 1e20),
}
BUILDERS = {
    "renamed-class-folders": _renamed_class_folders,
    "missing-class-folders": _missing_class_folders,
    "extra-class-folder": _extra_class_folder,
    "batches-meta-other-classes": _batches_meta_other_classes,
    "data-folder-typo": _data_folder_typo,
    "data-folder-empty": _data_folder_empty,
    "cache-array-altered": _cache_array_altered,
    "cache-array-truncated": _cache_array_truncated,
    "cache-meta-not-json": _cache_meta_not_json,
    "cache-meta-deep-json": _cache_meta_deep_json,
    **CALIBRATION,
}


def _no_network(*args, **kwargs):
    raise AssertionError("hostile data input must never start a download")


def test_every_case_has_a_builder():
    assert sorted(case.id for case in CASES) == sorted(BUILDERS)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_hostile_data_input_gets_one_clear_line(case, tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    line = BUILDERS[case.id](tmp_path)
    assert "\n" not in line
    assert case.expected in line, line
