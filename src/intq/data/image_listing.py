"""Listing a user's image folder: which of three layouts it has, its class names (sorted, as
torchvision's ImageFolder orders them), every image path with its label, and a fingerprint for the
cache. Nothing is decoded here (image_folder.py does that).

Layouts, tried in this order:
  (a) `train/<class>/*` and `test/<class>/*`: test/ must hold the same class folders as train/;
  (b) `<class>/*` (no train/ or test/): every image is a training image, the test split is empty;
  (c) images directly in the folder, no subfolders: calibration only, one class "unlabelled".
Images are .png .jpg .jpeg .bmp .webp files (any case), sorted by name within a class; hidden
files and folders (a leading dot) are ignored.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from intq.data.dataset import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # compared lower-cased
UNLABELLED = "unlabelled"  # the one class of a flat folder of images
_SHOWN = 12  # names shown at most when a message lists class folders


@dataclass(frozen=True)
class ImageSplit:
    """One split's image paths in label order and the label of each."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ImageListing:
    """The images of a folder by split, its class names, and its fingerprint for the cache."""

    folder: Path
    classes: tuple[str, ...]
    train: ImageSplit
    test: ImageSplit
    fingerprint: str


class Fingerprint:
    """What a folder of images looks like without reading it: file count, total bytes, newest
    mtime and a SHA-256 of the ordered paths, so an added, removed, renamed, resized or rewritten
    file changes it. Example text: "images files=3 bytes=412 newest_mtime_ns=17... paths_sha256=9c..."."""

    def __init__(self) -> None:
        self.count, self.total, self.newest = 0, 0, 0
        self.names = hashlib.sha256()

    def add(self, paths: list[str], total: int, newest: int) -> None:
        """Count one class folder's images: their sorted paths, total bytes and newest mtime_ns."""
        self.names.update("\0".join(paths).encode("utf-8", "surrogateescape") + b"\0")
        self.count += len(paths)
        self.total += total
        self.newest = max(self.newest, newest)

    def text(self) -> str:
        """The fingerprint as one line, the form the cache key is built from."""
        return (f"images files={self.count} bytes={self.total} newest_mtime_ns={self.newest} "
                f"paths_sha256={self.names.hexdigest()}")


def scan_images(folder: Path, suffixes: tuple[str, ...]) -> tuple[list[str], int, int]:
    """Paths of the visible files of `folder` whose name ends in one of `suffixes` (any case),
    sorted by name, with their total bytes and newest mtime_ns; one stat each (~0.4 s for 60,000).
    Example: a/ holding 2.PNG, 1.jpg, .hidden.png, notes.txt -> ([a/1.jpg, a/2.PNG], bytes, mtime)."""
    try:
        entries = [entry for entry in os.scandir(folder) if not entry.name.startswith(".")
                   and entry.name.lower().endswith(suffixes) and entry.is_file()]
        stats = [entry.stat() for entry in entries]
    except OSError as err:
        raise DataError(f"cannot list {folder} ({err.strerror})") from None
    paths = sorted(entry.path for entry in entries)  # same folder, so sorts by file name
    total = sum(stat.st_size for stat in stats)
    return paths, total, max((stat.st_mtime_ns for stat in stats), default=0)


def subfolder_names(folder: Path) -> tuple[str, ...]:
    """Sorted names of the visible subfolders of `folder` (torchvision ImageFolder's class order)."""
    try:
        return tuple(sorted(entry.name for entry in os.scandir(folder)
                            if entry.is_dir() and not entry.name.startswith(".")))
    except OSError as err:
        raise DataError(f"cannot list {folder} ({err.strerror})") from None


def _class_images(class_dir: Path, fingerprint: Fingerprint) -> list[str]:
    """The images of one class folder, counted into `fingerprint`; none is a DataError."""
    paths, total, newest = scan_images(class_dir, IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"class folder {class_dir} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    fingerprint.add(paths, total, newest)
    return paths


def _split(folder: Path, classes: tuple[str, ...], fingerprint: Fingerprint) -> ImageSplit:
    """Every image of `folder/<class>/` for each class in order, labelled by the class's index."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_paths = _class_images(folder / name, fingerprint)
        paths += class_paths
        labels += [label] * len(class_paths)
    return ImageSplit(paths, labels)


def _class_names(folder: Path) -> tuple[str, ...]:
    """The class folders of `folder`, once it holds at least one and no loose images beside them."""
    classes = subfolder_names(folder)
    if not classes:
        raise DataError(f"{folder} holds no class folders")
    loose, _, _ = scan_images(folder, IMAGE_SUFFIXES)
    if loose:
        raise DataError(f"{folder} holds class folders and also loose images ({Path(loose[0]).name} ...); "
                        f"put every image in a class folder")
    return classes


def _class_difference(train: tuple[str, ...], test: tuple[str, ...]) -> str:
    """How test's class folder names differ from train's. Example: (a, b, c), (a, c, d) ->
    "missing ['b']; unexpected ['d']"."""
    missing = [name[:40] for name in train if name not in test][:_SHOWN]
    unexpected = [name[:40] for name in test if name not in train][:_SHOWN]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if unexpected:
        parts.append(f"unexpected {unexpected}")
    return "; ".join(parts)


def _train_test_listing(folder: Path) -> ImageListing:
    """Layout (a): train/<class>/ and test/<class>/ with the same class folders."""
    train_dir, test_dir = folder / "train", folder / "test"
    for split_dir in (train_dir, test_dir):
        if not split_dir.is_dir():
            raise DataError(f"image folder {folder} has {'test' if split_dir == train_dir else 'train'}/ "
                            f"but no {split_dir.name}/ folder; give both, or put the class folders "
                            f"directly in {folder}")
    classes, test_classes = _class_names(train_dir), _class_names(test_dir)
    if test_classes != classes:
        raise DataError(f"class folders of {test_dir} differ from those of {train_dir} "
                        f"({_class_difference(classes, test_classes)}); both must hold the same")
    fingerprint = Fingerprint()
    train = _split(train_dir, classes, fingerprint)
    test = _split(test_dir, classes, fingerprint)
    return ImageListing(folder, classes, train, test, fingerprint.text())


def _class_folder_listing(folder: Path) -> ImageListing:
    """Layout (b): <class>/ folders; all images train, the test split empty."""
    classes = _class_names(folder)
    fingerprint = Fingerprint()
    train = _split(folder, classes, fingerprint)
    return ImageListing(folder, classes, train, ImageSplit(), fingerprint.text())


def _flat_listing(folder: Path) -> ImageListing:
    """Layout (c): images directly in the folder, all of class 0, "unlabelled"; no test split."""
    fingerprint = Fingerprint()
    paths, total, newest = scan_images(folder, IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"image folder {folder} holds no images ({' '.join(IMAGE_SUFFIXES)}) "
                        f"and no class folders")
    fingerprint.add(paths, total, newest)
    return ImageListing(folder, (UNLABELLED,), ImageSplit(paths, [0] * len(paths)), ImageSplit(),
                        fingerprint.text())


def list_image_folder(folder: Path) -> ImageListing:
    """The listing of `folder` in whichever layout it has: (a) with train/ or test/, else (b) with
    subfolders, else (c). Example: a folder holding cat/1.png, dog/1.png, dog/2.png is (b):
    classes ("cat", "dog"), train labels [0, 1, 1], no test images."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} is not a folder" if folder.exists()
                        else f"image folder {folder}: no such folder")
    subfolders = subfolder_names(folder)
    if "train" in subfolders or "test" in subfolders:
        return _train_test_listing(folder)
    if subfolders:
        return _class_folder_listing(folder)
    return _flat_listing(folder)
