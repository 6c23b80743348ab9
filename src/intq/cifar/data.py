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

Where each part lives: the Dataset, normalize, batches and DataError in dataset.py (re-exported
here); finding a layout, (a) and (b) in data_sources.py; (c) in image_folder.py; the cache in
data_cache.py. This module ties them together in `load_cifar10`.
"""
from __future__ import annotations

from pathlib import Path

from intq.cifar.data_cache import cache_folder, cache_key, read_cache, write_cache
from intq.cifar.data_sources import locate_source
from intq.cifar.dataset import CIFAR10_CLASSES, DataError, Dataset, Progress, batches, normalize

__all__ = ["CIFAR10_CLASSES", "DataError", "Dataset", "Progress", "batches", "load_cifar10", "normalize"]


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
    plan = locate_source(_resolve_data_dir(data_dir), may_download, report)
    key = cache_key(plan.path, plan.fingerprint)
    folder = cache_folder(cache_dir, plan.path)
    cached = read_cache(folder, key, report)
    if cached is not None:
        return cached
    dataset = plan.decode(report)
    write_cache(folder, key, plan.fingerprint, dataset, report)
    return dataset


def _ignore(message: str) -> None:
    """Progress sink used when the caller passes none."""


def _resolve_data_dir(data_dir: str | Path | None) -> Path:
    """`data_dir` if given, else ./data; made absolute. ($INTQ_DATA is read by the command line.)"""
    return Path(data_dir if data_dir is not None else "data").expanduser().resolve()
