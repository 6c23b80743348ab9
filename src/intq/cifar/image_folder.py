"""Layout (c), an image folder: `train/<class>/*.png|jpg|jpeg` and `test/<class>/...`, each split
holding exactly CIFAR-10's ten class folders (label = the index of the folder's name in
CIFAR10_CLASSES, images sorted by file name within a class), listed with a fingerprint for the
cache and decoded across worker processes."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from intq.extras import require
from intq.cifar.dataset import CIFAR10_CLASSES, IMAGE_SIDE, DataError, Dataset, Progress, data_error
from intq.data.image_listing import Fingerprint, scan_images, subfolder_names

IMAGE_FOLDER = "image folder"  # the layout's name in Dataset.source and messages
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared lower-cased
_WORKERS = 2
_CHUNK = 1000  # images per worker task: 3 MB back per task, progress about every 0.3 s


@dataclass(frozen=True)
class ImageListing:
    """The files of a train/<class>/, test/<class>/ folder, in label order, and their fingerprint."""

    folder: Path
    classes: tuple[str, ...]
    train: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]
    fingerprint: str


def _listed(list_folder: Callable, folder: Path, *args) -> object:
    """`list_folder(folder, *args)`, whose one-line DataError (a folder that cannot be listed)
    gains CIFAR-10's hint on pointing intq at the data."""
    try:
        return list_folder(folder, *args)
    except DataError as err:
        raise data_error(str(err)) from None


def _class_folder_problem(names: tuple[str, ...]) -> str | None:
    """What is wrong with a split's class folder names, or None when they are exactly CIFAR-10's ten.

    The rule is by name, not by count: a label is the index of its folder's name in
    CIFAR10_CLASSES, so a renamed folder would shift every later label. Example:
    ("airplane", ..., "Cat", ...) -> "missing ['cat']; unexpected ['Cat']".
    """
    missing = [name for name in CIFAR10_CLASSES if name not in names]
    unexpected = [name[:40] for name in names if name not in CIFAR10_CLASSES][:12]  # shown, capped
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if unexpected:
        parts.append(f"unexpected {unexpected}")
    return "; ".join(parts) or None


def _class_names(folder: Path) -> tuple[str, ...]:
    """CIFAR10_CLASSES, once train/ and test/ each hold exactly those ten class folders."""
    for split in ("train", "test"):
        problem = _class_folder_problem(_listed(subfolder_names, folder / split))
        if problem is not None:
            raise data_error(f"class folders in {folder / split} are not CIFAR-10's ten ({problem}); "
                        f"train/ and test/ must each hold exactly {', '.join(CIFAR10_CLASSES)}")
    return CIFAR10_CLASSES


def _scan_class(class_dir: Path, fingerprint: Fingerprint) -> list[str]:
    """Paths of the visible .png/.jpg/.jpeg files in a class folder sorted by name, counted into
    `fingerprint`; a class folder without any is a DataError naming it."""
    paths, total, newest = _listed(scan_images, class_dir, _IMAGE_SUFFIXES)
    if not paths:
        raise data_error(f"class folder {class_dir} holds no .png/.jpg/.jpeg images")
    fingerprint.add(paths, total, newest)
    return paths


def scan_image_folder(folder: Path) -> ImageListing:
    """List every image (one stat each, ~0.4 s for 60,000) and fingerprint the whole folder.

    Fingerprint: file count, total bytes, newest mtime and a hash of the ordered paths, so an
    added, removed, renamed, resized or rewritten file invalidates the cache.
    """
    classes = _class_names(folder)
    fingerprint = Fingerprint()
    splits = {}
    for split in ("train", "test"):
        paths, labels = [], []
        for label, name in enumerate(classes):
            class_paths = _scan_class(folder / split / name, fingerprint)
            paths += class_paths
            labels += [label] * len(class_paths)
        splits[split] = (paths, labels)
    return ImageListing(folder, classes, splits["train"], splits["test"], fingerprint.text())


def _read_image(path: str) -> np.ndarray:
    """One 32x32 image as uint8 (H, W, 3) RGB; wrong size or undecodable file names the file."""
    from PIL import Image  # decode_image_folder checked it is installed

    try:
        with Image.open(path) as image:
            if image.size != (IMAGE_SIDE, IMAGE_SIDE):
                width, height = image.size
                raise data_error(f"image {path} is {width}x{height}, but CIFAR-10 images are 32x32")
            return np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except Exception as err:  # a damaged image can fail in many ways; all mean "unreadable"
        raise data_error(f"cannot read image {path} ({type(err).__name__}: {err})") from None


def _decode_chunk(paths: list[str]) -> np.ndarray:
    """Runs in a worker process: decode `paths` into one uint8 (n, 3, 32, 32) array."""
    hwc = np.empty((len(paths), IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        hwc[index] = _read_image(path)
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))  # (n, H, W, C) -> (n, C, H, W)


def _decode_split(pool: ProcessPoolExecutor, paths: list[str], split: str,
                  report: Progress) -> np.ndarray:
    """Decode one split in chunks of _CHUNK files across the pool, reporting after each chunk."""
    images = np.empty((len(paths), 3, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    starts = range(0, len(paths), _CHUNK)
    chunks = [paths[start:start + _CHUNK] for start in starts]
    for start, block in zip(starts, pool.map(_decode_chunk, chunks)):
        images[start:start + len(block)] = block
        report(f"decoding {split}: {start + len(block)}/{len(paths)}")
    return images


def decode_image_folder(listing: ImageListing, report: Progress) -> Dataset:
    """Decode every image of the listing with _WORKERS processes (PIL decoding is CPU-bound)."""
    require("PIL.Image", "reading an image folder")
    pool = ProcessPoolExecutor(max_workers=_WORKERS)
    try:
        train_images = _decode_split(pool, listing.train[0], "train", report)
        test_images = _decode_split(pool, listing.test[0], "test", report)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on error, skip the chunks still queued
    return Dataset(
        train_images=torch.from_numpy(train_images),
        train_labels=torch.tensor(listing.train[1], dtype=torch.int64),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.tensor(listing.test[1], dtype=torch.int64),
        classes=listing.classes,
        source=f"{IMAGE_FOLDER} {listing.folder}",
    )
