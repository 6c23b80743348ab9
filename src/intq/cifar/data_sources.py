"""Finding CIFAR-10 on disk and reading the standard download: layout (a), the archive
`cifar-10-python.tar.gz` (md5-checked, then extracted; downloaded only when asked), and layout (b),
the python batches `data_batch_1..5`, `test_batch`, `batches.meta`, read with a restricted unpickler
that can only rebuild numpy arrays, so a hostile file cannot run code. Layout (c), the image
folder, is image_folder.py's. `locate_source` finds one layout and says how to decode it."""
from __future__ import annotations

import codecs
import enum
import hashlib
import importlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from intq.cifar.dataset import CIFAR10_CLASSES, IMAGE_SIDE, DataError, Dataset, Progress, data_error
from intq.files import atomic_write, remove_stale_temporaries
from intq.cifar.image_folder import IMAGE_FOLDER, decode_image_folder, scan_image_folder

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR_NAME = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_BATCH_FILES = _TRAIN_BATCHES + ("test_batch", "batches.meta")


# ---- finding the layout ---------------------------------------------------------------------

class _Layout(enum.Enum):
    """The three on-disk forms CIFAR-10 is accepted in; values read well in messages."""

    BATCHES = "CIFAR-10 python batches"
    ARCHIVE = "CIFAR-10 archive"
    IMAGES = IMAGE_FOLDER


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
        raise data_error(f"data path {root} is not a folder")
    if not root.exists():
        if not download:
            raise data_error(f"data folder {root}: no such folder")
        root.mkdir(parents=True, exist_ok=True)
    found = _detect(root)
    if found is not None:
        return found
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    below = [hit for hit in map(_detect, subfolders) if hit is not None]
    if len(below) > 1:
        names = ", ".join(str(path) for _, path in below)
        raise data_error(f"data folder {root} holds several datasets ({names}); pass one of them")
    if below:
        return below[0]
    if download:
        return _Layout.ARCHIVE, _download(root / ARCHIVE_NAME, report)
    if not any(root.iterdir()):
        raise data_error(f"data folder {root} is empty")
    raise data_error(f"no CIFAR-10 layout recognised in data folder {root}")


def locate_source(root: Path, download: bool, report: Progress) -> SourcePlan:
    """The CIFAR-10 source in `root` or one folder below (downloading the archive into `root` if
    `download` and none is there): where it is, its cache fingerprint, and how to decode it."""
    return _plan(_locate(root, download, report), report)


@dataclass(frozen=True)
class SourcePlan:
    """A located source: where it is, its cache fingerprint, and how to decode it."""

    path: Path
    fingerprint: str
    decode: Callable[[Progress], Dataset]


def _plan(found: tuple[_Layout, Path], report: Progress) -> SourcePlan:
    """Fingerprint the located source (extracting an archive first) and pick its decoder."""
    layout, path = found
    if layout is _Layout.ARCHIVE:
        layout, path = _Layout.BATCHES, _extract(path, report)
    if layout is _Layout.BATCHES:
        return SourcePlan(path, _batches_fingerprint(path), partial(_decode_batches, path))
    listing = scan_image_folder(path)
    return SourcePlan(path, listing.fingerprint, partial(decode_image_folder, listing))


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
                raise data_error(f"download of {CIFAR10_URL} into {archive.parent} is corrupt "
                            f"(md5 {digest.hexdigest()}, expected {CIFAR10_MD5})")
    except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
        reason = getattr(err, "reason", None) or err.strerror or err
        raise data_error(f"could not download {CIFAR10_URL} into {archive.parent} ({reason})") from None
    return archive


def _extract(archive: Path, report: Progress) -> Path:
    """Check the archive's md5, extract it beside itself, return the cifar-10-batches-py folder."""
    target = archive.parent / BATCHES_DIR_NAME
    if target.exists():
        raise data_error(f"{target} is incomplete; delete it so intq can extract {archive} again")
    if _md5(archive) != CIFAR10_MD5:
        raise data_error(f"{archive} is not the CIFAR-10 python archive (md5 mismatch); delete it")
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
        raise data_error(f"could not extract {archive} into {archive.parent} ({err})") from None
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
            raise data_error(f"{self.path} asks to load {module}.{name}, which CIFAR-10 never needs; "
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
        raise data_error(f"cannot read CIFAR-10 batch {path} ({type(err).__name__}: {err})") from None


def _read_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one data batch file."""
    content = _read_pickle(path)
    data = content.get(b"data") if isinstance(content, dict) else None
    labels = content.get(b"labels") if isinstance(content, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * IMAGE_SIDE * IMAGE_SIDE or labels is None or len(labels) != len(data):
        raise data_error(f"{path} is not a CIFAR-10 batch (want b'data' uint8 (N, 3072), b'labels')")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and not 0 <= labels.min() <= labels.max() < n_classes:
        raise data_error(f"{path} has labels outside 0..{n_classes - 1}")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each a row-major 32x32 plane.
    images = data.reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE)  # (N, 3072) -> (N, C, H, W)
    return images, labels


def _read_classes(path: Path) -> tuple[str, ...]:
    """Class names from batches.meta (b'label_names', a list of bytes): CIFAR-10's ten, in order."""
    content = _read_pickle(path)
    names = content.get(b"label_names") if isinstance(content, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
        raise data_error(f"{path} is not CIFAR-10 batches.meta (want b'label_names', a list of bytes)")
    classes = tuple(name.decode("utf-8", "replace") for name in names)
    if classes != CIFAR10_CLASSES:
        shown = ", ".join(name[:40] for name in classes[:12])
        raise data_error(f"{path} lists the classes [{shown}], not CIFAR-10's ten "
                    f"({', '.join(CIFAR10_CLASSES)}) in that order")
    return classes


def _batches_fingerprint(folder: Path) -> str:
    """Sizes and modification times of the seven batch files; missing files are named."""
    parts = []
    for name in _BATCH_FILES:
        try:
            stat = (folder / name).stat()
        except OSError:
            raise data_error(f"CIFAR-10 batch file {folder / name} is missing") from None
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
