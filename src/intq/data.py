"""CIFAR-10 as uint8 tensors, decoded once and cached as .npy files.

Three layouts are recognised inside the data folder (or one folder below it):

  (a) the standard download: `cifar-10-batches-py/` or the archive `cifar-10-python.tar.gz`
      (md5-checked, then extracted); with `download=True` the archive is fetched when absent, but
      only into the default ./data: a folder the caller names must exist (a typo is an error,
      never a new folder and a 170 MB download);
  (b) a folder holding `data_batch_1..5`, `test_batch`, `batches.meta` (Python pickles, read with
      a restricted unpickler that can only rebuild numpy arrays, so a hostile file cannot run code);
      batches.meta must list CIFAR-10's ten class names in order;
  (c) an image folder `train/<class>/*.png|jpg|jpeg` and `test/<class>/...`; train/ and test/ must
      each hold exactly CIFAR-10's ten class folders (`CIFAR10_CLASSES`, named as in the official
      download), label = index of the name in that list, images sorted by file name within a class.
      A renamed or missing class folder is refused: labels by position would silently reorder.

Decoded tensors go to `cache_dir` as .npy files plus `meta.json`, which records a SHA-256 of each
array; a later load of an unchanged source reads them back (numpy.load with allow_pickle=False),
checks every array against its recorded digest, and rebuilds the cache from the source when one
differs (altered, truncated, or meta.json unreadable), so a damaged cache is never used.
Every user-facing problem raises `DataError`, one line that names the path and says how to point
intq at the data. The library never prints; progress goes through the `progress` callback.
"""
from __future__ import annotations

import codecs
import enum
import hashlib
import importlib
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from intq.files import atomic_write, atomic_write_text, ensure_writable_dir, remove_stale_temporaries

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR_NAME = "cifar-10-batches-py"
# The ten classes in label order (the order of batches.meta; also alphabetical).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_BATCH_FILES = _TRAIN_BATCHES + ("test_batch", "batches.meta")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared lower-cased
_SIDE = 32
_WORKERS = 2
_CHUNK = 1000  # images per worker task: 3 MB back per task, progress about every 0.3 s
_CACHE_FORMAT = 2  # 2: meta.json records a SHA-256 per array
_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
_HINT = (
    "point intq at CIFAR-10 with --data DIR or the INTQ_DATA environment variable "
    "(accepted layouts: cifar-10-batches-py/, cifar-10-python.tar.gz, "
    "or train/<class>/*.png|jpg with test/<class>/*.png|jpg)"
)

Progress = Callable[[str], None]


class DataError(Exception):
    """A data folder or file that cannot be used; the message is one line naming the path."""


def _fail(message: str) -> DataError:
    """DataError whose single line is `message` followed by how to point intq at the data."""
    one_line = " ".join(message.split())
    return DataError(f"{one_line}; {_HINT}")


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """CIFAR-10 splits as uint8 images (N, 3, 32, 32) in CHW order and int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, _SIDE, _SIDE):
                raise DataError(f"{split} images must be uint8 (N, 3, 32, 32), "
                                f"got {images.dtype} {tuple(images.shape)} from {self.source}")
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise DataError(f"{split} labels must be int64 ({images.shape[0]},), "
                                f"got {labels.dtype} {tuple(labels.shape)} from {self.source}")
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.classes):
                raise DataError(f"{split} labels fall outside 0..{len(self.classes) - 1} "
                                f"in {self.source}")

    def __repr__(self) -> str:
        return (f"Dataset(train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"classes={len(self.classes)}, source={self.source!r})")


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """The study's input normalisation: float32 y = (x / 255 − 0.5) / 0.5, i.e. [0, 255] -> [−1, 1].

    Computed in the same order as torchvision's ToTensor + Normalize(0.5, 0.5) so results match
    bit for bit. Worked numbers: 0 -> −1.0, 255 -> 1.0, 51 -> (0.2 − 0.5) / 0.5 = −0.6.
    """
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    return (images_uint8.to(torch.float32) / 255.0 - 0.5) / 0.5


def batches(images: torch.Tensor, labels: torch.Tensor,
            batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (images, labels) slices of at most `batch_size` items; views, never copies."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def load_cifar10(data_dir: str | Path | None, cache_dir: str | Path, download: bool = False,
                 progress: Progress | None = None) -> Dataset:
    """Load CIFAR-10 from `data_dir` (None: ./data), via the cache in `cache_dir`.

    The first load of a source decodes it and writes the cache; later loads of the same,
    unchanged source (same resolved path and fingerprint) read the cache only. `download` fetches
    the archive only for the default folder (`data_dir` None): a named folder must already exist
    and hold the data, so a mistyped path is an error naming it.
    """
    report = progress if progress is not None else _ignore
    may_download = download and data_dir is None
    plan = _plan(_locate(_resolve_data_dir(data_dir), may_download, report), report)
    key = _cache_key(plan.path, plan.fingerprint)
    folder = Path(cache_dir) / f"cifar10-{_sha256(str(plan.path))[:16]}"
    cached = _read_cache(folder, key, report)
    if cached is not None:
        return cached
    dataset = plan.decode(report)
    _write_cache(folder, key, plan.fingerprint, dataset, report)
    return dataset


def _ignore(message: str) -> None:
    """Progress sink used when the caller passes none."""


def _resolve_data_dir(data_dir: str | Path | None) -> Path:
    """`data_dir` if given, else ./data; made absolute. ($INTQ_DATA is read by the command line.)"""
    return Path(data_dir if data_dir is not None else "data").expanduser().resolve()


# ---- finding the layout ---------------------------------------------------------------------

class _Layout(enum.Enum):
    """The three on-disk forms CIFAR-10 is accepted in; values read well in messages."""

    BATCHES = "CIFAR-10 python batches"
    ARCHIVE = "CIFAR-10 archive"
    IMAGES = "image folder"


def _detect(folder: Path) -> tuple[_Layout, Path] | None:
    """The layout directly in `folder` (complete batches, image folder, archive), if any."""
    batch_dirs = (folder, folder / BATCHES_DIR_NAME)
    for candidate in batch_dirs:
        if all((candidate / name).is_file() for name in _BATCH_FILES):
            return _Layout.BATCHES, candidate
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return _Layout.IMAGES, folder
    if (folder / ARCHIVE_NAME).is_file():
        return _Layout.ARCHIVE, folder / ARCHIVE_NAME
    for candidate in batch_dirs:  # incomplete batches: reading them names the missing file
        if any((candidate / name).exists() for name in _BATCH_FILES):
            return _Layout.BATCHES, candidate
    return None


def _locate(root: Path, download: bool, report: Progress) -> tuple[_Layout, Path]:
    """Find a layout in `root` or one folder below; download the archive if asked and none."""
    if root.exists() and not root.is_dir():
        raise _fail(f"data path {root} is not a folder")
    if not root.exists():
        if not download:
            raise _fail(f"data folder {root}: no such folder")
        root.mkdir(parents=True, exist_ok=True)
    found = _detect(root)
    if found is not None:
        return found
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    below = [hit for hit in map(_detect, subfolders) if hit is not None]
    if len(below) > 1:
        names = ", ".join(str(path) for _, path in below)
        raise _fail(f"data folder {root} holds several datasets ({names}); pass one of them")
    if below:
        return below[0]
    if download:
        return _Layout.ARCHIVE, _download(root / ARCHIVE_NAME, report)
    if not any(root.iterdir()):
        raise _fail(f"data folder {root} is empty")
    raise _fail(f"no CIFAR-10 layout recognised in data folder {root}")


@dataclass(frozen=True)
class _Plan:
    """A located source: where it is, its cache fingerprint, and how to decode it."""

    path: Path
    fingerprint: str
    decode: Callable[[Progress], Dataset]


def _plan(found: tuple[_Layout, Path], report: Progress) -> _Plan:
    """Fingerprint the located source (extracting an archive first) and pick its decoder."""
    layout, path = found
    if layout is _Layout.ARCHIVE:
        layout, path = _Layout.BATCHES, _extract(path, report)
    if layout is _Layout.BATCHES:
        return _Plan(path, _batches_fingerprint(path), partial(_decode_batches, path))
    listing = _scan_image_folder(path)
    return _Plan(path, listing.fingerprint, partial(_decode_image_folder, listing))


# ---- (a) download and extract ---------------------------------------------------------------

def _download(archive: Path, report: Progress) -> Path:
    """Fetch the CIFAR-10 archive to a temporary file, check its md5, then rename it into place."""
    report(f"downloading {CIFAR10_URL} to {archive}")
    remove_stale_temporaries(archive.parent)  # a killed download's .tmp file
    try:
        with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response, \
                atomic_write(archive) as out:
            digest = hashlib.md5()
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
            if digest.hexdigest() != CIFAR10_MD5:
                raise _fail(f"download of {CIFAR10_URL} into {archive.parent} is corrupt "
                            f"(md5 {digest.hexdigest()}, expected {CIFAR10_MD5})")
    except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
        reason = getattr(err, "reason", None) or err.strerror or err
        raise _fail(f"could not download {CIFAR10_URL} into {archive.parent} ({reason})") from None
    return archive


def _extract(archive: Path, report: Progress) -> Path:
    """Check the archive's md5, extract it beside itself, return the cifar-10-batches-py folder."""
    target = archive.parent / BATCHES_DIR_NAME
    if target.exists():
        raise _fail(f"{target} is incomplete; delete it so intq can extract {archive} again")
    if _md5(archive) != CIFAR10_MD5:
        raise _fail(f"{archive} is not the CIFAR-10 python archive (md5 mismatch); delete it")
    report(f"extracting {archive}")
    remove_stale_temporaries(archive.parent)  # a killed extraction's .extract- folder
    staging = Path(tempfile.mkdtemp(dir=archive.parent, prefix=f".extract-{os.getpid()}-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # The md5 already pins the known archive; the "data" filter (where this Python has
            # it) additionally refuses absolute paths and links leaving the folder.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")
            else:
                tar.extractall(staging)
        os.replace(staging / BATCHES_DIR_NAME, target)  # whole folder appears at once
    except (OSError, tarfile.TarError) as err:
        raise _fail(f"could not extract {archive} into {archive.parent} ({err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---- (b) python batches ---------------------------------------------------------------------

def _numpy_core(submodule: str):
    """numpy's internal module; numpy 2 renamed numpy.core to numpy._core (files use either)."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


# Every global a CIFAR-10 batch pickle may name: how numpy rebuilds an array (protocol 2 uses
# _reconstruct + ndarray + dtype; protocol 5 uses _frombuffer; Python 3 protocol 2 stores bytes
# via _codecs.encode). Anything else - os.system, eval, subprocess - is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray")._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray")._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_core("numeric")._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_core("numeric")._frombuffer,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, dicts, lists and strings."""

    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        getter = _ALLOWED_GLOBALS.get((module, name))
        if getter is None:
            raise _fail(f"{self.path} asks to load {module}.{name}, which CIFAR-10 never needs; "
                        "refusing to unpickle it")
        return getter()


def _read_pickle(path: Path) -> object:
    """Unpickle one batch file with the restricted unpickler; any failure names the file."""
    try:
        with open(path, "rb") as handle:
            return _BatchUnpickler(handle, path).load()
    except DataError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways; all mean "unreadable"
        raise _fail(f"cannot read CIFAR-10 batch {path} ({type(err).__name__}: {err})") from None


def _read_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one data batch file."""
    content = _read_pickle(path)
    data = content.get(b"data") if isinstance(content, dict) else None
    labels = content.get(b"labels") if isinstance(content, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * _SIDE * _SIDE or labels is None or len(labels) != len(data):
        raise _fail(f"{path} is not a CIFAR-10 batch (want b'data' uint8 (N, 3072), b'labels')")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and not 0 <= labels.min() <= labels.max() < n_classes:
        raise _fail(f"{path} has labels outside 0..{n_classes - 1}")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each a row-major 32x32 plane.
    images = data.reshape(-1, 3, _SIDE, _SIDE)  # (N, 3072) -> (N, C, H, W)
    return images, labels


def _read_classes(path: Path) -> tuple[str, ...]:
    """Class names from batches.meta (b'label_names', a list of bytes): CIFAR-10's ten, in order."""
    content = _read_pickle(path)
    names = content.get(b"label_names") if isinstance(content, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
        raise _fail(f"{path} is not CIFAR-10 batches.meta (want b'label_names', a list of bytes)")
    classes = tuple(name.decode("utf-8", "replace") for name in names)
    if classes != CIFAR10_CLASSES:
        shown = ", ".join(name[:40] for name in classes[:12])
        raise _fail(f"{path} lists the classes [{shown}], not CIFAR-10's ten "
                    f"({', '.join(CIFAR10_CLASSES)}) in that order")
    return classes


def _batches_fingerprint(folder: Path) -> str:
    """Sizes and modification times of the seven batch files; missing files are named."""
    parts = []
    for name in _BATCH_FILES:
        try:
            stat = (folder / name).stat()
        except OSError:
            raise _fail(f"CIFAR-10 batch file {folder / name} is missing") from None
        parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "batches " + " ".join(parts)


def _decode_batches(folder: Path, report: Progress) -> Dataset:
    """Read all five training batches and the test batch of a cifar-10-batches-py folder."""
    classes = _read_classes(folder / "batches.meta")
    train = []
    for name in _TRAIN_BATCHES:
        report(f"reading {folder / name}")
        train.append(_read_batch(folder / name, len(classes)))
    test_images, test_labels = _read_batch(folder / "test_batch", len(classes))
    return Dataset(
        train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
        test_images=torch.from_numpy(np.ascontiguousarray(test_images)),
        test_labels=torch.from_numpy(test_labels),
        classes=classes,
        source=f"{_Layout.BATCHES.value} in {folder}",
    )


# ---- (c) image folder -----------------------------------------------------------------------

@dataclass(frozen=True)
class _ImageListing:
    """The files of a train/<class>/, test/<class>/ folder, in label order, and their fingerprint."""

    folder: Path
    classes: tuple[str, ...]
    train: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]
    fingerprint: str


def _subfolder_names(folder: Path) -> tuple[str, ...]:
    """Sorted names of the visible subfolders of `folder`."""
    try:
        return tuple(sorted(e.name for e in os.scandir(folder)
                            if e.is_dir() and not e.name.startswith(".")))
    except OSError as err:
        raise _fail(f"cannot list {folder} ({err.strerror})") from None


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
        problem = _class_folder_problem(_subfolder_names(folder / split))
        if problem is not None:
            raise _fail(f"class folders in {folder / split} are not CIFAR-10's ten ({problem}); "
                        f"train/ and test/ must each hold exactly {', '.join(CIFAR10_CLASSES)}")
    return CIFAR10_CLASSES


def _scan_class(class_dir: Path) -> tuple[list[str], int, int]:
    """Paths of the .png/.jpg/.jpeg files in a class folder sorted by name, total bytes, newest
    mtime_ns."""
    try:
        entries = [e for e in os.scandir(class_dir)
                   if e.name.lower().endswith(_IMAGE_SUFFIXES) and e.is_file()]
        stats = [entry.stat() for entry in entries]
    except OSError as err:
        raise _fail(f"cannot list {class_dir} ({err.strerror})") from None
    if not entries:
        raise _fail(f"class folder {class_dir} holds no .png/.jpg/.jpeg images")
    paths = sorted(entry.path for entry in entries)  # same folder, so sorts by file name
    total = sum(stat.st_size for stat in stats)
    return paths, total, max(stat.st_mtime_ns for stat in stats)


def _scan_image_folder(folder: Path) -> _ImageListing:
    """List every image (one stat each, ~0.4 s for 60,000) and fingerprint the whole folder.

    Fingerprint: file count, total bytes, newest mtime and a hash of the ordered paths, so an
    added, removed, renamed, resized or rewritten file invalidates the cache.
    """
    classes = _class_names(folder)
    names, count, total, newest = hashlib.sha256(), 0, 0, 0
    splits = {}
    for split in ("train", "test"):
        paths, labels = [], []
        for label, name in enumerate(classes):
            class_paths, class_bytes, class_newest = _scan_class(folder / split / name)
            paths += class_paths
            labels += [label] * len(class_paths)
            names.update("\0".join(class_paths).encode("utf-8", "surrogateescape") + b"\0")
            total, newest = total + class_bytes, max(newest, class_newest)
        count += len(paths)
        splits[split] = (paths, labels)
    fingerprint = (f"images files={count} bytes={total} newest_mtime_ns={newest} "
                   f"paths_sha256={names.hexdigest()}")
    return _ImageListing(folder, classes, splits["train"], splits["test"], fingerprint)


def _read_image(path: str) -> np.ndarray:
    """One 32x32 image as uint8 (H, W, 3) RGB; wrong size or undecodable file names the file."""
    try:
        with Image.open(path) as image:
            if image.size != (_SIDE, _SIDE):
                width, height = image.size
                raise _fail(f"image {path} is {width}x{height}, but CIFAR-10 images are 32x32")
            return np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except Exception as err:  # a damaged image can fail in many ways; all mean "unreadable"
        raise _fail(f"cannot read image {path} ({type(err).__name__}: {err})") from None


def _decode_chunk(paths: list[str]) -> np.ndarray:
    """Runs in a worker process: decode `paths` into one uint8 (n, 3, 32, 32) array."""
    hwc = np.empty((len(paths), _SIDE, _SIDE, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        hwc[index] = _read_image(path)
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))  # (n, H, W, C) -> (n, C, H, W)


def _decode_split(pool: ProcessPoolExecutor, paths: list[str], split: str,
                  report: Progress) -> np.ndarray:
    """Decode one split in chunks of _CHUNK files across the pool, reporting after each chunk."""
    images = np.empty((len(paths), 3, _SIDE, _SIDE), dtype=np.uint8)
    starts = range(0, len(paths), _CHUNK)
    chunks = [paths[start:start + _CHUNK] for start in starts]
    for start, block in zip(starts, pool.map(_decode_chunk, chunks)):
        images[start:start + len(block)] = block
        report(f"decoding {split}: {start + len(block)}/{len(paths)}")
    return images


def _decode_image_folder(listing: _ImageListing, report: Progress) -> Dataset:
    """Decode every image of the listing with _WORKERS processes (PIL decoding is CPU-bound)."""
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
        source=f"{_Layout.IMAGES.value} {listing.folder}",
    )


# ---- cache ----------------------------------------------------------------------------------

def _sha256(text: str) -> str:
    """Hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _cache_key(path: Path, fingerprint: str) -> str:
    """sha256 of the cache format, the source's absolute path and its fingerprint."""
    return _sha256(f"intq cifar10 cache format {_CACHE_FORMAT}\n{path}\n{fingerprint}")


def _array_sha256(array: np.ndarray) -> str:
    """Hex SHA-256 of "<dtype> <shape>\n" followed by the array's bytes in C order.

    The header makes a reinterpretation (same bytes, other dtype or shape) a different digest.
    Cost: 0.085 s for the 50,000x3x32x32 uint8 training images (153.6 MB, ~1.8 GB/s, measured
    on the 2-core development machine, OpenSSL 3.0), paid on every cache load.
    """
    digest = hashlib.sha256(f"{array.dtype.str} {tuple(array.shape)}\n".encode("ascii"))
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


class _CorruptCache(Exception):
    """A cache file that does not match what meta.json recorded for it."""


def _read_cache(folder: Path, key: str, report: Progress) -> Dataset | None:
    """The cached dataset if `folder/meta.json` carries `key` and every array matches its recorded
    SHA-256; None (decode again, which rewrites the cache) otherwise.

    One cache folder per source path; a changed source overwrites it, so stale copies of the
    same source never pile up. A damaged cache is reported in one line and never used.
    """
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise _CorruptCache("meta.json is not a JSON object")
        if meta.get("key") != key:
            report(f"cache {folder} is out of date (the source changed); decoding again")
            return None
        if tuple(meta["classes"]) != CIFAR10_CLASSES:
            raise _CorruptCache("meta.json lists other classes than CIFAR-10's ten")
        tensors = {name: torch.from_numpy(_load_verified(folder / f"{name}.npy", meta["sha256"][name]))
                   for name in _CACHE_ARRAYS}
        dataset = Dataset(**tensors, classes=CIFAR10_CLASSES, source=str(meta["source"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, DataError,
            _CorruptCache) as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        report(f"cache {folder} is corrupt ({detail}), rebuilding it from the source")
        return None
    report(f"loaded {dataset.source} from cache {folder}")
    return dataset


def _load_verified(path: Path, expected: str) -> np.ndarray:
    """The cached array at `path`, after checking it against its recorded SHA-256.

    The digest is taken over the mapped pages themselves, so what was checked is exactly what
    is used, even if another process replaces the file meanwhile.
    """
    array = _load_npy(path)
    if _array_sha256(array) != expected:
        raise _CorruptCache(f"{path.name} does not match the SHA-256 recorded in meta.json")
    return array


def _load_npy(path: Path) -> np.ndarray:
    """Map a cached .npy copy-on-write: no copy up front; pages are read when first touched.

    Safe because cache files are only ever replaced whole (os.replace), never rewritten in
    place; a mapped file that gets replaced stays intact until the mapping is dropped. Writes
    to the tensor stay private to this process.
    """
    return np.load(path, mmap_mode="c", allow_pickle=False)


def _write_cache(folder: Path, key: str, fingerprint: str, dataset: Dataset,
                 report: Progress) -> None:
    """Write the four arrays as .npy, then meta.json (with each array's SHA-256) last: a folder
    without meta.json is a cache miss. A killed earlier write's temporaries are removed first."""
    report(f"writing cache {folder}")
    ensure_writable_dir(folder)
    remove_stale_temporaries(folder)
    meta_path = folder / "meta.json"
    meta_path.unlink(missing_ok=True)  # until the new meta.json lands, the folder reads as a miss
    digests = {}
    for name in _CACHE_ARRAYS:
        array = getattr(dataset, name).numpy()
        digests[name] = _array_sha256(array)
        with atomic_write(folder / f"{name}.npy") as handle:
            np.save(handle, array, allow_pickle=False)
    meta = {"format": _CACHE_FORMAT, "key": key, "classes": list(dataset.classes),
            "source": dataset.source, "fingerprint": fingerprint, "sha256": digests}
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
