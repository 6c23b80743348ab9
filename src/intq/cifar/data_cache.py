"""CIFAR-10's decoded-array cache: intq.data.cache (the four arrays as .npy plus `meta.json` with a
SHA-256 of each, checked on every load, a damaged cache reported and rebuilt) with CIFAR-10's
folder name, key and expectations: one `cifar10-<hash of the source path>` folder per source, the
ten classes and 3x32x32 images."""
from __future__ import annotations

from pathlib import Path

from intq.cifar.dataset import CIFAR10_CLASSES, IMAGE_SIDE, Dataset, Progress
from intq.data import cache
from intq.data.cache import write_cache  # noqa: F401 (intq.cifar.data writes through this module)

_CACHE_ARRAYS = cache.CACHE_ARRAYS  # the arrays each cache folder holds, one .npy file each

_KIND = "cifar10"


def cache_folder(cache_dir: str | Path, source: Path) -> Path:
    """The cache folder of one source path: one folder per path, overwritten when the source changes."""
    return cache.cache_folder(cache_dir, _KIND, str(source))


def cache_key(path: Path, fingerprint: str) -> str:
    """sha256 of the cache format, the source's absolute path and its fingerprint."""
    return cache.cache_key(_KIND, path, fingerprint)


def read_cache(folder: Path, key: str, report: Progress) -> Dataset | None:
    """The cached CIFAR-10 if `folder` holds a sound cache for `key` (the ten classes, 3x32x32
    images, every array matching its SHA-256); None (decode again) otherwise."""
    return cache.read_cache(folder, key, CIFAR10_CLASSES, report, image_shape=(3, IMAGE_SIDE, IMAGE_SIDE))
