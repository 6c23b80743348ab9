"""A user's own image folder as a Dataset: any image size and channel count, in one of three
layouts (image_listing.py), decoded across worker processes and cached (cache.py).

Every image is converted to the channel count (1: PIL's convert("L"), 3: convert("RGB")), then
resized to `size` with PIL's bilinear resampling when one is given; without `size` all images must
share one size. Every problem is a one-line DataError naming the path.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from intq.data.cache import cache_folder, cache_key, read_cache, write_cache
from intq.data.dataset import DataError, Dataset, Progress
from intq.data.image_listing import ImageListing, list_image_folder
from intq.extras import require

IMAGE_FOLDER = "image folder"  # the source's kind in Dataset.source and the cache
MAX_SIDE = 4096  # pixels a side, at most, of a requested size or of an image used at its own size
MAX_BYTES = 8 << 30  # 8 GiB of decoded uint8 images, at most
CHANNEL_MODES = {1: "L", 3: "RGB"}  # channel count -> the PIL mode images are converted to
_WORKERS = 2
_CHUNK = 1000  # images per worker task: about 3 MB back per task for 32x32 RGB

Size = tuple[int, int]  # (height, width)


def load_image_folder(folder: Path, *, size: Size | None = None, channels: int | None = None,
                      cache_dir: Path | None = None, progress: Progress | None = None) -> Dataset:
    """The images of `folder` as uint8 (N, C, H, W), labelled by their sorted class folder names.

    `size` (height, width) resizes every image; `channels` 1 or 3 converts every image, None keeps
    one channel only when every image of the folder is single-band (grayscale), else 3. With
    `cache_dir`, decoded arrays are cached per folder, size and channels, checked on every read.
    Example: load_image_folder(Path("cifar10-jpeg"), size=(28, 28), channels=1) gives train images
    (50000, 1, 28, 28) and test images (10000, 1, 28, 28), classes airplane ... truck.
    """
    report = progress if progress is not None else _ignore
    folder = Path(folder).expanduser().resolve()
    size = _checked_size(folder, size)
    _check_channels(folder, channels)
    listing = list_image_folder(folder)
    require("PIL.Image", "reading an image folder")
    _check_memory(listing, size, channels)
    if cache_dir is None:
        return decode_images(listing, size, channels, report)
    variant = f"size={size} channels={channels}"
    fingerprint = f"{listing.fingerprint} {variant}"
    cache = cache_folder(cache_dir, "images", f"{folder}\n{variant}")
    key = cache_key(IMAGE_FOLDER, folder, fingerprint)
    cached = read_cache(cache, key, listing.classes, report)
    if cached is not None:
        return cached
    dataset = decode_images(listing, size, channels, report)
    write_cache(cache, key, fingerprint, dataset, report)
    return dataset


def _ignore(message: str) -> None:
    """Progress sink used when the caller passes none."""


def _checked_size(folder: Path, size: Size | None) -> Size | None:
    """`size` as a (height, width) tuple once it is two whole numbers from 1 to MAX_SIDE.
    Example: [28, 28] -> (28, 28); (5000, 5000), (0, 8) and (8.0, 8) are refused."""
    if size is None:
        return None
    whole = isinstance(size, (tuple, list)) and len(size) == 2 \
        and all(isinstance(side, int) and not isinstance(side, bool) for side in size)
    if not whole or not all(1 <= side <= MAX_SIDE for side in size):
        raise DataError(f"size {size!r:.40} for {IMAGE_FOLDER} {folder} must be (height, width), "
                        f"two whole numbers from 1 to {MAX_SIDE}")
    return int(size[0]), int(size[1])


def _check_channels(folder: Path, channels: int | None) -> None:
    """Refuse channels other than 1 (grayscale), 3 (RGB) or None (decided from the images)."""
    if channels is not None and (channels not in CHANNEL_MODES or isinstance(channels, bool)):
        raise DataError(f"channels={channels!r:.40} for {IMAGE_FOLDER} {folder}: images are read with "
                        f"1 (grayscale) or 3 (RGB) channels")


def _check_memory(listing: ImageListing, size: Size | None, channels: int | None) -> None:
    """Refuse before decoding when the images would take more than MAX_BYTES of memory.

    Count: N images x C x H x W bytes, H x W the requested size or the first image's own, C the
    requested channels or 3 when not yet known. Example: 60,000 at 3x224x224 need 8.4 GiB: refused.
    """
    count = len(listing.train.paths) + len(listing.test.paths)
    height, width = size if size is not None else _image_size(listing.train.paths[0])
    depth = channels if channels is not None else 3
    need = count * depth * height * width
    if need > MAX_BYTES:
        raise DataError(f"{IMAGE_FOLDER} {listing.folder}: {count} images of {depth}x{height}x{width} "
                        f"would need {need / (1 << 30):.1f} GiB of memory, more than the "
                        f"{MAX_BYTES >> 30} GiB allowed; pass a smaller --size")


def _image_size(path: str) -> Size:
    """(height, width) of one image, read from its header only."""
    from PIL import Image  # load_image_folder checked it is installed

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as err:  # a damaged image can fail in many ways; all mean "unreadable"
        raise _unreadable(path, err) from None
    return height, width


def _unreadable(path: str, err: Exception) -> DataError:
    """The one line for an image PIL cannot open or decode: "cannot read image P (OSError: ...)"."""
    return DataError(f"cannot read image {path} ({type(err).__name__}: {err})")


def _target_mode(image, channels: int | None) -> str:
    """The PIL mode to convert `image` to: `channels`'s, or with channels None "L" when the image
    is single-band (one band that is not a palette: "1", "L", "I;16", "F"), else "RGB".
    Example: an "LA" or "P" image with channels None -> "RGB"; an "I;16" one -> "L"."""
    if channels is not None:
        return CHANNEL_MODES[channels]
    single_band = len(image.getbands()) == 1 and image.mode != "P"
    return "L" if single_band else "RGB"


def _read_image(path: str, size: Size | None, channels: int | None) -> np.ndarray:
    """One image as uint8 (H, W) when converted to "L", (H, W, 3) when to "RGB": to `channels`'s
    mode, or with channels None to "L" if the image is single-band else "RGB"; then resized to
    `size` (bilinear). An undecodable file, or one over MAX_SIDE a side without `size`, names it."""
    from PIL import Image  # load_image_folder checked it is installed

    try:
        with Image.open(path) as image:
            width, height = image.size
            if size is None and max(width, height) > MAX_SIDE:
                raise DataError(f"image {path} is {width}x{height}, more than {MAX_SIDE} pixels a "
                                f"side; pass --size to resize the images")
            converted = image.convert(_target_mode(image, channels))
            if size is not None:
                converted = converted.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(converted)
    except DataError:
        raise
    except Exception as err:  # a damaged image can fail in many ways; all mean "unreadable"
        raise _unreadable(path, err) from None


def _decode_chunk(paths: list[str], size: Size | None, channels: int | None) -> list[np.ndarray]:
    """Runs in a worker process: each path's image as _read_image gives it."""
    return [_read_image(path, size, channels) for path in paths]


class _SplitImages:
    """One split's images, placed one by one as they arrive into a uint8 (N, C, H, W) array.

    Rules: every image must have the size of the first one placed (`reference`, shared by both
    splits), else a DataError names both files and says to pass --size; the array takes the first
    image's channel count, and the first RGB image after grayscale ones widens it to 3 channels,
    the gray value copied into all three (what convert("RGB") of an "L" image gives). Example: an
    8x8 gray image then an 8x8 RGB one give (2, 3, 8, 8), image 0's three channels equal.
    """

    def __init__(self, count: int, reference: tuple[str, tuple[int, ...]] | None = None):
        self.count = count
        self.reference = reference  # (path, (H, W)) of the first image of the folder
        self.images: np.ndarray | None = None
        self.placed = 0

    def place(self, path: str, pixels: np.ndarray) -> None:
        """Put the next image, uint8 (H, W) or (H, W, 3), at the next index."""
        self._check_size(path, pixels.shape[:2])
        chw = np.atleast_3d(pixels).transpose(2, 0, 1)  # (H, W) -> (H, W, 1); (H, W, C) -> (C, H, W)
        if self.images is None:
            self.images = np.empty((self.count, *chw.shape), dtype=np.uint8)
        elif chw.shape[0] > self.images.shape[1]:
            self.images = _widen_to_rgb(self.images, self.placed)
        self.images[self.placed] = chw  # a gray image among RGB ones broadcasts to all 3 channels
        self.placed += 1

    def _check_size(self, path: str, shape: tuple[int, ...]) -> None:
        """Take (path, (H, W)) as the reference if none yet, else refuse any other (H, W)."""
        if self.reference is None:
            self.reference = (path, shape)
            return
        first, first_shape = self.reference
        if shape != first_shape:
            raise DataError(f"images differ in size: {first} is {_wxh(first_shape)} but {path} is "
                            f"{_wxh(shape)}; pass --size to resize them all to one size")


def _wxh(shape: tuple[int, ...]) -> str:
    """(H, W) as PIL and image viewers write a size, width first: (10, 12) -> "12x10"."""
    return f"{shape[1]}x{shape[0]}"


def _widen_to_rgb(images: np.ndarray, filled: int) -> np.ndarray:
    """A 3-channel copy of 1-channel (N, 1, H, W) `images`, the first `filled` gray values copied
    into all three channels. Example: a pixel 7 becomes (7, 7, 7), as convert("RGB") makes it."""
    wider = np.empty((images.shape[0], 3, *images.shape[2:]), dtype=np.uint8)
    wider[:filled] = images[:filled]  # (filled, 1, H, W) broadcasts to (filled, 3, H, W)
    return wider


def _decode_split(pool: ProcessPoolExecutor, decode: Callable, paths: list[str], split: str,
                  placed: _SplitImages, report: Progress) -> None:
    """Decode one split in chunks of _CHUNK files across the pool, reporting after each chunk:
    "decoding train: 1000/50000"."""
    chunks = [paths[start:start + _CHUNK] for start in range(0, len(paths), _CHUNK)]
    for chunk, block in zip(chunks, pool.map(decode, chunks)):
        for path, pixels in zip(chunk, block):
            placed.place(path, pixels)
        report(f"decoding {split}: {placed.placed}/{len(paths)}")


def decode_images(listing: ImageListing, size: Size | None, channels: int | None,
                  report: Progress) -> Dataset:
    """Decode every image of the listing with _WORKERS processes (PIL decoding is CPU-bound).

    With channels None, a split of grayscale images beside a split holding RGB ones is widened to
    RGB too, so both splits share one (C, H, W); an empty test split is (0, C, H, W).
    """
    require("PIL.Image", "reading an image folder")
    train = _SplitImages(len(listing.train.paths))
    decode = partial(_decode_chunk, size=size, channels=channels)
    pool = ProcessPoolExecutor(max_workers=_WORKERS)
    try:
        _decode_split(pool, decode, listing.train.paths, "train", train, report)
        test = _SplitImages(len(listing.test.paths), reference=train.reference)
        _decode_split(pool, decode, listing.test.paths, "test", test, report)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on error, skip the chunks still queued
    train_images, test_images = _one_channel_count(train.images, test.images)
    return Dataset(
        train_images=torch.from_numpy(train_images),
        train_labels=torch.tensor(listing.train.labels, dtype=torch.int64),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.tensor(listing.test.labels, dtype=torch.int64),
        classes=listing.classes,
        source=f"{IMAGE_FOLDER} {listing.folder}",
    )


def _one_channel_count(train: np.ndarray, test: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The two splits with one channel count: a missing (empty) test split becomes (0, C, H, W) of
    train's shape, and a 1-channel split beside a 3-channel one is widened to 3."""
    if test is None:
        return train, np.empty((0, *train.shape[1:]), dtype=np.uint8)
    if train.shape[1] < test.shape[1]:
        train = _widen_to_rgb(train, len(train))
    elif test.shape[1] < train.shape[1]:
        test = _widen_to_rgb(test, len(test))
    return train, test
