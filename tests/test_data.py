"""Tests for intq.cifar.data: CIFAR-10 layouts, the restricted unpickler, the cache, and errors.

Everything runs on tiny datasets built in tmp_path; only the integration test reads the shared
CIFAR-10 copy, and it is skipped where that is absent.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from intq.cifar import data_cache

from intq.cifar import data_sources
from intq.cifar.data import CIFAR10_CLASSES, DataError, Dataset, batches, load_cifar10, normalize

SORTED_CLASSES = CIFAR10_CLASSES  # label order: CIFAR-10's, which is alphabetical
CLASSES = SORTED_CLASSES[::-1]  # folders written in reverse: labels follow the names, not the order
SHARED_JPEG = Path("/work/shared/data/cifar10-jpeg")


# ---- builders -------------------------------------------------------------------------------

def _pixels(seed: int) -> np.ndarray:
    """A random 32x32 RGB image, (H, W, C) uint8."""
    return np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def make_image_folder(root: Path, per_class: dict[str, int], suffix: str = ".png") -> dict:
    """train/<class>/NN.png and test/<class>/NN.png; returns {(split, class): [HWC arrays]}."""
    written = {}
    seed = 0
    for split in ("train", "test"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            arrays = []
            for index in range(per_class[split]):
                seed += 1
                arrays.append(_pixels(seed))
                Image.fromarray(arrays[-1]).save(folder / f"{index:02d}{suffix}")
            written[split, name] = arrays
    return written


def _pickle_batch(path: Path, content: dict, protocol: int) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=protocol)


def make_batches_folder(folder: Path, per_batch: int = 4, protocol: int = 2) -> dict:
    """A fake cifar-10-batches-py folder; returns {file name: (data (N, 3072), labels)}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    written = {}
    for name in data_sources._TRAIN_BATCHES + ("test_batch",):
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(label) for label in rng.integers(0, 3, size=per_batch)]
        _pickle_batch(folder / name, {b"batch_label": b"x", b"data": rows, b"labels": labels},
                      protocol)
        written[name] = (rows, labels)
    meta = {b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_vis": 3072}
    _pickle_batch(folder / "batches.meta", meta, protocol)
    return written


def _py2_string(raw: bytes) -> bytes:
    """A Python 2 `str` as cPickle writes it (SHORT_BINSTRING or BINSTRING)."""
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw
    return b"T" + struct.pack("<i", len(raw)) + raw


def py2_batch_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """The bytes Python 2 cPickle + numpy 1.x wrote for the real CIFAR-10 batches (protocol 2).

    Built opcode by opcode because Python 3 cannot write Python 2 `str` objects; this is the
    form the official download has, including the old `numpy.core.multiarray` module path.
    """
    n, width = rows.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
             + _py2_string(b"b") + b"\x87R"
             + b"(K\x01" + struct.pack("<cic", b"J", n, b"M") + struct.pack("<H", width)
             + b"\x86cnumpy\ndtype\n" + _py2_string(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89" + _py2_string(rows.tobytes()) + b"tb")
    label_list = b"](" + b"".join(struct.pack("<cB", b"K", label) for label in labels) + b"e"
    return (b"\x80\x02}q\x00(" + _py2_string(b"data") + array
            + _py2_string(b"labels") + label_list + b"u.")


def py2_meta_pickle(names: list[bytes]) -> bytes:
    """batches.meta as Python 2 wrote it: {'label_names': [str, ...]}."""
    items = b"".join(_py2_string(name) for name in names)
    return b"\x80\x02}q\x00(" + _py2_string(b"label_names") + b"](" + items + b"eu."


class _RunsShell:
    """Unpickling this would call os.system; the restricted unpickler must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- image folder ---------------------------------------------------------------------------

def test_image_folder_shapes_dtypes_and_labels_by_cifar10_name(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 3, "test": 2})
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert dataset.classes == ("airplane", "automobile", "bird", "cat", "deer",
                               "dog", "frog", "horse", "ship", "truck")
    assert dataset.train_images.shape == (30, 3, 32, 32)
    assert dataset.train_images.dtype == torch.uint8
    assert dataset.test_images.shape == (20, 3, 32, 32)
    assert dataset.train_labels.dtype == torch.int64
    assert dataset.train_labels.tolist() == [label for label in range(10) for _ in range(3)]
    assert dataset.test_labels.tolist() == [label for label in range(10) for _ in range(2)]
    assert str(tmp_path / "imgs") in dataset.source


def test_png_pixels_round_trip_exactly_in_chw_order(tmp_path):
    written = make_image_folder(tmp_path / "imgs", {"train": 3, "test": 2})
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    for split, images in (("train", dataset.train_images), ("test", dataset.test_images)):
        expected = np.stack([a for name in SORTED_CLASSES for a in written[split, name]])
        expected_chw = expected.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        np.testing.assert_array_equal(images.numpy(), expected_chw)


def test_jpeg_images_decode_close_to_original(tmp_path):
    written = make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1}, suffix=".jpg")
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    original = written["train", "airplane"][0].transpose(2, 0, 1).astype(np.int32)
    decoded = dataset.train_images[0].numpy().astype(np.int32)
    assert decoded.shape == (3, 32, 32)
    assert np.abs(decoded - original).mean() < 60  # JPEG of noise is lossy but not arbitrary


def test_images_sorted_by_file_name_within_a_class(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    folder = tmp_path / "imgs" / "train" / "airplane"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(folder / "zz.png")
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(folder / "aa.png")
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    # Order in the class: 00.png, aa.png, zz.png (written in the order 00, zz, aa).
    assert int(dataset.train_images[1, 0, 0, 0]) == 100
    assert int(dataset.train_images[2, 0, 0, 0]) == 200
    assert dataset.train_labels[:3].tolist() == [0, 0, 0]


def test_progress_reports_decoding_counts(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 2, "test": 1})
    messages = []
    load_cifar10(tmp_path / "imgs", tmp_path / "cache", progress=messages.append)
    assert "decoding train: 20/20" in messages
    assert "decoding test: 10/10" in messages


def test_second_load_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "imgs", {"train": 2, "test": 1})
    first = load_cifar10(tmp_path / "imgs", tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data_sources, "decode_image_folder", refuse)
    second = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    assert second.classes == first.classes
    assert second.source == first.source


def test_cache_is_npy_and_json_readable_without_pickle(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 2, "test": 1})
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["meta.json", "test_images.npy", "test_labels.npy",
                     "train_images.npy", "train_labels.npy"]
    images = np.load(folder / "train_images.npy", allow_pickle=False)
    labels = np.load(folder / "train_labels.npy", allow_pickle=False)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, dataset.train_images.numpy())


def test_adding_a_file_invalidates_the_cache(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 2, "test": 1})
    assert len(load_cifar10(tmp_path / "imgs", tmp_path / "cache").train_labels) == 20
    Image.fromarray(_pixels(99)).save(tmp_path / "imgs" / "train" / "cat" / "99.png")
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert dataset.train_labels[:9].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]  # cat is label 3
    np.testing.assert_array_equal(dataset.train_images[8].numpy(),
                                  _pixels(99).transpose(2, 0, 1))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # same source, one cache folder


def test_rewritten_file_invalidates_the_cache(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    target = tmp_path / "imgs" / "train" / "bird" / "00.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    os.utime(target, ns=(10**18, 10**18))  # a newer mtime even on coarse-clock file systems
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert int(dataset.train_images[2].sum()) == 0  # bird: label 2, the third image


def test_damaged_cache_is_rebuilt(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    first = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    (folder / "train_images.npy").write_bytes(b"not an npy file")
    messages = []
    second = load_cifar10(tmp_path / "imgs", tmp_path / "cache", progress=messages.append)
    assert torch.equal(first.train_images, second.train_images)
    assert any("corrupt" in message and "rebuilding" in message for message in messages)


def _cached_once(tmp_path) -> tuple[Dataset, Path]:
    """A tiny image folder loaded once; (dataset, its cache folder)."""
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    return dataset, folder


def _reload_reports(tmp_path) -> tuple[Dataset, list[str]]:
    messages = []
    dataset = load_cifar10(tmp_path / "imgs", tmp_path / "cache", progress=messages.append)
    return dataset, messages


def test_cache_records_a_sha256_per_array(tmp_path):
    dataset, folder = _cached_once(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert sorted(meta["sha256"]) == sorted(data_cache._CACHE_ARRAYS)
    labels = dataset.test_labels.numpy()
    expected = hashlib.sha256(f"<i8 {labels.shape}\n".encode() + labels.tobytes()).hexdigest()
    assert meta["sha256"]["test_labels"] == expected


def test_altered_cached_array_is_detected_and_rebuilt(tmp_path):
    first, folder = _cached_once(tmp_path)
    path = folder / "test_images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one pixel changed, same size, still a valid .npy
    path.write_bytes(bytes(raw))
    second, messages = _reload_reports(tmp_path)
    assert torch.equal(first.test_images, second.test_images)
    assert any("corrupt" in m and "test_images.npy does not match the SHA-256" in m for m in messages)
    assert np.array_equal(np.load(path), first.test_images.numpy())  # and the cache is repaired


def test_truncated_cached_array_is_rebuilt(tmp_path):
    first, folder = _cached_once(tmp_path)
    path = folder / "train_labels.npy"
    path.write_bytes(path.read_bytes()[:-8])
    second, messages = _reload_reports(tmp_path)
    assert torch.equal(first.train_labels, second.train_labels)
    assert any("corrupt" in m and "rebuilding" in m for m in messages)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000])
def test_cache_meta_that_is_not_a_json_object_is_rebuilt(tmp_path, text):
    first, folder = _cached_once(tmp_path)
    (folder / "meta.json").write_text(text)
    second, messages = _reload_reports(tmp_path)
    assert torch.equal(first.train_images, second.train_images)
    assert any("corrupt" in m for m in messages)
    assert json.loads((folder / "meta.json").read_text())["sha256"]


def _dead_pid() -> int:
    """The id of a process that has exited (a killed intq run's, for naming its temporaries)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_killed_decodes_temporaries_are_removed_before_the_cache_is_written(tmp_path):
    _, folder = _cached_once(tmp_path)
    stale = folder / f".train_images.npy.{_dead_pid()}.k1ll3d00.tmp"
    live = folder / f".train_images.npy.{os.getpid()}.w0rk1ng0.tmp"
    stale.write_bytes(b"half an array")
    live.write_bytes(b"another process, still writing")
    (folder / "meta.json").unlink()  # the killed run had removed it: the next load rewrites
    load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert not stale.exists() and live.exists()


def test_layout_found_one_folder_down(tmp_path):
    make_image_folder(tmp_path / "data" / "cifar10-jpeg", {"train": 1, "test": 1})
    dataset = load_cifar10(tmp_path / "data", tmp_path / "cache")
    assert dataset.classes == SORTED_CLASSES


def test_command_line_data_defaults_to_intq_data(tmp_path, monkeypatch):
    from intq.cli import parser

    monkeypatch.setenv("INTQ_DATA", str(tmp_path / "elsewhere"))
    assert parser().parse_args(["eval", "model.npz"]).data == str(tmp_path / "elsewhere")
    monkeypatch.delenv("INTQ_DATA")
    assert parser().parse_args(["eval", "model.npz"]).data is None


def test_data_dir_none_uses_dot_data_whatever_intq_data_says(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "data", {"train": 1, "test": 1})
    monkeypatch.setenv("INTQ_DATA", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    dataset = load_cifar10(None, tmp_path / "cache")
    assert str(tmp_path / "data") in dataset.source


# ---- image folder errors --------------------------------------------------------------------

def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="no such folder") as caught:
        load_cifar10(tmp_path / "nowhere", tmp_path / "cache")
    assert str(tmp_path / "nowhere") in str(caught.value)


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty") as caught:
        load_cifar10(tmp_path / "empty", tmp_path / "cache")
    assert str(tmp_path / "empty") in str(caught.value)


def test_unrecognised_folder_is_named(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no CIFAR-10 layout") as caught:
        load_cifar10(tmp_path / "junk", tmp_path / "cache")
    assert str(tmp_path / "junk") in str(caught.value)


def test_error_messages_are_one_line_and_say_how_to_point_at_data(tmp_path):
    with pytest.raises(DataError) as caught:
        load_cifar10(tmp_path / "nowhere", tmp_path / "cache")
    message = str(caught.value)
    assert "\n" not in message
    assert "--data DIR" in message and "INTQ_DATA" in message
    assert "cifar-10-batches-py" in message and "train/<class>" in message


def test_wrong_image_size_names_the_file(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    bad = tmp_path / "imgs" / "test" / "cat" / "big.png"
    Image.fromarray(np.zeros((40, 33, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match="33x40") as caught:
        load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert str(bad) in str(caught.value)


def test_unreadable_image_names_the_file(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    bad = tmp_path / "imgs" / "train" / "bird" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(DataError, match="cannot read image") as caught:
        load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert str(bad) in str(caught.value)


def test_class_folder_without_images_is_named(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    for image in (tmp_path / "imgs" / "test" / "bird").iterdir():
        image.unlink()
    (tmp_path / "imgs" / "test" / "bird" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no") as caught:
        load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert str(tmp_path / "imgs" / "test" / "bird") in str(caught.value)


def test_an_extra_class_folder_in_test_is_refused(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    (tmp_path / "imgs" / "test" / "dogs").mkdir()
    with pytest.raises(DataError, match="unexpected \\['dogs'\\]") as caught:
        load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    assert str(tmp_path / "imgs" / "test") in str(caught.value)


def test_renamed_class_folders_are_refused_not_relabelled(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    for old, new in (("cat", "Cat"), ("dog", "doggo"), ("frog", "zfrog")):
        (tmp_path / "imgs" / "train" / old).rename(tmp_path / "imgs" / "train" / new)
    with pytest.raises(DataError) as caught:
        load_cifar10(tmp_path / "imgs", tmp_path / "cache")
    message = str(caught.value)
    assert "missing ['cat', 'dog', 'frog']; unexpected ['Cat', 'doggo', 'zfrog']" in message
    assert str(tmp_path / "imgs" / "train") in message and "\n" not in message


def test_missing_class_folders_are_refused(tmp_path):
    make_image_folder(tmp_path / "imgs", {"train": 1, "test": 1})
    for name in ("ship", "truck"):
        for image in (tmp_path / "imgs" / "test" / name).iterdir():
            image.unlink()
        (tmp_path / "imgs" / "test" / name).rmdir()
    with pytest.raises(DataError, match="not CIFAR-10's ten \\(missing \\['ship', 'truck'\\]\\)"):
        load_cifar10(tmp_path / "imgs", tmp_path / "cache")


# ---- cifar-10-batches-py --------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_batches_folder_loads_in_chw_layout(tmp_path, protocol):
    written = make_batches_folder(tmp_path / "cifar-10-batches-py", protocol=protocol)
    dataset = load_cifar10(tmp_path, tmp_path / "cache")
    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train_images.shape == (20, 3, 32, 32)
    assert dataset.test_images.shape == (4, 3, 32, 32)
    rows, labels = written["test_batch"]
    assert dataset.test_labels.tolist() == labels
    image = dataset.test_images[1].numpy()
    # A CIFAR row is 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    assert image[0, 0, 0] == rows[1, 0]
    assert image[0, 0, 1] == rows[1, 1]
    assert image[0, 1, 0] == rows[1, 32]
    assert image[1, 0, 0] == rows[1, 1024]
    assert image[2, 31, 31] == rows[1, 3071]
    expected_train = np.concatenate([written[name][0] for name in data_sources._TRAIN_BATCHES])
    np.testing.assert_array_equal(dataset.train_images.reshape(20, 3072).numpy(), expected_train)


def test_python2_pickles_like_the_official_download_load(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = make_batches_folder(folder)
    rows = np.random.default_rng(3).integers(0, 256, size=(4, 3072), dtype=np.uint8)
    (folder / "data_batch_2").write_bytes(py2_batch_pickle(rows, [2, 0, 1, 2]))
    (folder / "batches.meta").write_bytes(py2_meta_pickle([name.encode() for name in CIFAR10_CLASSES]))
    dataset = load_cifar10(tmp_path, tmp_path / "cache")
    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train_labels[4:8].tolist() == [2, 0, 1, 2]
    np.testing.assert_array_equal(dataset.train_images[4:8].reshape(4, 3072).numpy(), rows)
    np.testing.assert_array_equal(dataset.train_images[:4].reshape(4, 3072).numpy(),
                                  written["data_batch_1"][0])


def test_batches_folder_given_directly(tmp_path):
    make_batches_folder(tmp_path / "batches")
    dataset = load_cifar10(tmp_path / "batches", tmp_path / "cache")
    assert len(dataset.train_labels) == 20
    assert "python batches" in dataset.source


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    make_batches_folder(tmp_path / "batches")
    marker = tmp_path / "pwned"
    with open(tmp_path / "batches" / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": _RunsShell(marker), b"labels": []}, handle, protocol=2)
    with pytest.raises(DataError, match="refusing") as caught:
        load_cifar10(tmp_path / "batches", tmp_path / "cache")
    assert "data_batch_3" in str(caught.value)
    assert not marker.exists()


def test_malicious_meta_is_refused(tmp_path):
    make_batches_folder(tmp_path / "batches")
    marker = tmp_path / "pwned"
    with open(tmp_path / "batches" / "batches.meta", "wb") as handle:
        pickle.dump(_RunsShell(marker), handle)
    with pytest.raises(DataError, match="posix.system|os.system|nt.system"):
        load_cifar10(tmp_path / "batches", tmp_path / "cache")
    assert not marker.exists()


def test_batches_meta_with_other_class_names_is_refused(tmp_path):
    make_batches_folder(tmp_path / "batches")
    (tmp_path / "batches" / "batches.meta").write_bytes(py2_meta_pickle([b"plane", b"car", b"bird"]))
    with pytest.raises(DataError, match="lists the classes \\[plane, car, bird\\], not CIFAR-10's ten"):
        load_cifar10(tmp_path / "batches", tmp_path / "cache")


def test_missing_batch_file_is_named(tmp_path):
    make_batches_folder(tmp_path / "batches")
    (tmp_path / "batches" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar10(tmp_path / "batches", tmp_path / "cache")


def test_damaged_batch_file_is_named(tmp_path):
    make_batches_folder(tmp_path / "batches")
    (tmp_path / "batches" / "test_batch").write_bytes(b"\x80\x02}q\x00(truncated")
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tmp_path / "batches", tmp_path / "cache")


def _make_archive(folder: Path) -> Path:
    """A cifar-10-python.tar.gz holding a fake cifar-10-batches-py folder."""
    make_batches_folder(folder / "staging" / "cifar-10-batches-py")
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_archive_with_matching_md5_is_extracted_and_loaded(tmp_path, monkeypatch):
    archive = _make_archive(tmp_path / "build")
    (tmp_path / "data").mkdir()
    archive = archive.rename(tmp_path / "data" / archive.name)
    monkeypatch.setattr(data_sources, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    dataset = load_cifar10(tmp_path / "data", tmp_path / "cache")
    assert len(dataset.test_labels) == 4
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []


def test_archive_with_wrong_md5_is_refused(tmp_path):
    archive = _make_archive(tmp_path)
    with pytest.raises(DataError, match="md5") as caught:
        load_cifar10(tmp_path, tmp_path / "cache")
    assert str(archive) in str(caught.value)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(data_sources.urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="could not download") as caught:
        load_cifar10(None, tmp_path / "cache", download=True)
    assert str(tmp_path / "data") in str(caught.value)
    assert list((tmp_path / "data").iterdir()) == []  # no half-written archive left behind


def test_download_with_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources.urllib.request, "urlopen",
                        lambda *args, **kwargs: io.BytesIO(b"not the archive"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="corrupt"):
        load_cifar10(None, tmp_path / "cache", download=True)
    assert list((tmp_path / "data").iterdir()) == []


def _no_network(*args, **kwargs):
    raise AssertionError("a named data folder must never start a download")


def test_named_folder_that_does_not_exist_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources.urllib.request, "urlopen", _no_network)
    with pytest.raises(DataError, match="no such folder") as caught:
        load_cifar10(tmp_path / "typo", tmp_path / "cache", download=True)
    assert str(tmp_path / "typo") in str(caught.value)
    assert not (tmp_path / "typo").exists()


def test_named_empty_folder_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources.urllib.request, "urlopen", _no_network)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_cifar10(tmp_path / "empty", tmp_path / "cache", download=True)
    assert list((tmp_path / "empty").iterdir()) == []


# ---- Dataset, normalize, batches ------------------------------------------------------------

def test_dataset_refuses_wrong_dtype():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.float32)
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(DataError, match="uint8"):
        Dataset(images, labels, images.to(torch.uint8), labels, ("a",), "test")


def test_normalize_worked_values():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32
    assert y[0].item() == -1.0
    assert y[2].item() == 1.0
    assert y[1].item() == pytest.approx(-0.6, abs=1e-6)


def test_normalize_refuses_float_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(3))


def test_batches_cover_every_item_once_as_views():
    images = torch.arange(10 * 3 * 32 * 32).reshape(10, 3, 32, 32).to(torch.uint8)
    labels = torch.arange(10)
    pieces = list(batches(images, labels, 4))
    assert [len(piece_labels) for _, piece_labels in pieces] == [4, 4, 2]
    assert torch.cat([piece_labels for _, piece_labels in pieces]).tolist() == list(range(10))
    assert torch.equal(torch.cat([piece for piece, _ in pieces]), images)
    assert pieces[1][0].data_ptr() == images[4].data_ptr()  # a view, not a copy


def test_batches_refuses_zero_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(torch.zeros(2, 3, 32, 32), torch.zeros(2), 0))


# ---- the real data --------------------------------------------------------------------------

def _shared_cifar10() -> Path | None:
    """The shared CIFAR-10 folder: $INTQ_DATA if it exists, else the JPEG copy, else None."""
    for candidate in (os.environ.get("INTQ_DATA"), SHARED_JPEG):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.mark.integration
@pytest.mark.skipif(_shared_cifar10() is None, reason="shared CIFAR-10 folder not present")
def test_shared_cifar10_loads_completely(tmp_path):
    dataset = load_cifar10(_shared_cifar10(), tmp_path / "cache")
    assert dataset.classes == ("airplane", "automobile", "bird", "cat", "deer",
                               "dog", "frog", "horse", "ship", "truck")
    assert dataset.train_images.shape == (50000, 3, 32, 32)
    assert dataset.test_images.shape == (10000, 3, 32, 32)
    assert dataset.train_labels.bincount().tolist() == [5000] * 10
    assert dataset.test_labels.bincount().tolist() == [1000] * 10
    again = load_cifar10(_shared_cifar10(), tmp_path / "cache")
    assert torch.equal(again.test_images, dataset.test_images)
