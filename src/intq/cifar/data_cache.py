"""The decoded-array cache: the four arrays as .npy files plus `meta.json`, which records the
source's key and a SHA-256 of each array. A load maps the arrays back (numpy.load with
allow_pickle=False) and checks every one against its digest; any mismatch (altered, truncated, or
meta.json unreadable) is reported and treated as a miss, so a damaged cache is never used."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from intq.cifar.dataset import CIFAR10_CLASSES, DataError, Dataset, Progress
from intq.files import array_sha256, atomic_write, atomic_write_text, ensure_writable_dir, remove_stale_temporaries

_CACHE_FORMAT = 2  # 2: meta.json records a SHA-256 per array
_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _sha256(text: str) -> str:
    """Hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def cache_folder(cache_dir: str | Path, source: Path) -> Path:
    """The cache folder of one source path: one folder per path, overwritten when the source changes."""
    return Path(cache_dir) / f"cifar10-{_sha256(str(source))[:16]}"


def cache_key(path: Path, fingerprint: str) -> str:
    """sha256 of the cache format, the source's absolute path and its fingerprint."""
    return _sha256(f"intq cifar10 cache format {_CACHE_FORMAT}\n{path}\n{fingerprint}")


class _CorruptCache(Exception):
    """A cache file that does not match what meta.json recorded for it."""


def read_cache(folder: Path, key: str, report: Progress) -> Dataset | None:
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
    if array_sha256(array) != expected:
        raise _CorruptCache(f"{path.name} does not match the SHA-256 recorded in meta.json")
    return array


def _load_npy(path: Path) -> np.ndarray:
    """Map a cached .npy copy-on-write: no copy up front; pages are read when first touched.

    Safe because cache files are only ever replaced whole (os.replace), never rewritten in
    place; a mapped file that gets replaced stays intact until the mapping is dropped. Writes
    to the tensor stay private to this process.
    """
    return np.load(path, mmap_mode="c", allow_pickle=False)


def write_cache(folder: Path, key: str, fingerprint: str, dataset: Dataset,
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
        digests[name] = array_sha256(array)
        with atomic_write(folder / f"{name}.npy") as handle:
            np.save(handle, array, allow_pickle=False)
    meta = {"format": _CACHE_FORMAT, "key": key, "classes": list(dataset.classes),
            "source": dataset.source, "fingerprint": fingerprint, "sha256": digests}
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
