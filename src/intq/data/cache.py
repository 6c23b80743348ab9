"""The decoded-array cache of a Dataset: its four arrays as .npy files plus `meta.json`, which
records the source's key, the class names and a SHA-256 of each array. A load maps the arrays back
(numpy.load with allow_pickle=False) and checks every one against its digest; any mismatch
(altered, truncated, or meta.json unreadable) is reported and treated as a miss, so a damaged cache
is never used. Used for CIFAR-10 (intq.cifar.data_cache) and any image folder (image_folder.py)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from intq.data.dataset import DataError, Dataset, Progress
from intq.files import array_sha256, atomic_write, atomic_write_text, ensure_writable_dir, remove_stale_temporaries

CACHE_FORMAT = 2  # 2: meta.json records a SHA-256 per array
CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def text_sha256(text: str) -> str:
    """Hex sha256 of a UTF-8 string (undecodable file-name bytes kept as surrogate escapes)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def cache_folder(cache_dir: str | Path, kind: str, identity: str) -> Path:
    """The one cache folder of a source: `kind`-<16 hex digits of sha256(identity)>, overwritten
    when the source changes. Example: ("cache", "cifar10", "/data/cifar") -> cache/cifar10-1f0c...."""
    return Path(cache_dir) / f"{kind}-{text_sha256(identity)[:16]}"


def cache_key(kind: str, path: Path, fingerprint: str) -> str:
    """sha256 of the cache format, the kind of source, its absolute path and its fingerprint: any
    change to one of them makes the cached arrays out of date."""
    return text_sha256(f"intq {kind} cache format {CACHE_FORMAT}\n{path}\n{fingerprint}")


class _CorruptCache(Exception):
    """A cache file that does not match what meta.json recorded for it."""


def read_cache(folder: Path, key: str, classes: tuple[str, ...], report: Progress,
               image_shape: tuple[int, int, int] | None = None) -> Dataset | None:
    """The cached dataset if `folder/meta.json` carries `key`, lists `classes`, every array matches
    its recorded SHA-256 (and the images are `image_shape`, when given); None (decode again, which
    rewrites the cache) otherwise. A damaged cache is reported in one line and never used.
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
        dataset = _verified_dataset(folder, meta, classes)
        if image_shape is not None and dataset.image_shape != image_shape:
            raise _CorruptCache(f"the cached images are {dataset.image_shape}, not {image_shape}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, DataError,
            _CorruptCache) as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        report(f"cache {folder} is corrupt ({detail}), rebuilding it from the source")
        return None
    report(f"loaded {dataset.source} from cache {folder}")
    return dataset


def _verified_dataset(folder: Path, meta: dict, classes: tuple[str, ...]) -> Dataset:
    """The Dataset of a cache folder whose meta.json is `meta`, once its class names are `classes`
    and every array matches its recorded SHA-256 (_CorruptCache otherwise)."""
    if tuple(meta["classes"]) != classes:
        raise _CorruptCache("meta.json lists other classes than the source")
    tensors = {name: torch.from_numpy(_load_verified(folder / f"{name}.npy", meta["sha256"][name]))
               for name in CACHE_ARRAYS}
    return Dataset(**tensors, classes=classes, source=str(meta["source"]))


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
    for name in CACHE_ARRAYS:
        array = getattr(dataset, name).numpy()
        digests[name] = array_sha256(array)
        with atomic_write(folder / f"{name}.npy") as handle:
            np.save(handle, array, allow_pickle=False)
    meta = {"format": CACHE_FORMAT, "key": key, "classes": list(dataset.classes),
            "source": dataset.source, "fingerprint": fingerprint, "sha256": digests}
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
