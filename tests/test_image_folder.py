"""Tests for intq.data.image_folder (and the generic Dataset): a user's own image folder in its three
layouts, resizing, channel conversion and detection, the cache, and every bad input as one line.

Folders are built in tmp_path with PIL: a few 8x8 and 12x10 images, RGB and grayscale.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from intq.cifar.data import Dataset as CifarDataset
from intq.data import image_folder
from intq.data.dataset import DataError, Dataset
from intq.data.image_folder import load_image_folder


# ---- builders -------------------------------------------------------------------------------

def pixels(seed: int, mode: str = "RGB", width: int = 8, height: int = 8) -> np.ndarray:
    """Random uint8 pixels, (H, W, 3) for RGB or (H, W) for L."""
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def save(path: Path, array: np.ndarray) -> np.ndarray:
    """Write `array` as a lossless image at `path` (folders created); returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def chw(array: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) as the loader returns one image: (C, H, W)."""
    return np.atleast_3d(array).transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


def class_folders(root: Path, classes: dict[str, int], mode: str = "RGB", seed: int = 0) -> dict:
    """root/<class>/NN.png, `classes[name]` images each; returns {class: [arrays in file order]}."""
    written = {}
    for offset, (name, count) in enumerate(classes.items()):
        written[name] = [save(root / name / f"{index:02d}.png", pixels(seed + 10 * offset + index, mode))
                         for index in range(count)]
    return written


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    """The error's message, after checking it is one line that names `path`."""
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message, message
    return message


# ---- the three layouts ----------------------------------------------------------------------

def test_train_test_layout_labels_by_sorted_class_name(tmp_path):
    written = {split: class_folders(tmp_path / split, {"zebra": 2, "ant": 1, "Bee": 3}, seed=seed)
               for seed, split in ((0, "train"), (100, "test"))}
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ("Bee", "ant", "zebra")  # sorted() order, as torchvision's ImageFolder
    assert dataset.train_labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert dataset.test_labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert dataset.train_images.dtype == torch.uint8 and dataset.image_shape == (3, 8, 8)
    for split, images in (("train", dataset.train_images), ("test", dataset.test_images)):
        expected = [chw(a) for name in dataset.classes for a in written[split][name]]
        np.testing.assert_array_equal(images.numpy(), np.stack(expected))
    assert dataset.source == f"image folder {tmp_path}"


def test_class_folders_without_train_test_are_all_training_images(tmp_path):
    class_folders(tmp_path, {"dog": 2, "cat": 1})
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ("cat", "dog")
    assert dataset.train_labels.tolist() == [0, 1, 1]
    assert dataset.test_images.shape == (0, 3, 8, 8)
    assert dataset.test_labels.shape == (0,)


def test_flat_folder_is_one_unlabelled_class_for_calibration(tmp_path):
    first = save(tmp_path / "b.png", pixels(1))
    second = save(tmp_path / "a.png", pixels(2))
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ("unlabelled",)
    assert dataset.train_labels.tolist() == [0, 0]
    np.testing.assert_array_equal(dataset.train_images.numpy(), np.stack([chw(second), chw(first)]))
    assert dataset.test_images.shape == (0, 3, 8, 8)


def test_image_suffixes_any_case_hidden_and_other_files_ignored(tmp_path):
    save(tmp_path / "c" / "1.PNG", pixels(1))
    Image.fromarray(pixels(2)).save(tmp_path / "c" / "2.bmp")
    Image.fromarray(pixels(3)).save(tmp_path / "c" / "3.Jpeg")
    save(tmp_path / "c" / ".hidden.png", pixels(4))
    (tmp_path / "c" / "notes.txt").write_text("not an image")
    save(tmp_path / ".thumbnails" / "x.png", pixels(5))
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ("c",)
    assert len(dataset.train_labels) == 3


# ---- size and channels ----------------------------------------------------------------------

def test_size_resizes_every_image_to_height_width(tmp_path):
    save(tmp_path / "a" / "small.png", pixels(1, width=8, height=8))
    save(tmp_path / "a" / "wide.png", pixels(2, width=12, height=10))
    save(tmp_path / "b" / "flat.png", np.full((10, 12, 3), (200, 100, 50), np.uint8))
    dataset = load_image_folder(tmp_path, size=(5, 7))
    assert dataset.train_images.shape == (3, 3, 5, 7)
    flat = dataset.train_images[2].numpy()
    np.testing.assert_array_equal(flat, np.broadcast_to(np.array([200, 100, 50]).reshape(3, 1, 1), (3, 5, 7)))


def test_size_matches_pil_bilinear_after_conversion(tmp_path):
    array = save(tmp_path / "x.png", pixels(3, width=12, height=10))
    dataset = load_image_folder(tmp_path, size=(4, 6), channels=1)
    expected = Image.fromarray(array).convert("L").resize((6, 4), Image.BILINEAR)
    np.testing.assert_array_equal(dataset.train_images[0, 0].numpy(), np.asarray(expected))


def test_channels_1_converts_rgb_as_pil_does(tmp_path):
    save(tmp_path / "x.png", np.full((8, 8, 3), (10, 20, 30), np.uint8))
    dataset = load_image_folder(tmp_path, channels=1)
    expected = Image.new("RGB", (1, 1), (10, 20, 30)).convert("L").getpixel((0, 0))
    assert dataset.image_shape == (1, 8, 8)
    assert dataset.train_images.unique().tolist() == [expected]


def test_channels_3_copies_a_gray_value_into_all_three(tmp_path):
    save(tmp_path / "x.png", np.full((8, 8), 77, np.uint8))
    dataset = load_image_folder(tmp_path, channels=3)
    assert dataset.image_shape == (3, 8, 8)
    assert dataset.train_images.unique().tolist() == [77]


def test_all_grayscale_folder_is_read_with_one_channel(tmp_path):
    written = class_folders(tmp_path, {"a": 2, "b": 1}, mode="L")
    Image.fromarray(pixels(9, "L") > 127).save(tmp_path / "b" / "bilevel.png")  # mode "1"
    dataset = load_image_folder(tmp_path)
    assert dataset.image_shape == (1, 8, 8)
    np.testing.assert_array_equal(dataset.train_images[0, 0].numpy(), written["a"][0])
    assert set(dataset.train_images[3].unique().tolist()) == {0, 255}  # b/bilevel.png: "1" reads as 0, 255


def test_sixteen_bit_gray_counts_as_single_band_and_palette_as_colour(tmp_path):
    save(tmp_path / "a" / "deep.png", np.full((8, 8), 1000, np.uint16))  # mode "I;16"
    assert load_image_folder(tmp_path).image_shape == (1, 8, 8)
    Image.fromarray(pixels(1, "L")).convert("P").save(tmp_path / "a" / "palette.png")
    assert load_image_folder(tmp_path).image_shape == (3, 8, 8)


def test_one_rgb_image_after_gray_ones_makes_every_image_rgb(tmp_path):
    gray = save(tmp_path / "a.png", pixels(1, "L"))
    save(tmp_path / "b.png", pixels(2, "L"))
    colour = save(tmp_path / "c.png", pixels(3))
    dataset = load_image_folder(tmp_path)
    assert dataset.image_shape == (3, 8, 8)
    np.testing.assert_array_equal(dataset.train_images[0].numpy(), np.stack([gray] * 3))
    np.testing.assert_array_equal(dataset.train_images[2].numpy(), chw(colour))


def test_gray_train_beside_rgb_test_are_both_rgb(tmp_path):
    class_folders(tmp_path / "train", {"a": 2}, mode="L")
    class_folders(tmp_path / "test", {"a": 1}, mode="RGB")
    dataset = load_image_folder(tmp_path)
    assert dataset.train_images.shape == (2, 3, 8, 8)
    assert dataset.test_images.shape == (1, 3, 8, 8)
    assert torch.equal(dataset.train_images[:, 0], dataset.train_images[:, 2])


def test_progress_reports_decoding_counts(tmp_path):
    class_folders(tmp_path / "train", {"a": 2, "b": 1})
    class_folders(tmp_path / "test", {"a": 1, "b": 1})
    messages = []
    load_image_folder(tmp_path, progress=messages.append)
    assert messages == ["decoding train: 3/3", "decoding test: 2/2"]


# ---- the cache ------------------------------------------------------------------------------

def test_second_load_reads_the_cache(tmp_path):
    class_folders(tmp_path / "data", {"a": 2, "b": 1})
    first_messages, second_messages = [], []
    first = load_image_folder(tmp_path / "data", size=(4, 4), cache_dir=tmp_path / "cache",
                              progress=first_messages.append)
    second = load_image_folder(tmp_path / "data", size=(4, 4), cache_dir=tmp_path / "cache",
                               progress=second_messages.append)
    assert any(message.startswith("decoding train") for message in first_messages)
    (line,) = second_messages
    assert line.startswith(f"loaded image folder {tmp_path / 'data'} from cache {tmp_path / 'cache'}")
    assert torch.equal(first.train_images, second.train_images)
    assert second.classes == first.classes and second.test_images.shape == (0, 3, 4, 4)


def test_each_size_and_channel_count_has_its_own_cache(tmp_path):
    class_folders(tmp_path / "data", {"a": 1})
    for size, channels in (((4, 4), 1), ((4, 4), 3), ((5, 5), 1)):
        load_image_folder(tmp_path / "data", size=size, channels=channels, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 3
    messages = []
    dataset = load_image_folder(tmp_path / "data", size=(4, 4), channels=3, cache_dir=tmp_path / "cache",
                                progress=messages.append)
    assert dataset.image_shape == (3, 4, 4) and "from cache" in messages[0]


def test_a_tampered_cache_array_is_detected_and_rebuilt(tmp_path):
    class_folders(tmp_path / "data", {"a": 2})
    first = load_image_folder(tmp_path / "data", cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    raw = bytearray((folder / "train_images.npy").read_bytes())
    raw[-1] ^= 0xFF  # one pixel changed, still a valid .npy
    (folder / "train_images.npy").write_bytes(bytes(raw))
    messages = []
    second = load_image_folder(tmp_path / "data", cache_dir=tmp_path / "cache", progress=messages.append)
    assert torch.equal(first.train_images, second.train_images)
    assert any("corrupt" in m and "train_images.npy does not match the SHA-256" in m for m in messages)
    assert np.array_equal(np.load(folder / "train_images.npy"), first.train_images.numpy())


def test_an_added_image_invalidates_the_cache(tmp_path):
    class_folders(tmp_path / "data", {"a": 1})
    load_image_folder(tmp_path / "data", cache_dir=tmp_path / "cache")
    save(tmp_path / "data" / "a" / "99.png", pixels(99))
    messages = []
    dataset = load_image_folder(tmp_path / "data", cache_dir=tmp_path / "cache", progress=messages.append)
    assert len(dataset.train_labels) == 2
    assert "out of date" in messages[0]


# ---- bad input, one line each ---------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder") as caught:
        load_image_folder(tmp_path / "nowhere")
    one_line_naming(caught, tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="holds no images") as caught:
        load_image_folder(tmp_path)
    one_line_naming(caught, tmp_path)


def test_class_folder_without_images(tmp_path):
    class_folders(tmp_path, {"a": 1})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images") as caught:
        load_image_folder(tmp_path)
    one_line_naming(caught, tmp_path / "b")


def test_mixed_sizes_without_size_name_both_files(tmp_path):
    save(tmp_path / "a.png", pixels(1, width=8, height=8))
    save(tmp_path / "b.png", pixels(2, width=12, height=10))
    with pytest.raises(DataError, match="pass --size") as caught:
        load_image_folder(tmp_path)
    message = one_line_naming(caught, tmp_path / "a.png")
    assert f"{tmp_path / 'b.png'} is 12x10" in message and "is 8x8" in message


def test_test_classes_differing_from_train(tmp_path):
    class_folders(tmp_path / "train", {"cat": 1, "dog": 1})
    class_folders(tmp_path / "test", {"cat": 1, "dogs": 1})
    with pytest.raises(DataError, match=r"missing \['dog'\]; unexpected \['dogs'\]") as caught:
        load_image_folder(tmp_path)
    one_line_naming(caught, tmp_path / "test")


def test_train_without_test(tmp_path):
    class_folders(tmp_path / "train", {"cat": 1})
    with pytest.raises(DataError, match="no test/") as caught:
        load_image_folder(tmp_path)
    one_line_naming(caught, tmp_path)


def test_loose_images_beside_class_folders(tmp_path):
    class_folders(tmp_path, {"cat": 1})
    save(tmp_path / "stray.png", pixels(1))
    with pytest.raises(DataError, match="loose images") as caught:
        load_image_folder(tmp_path)
    one_line_naming(caught, tmp_path)


def test_damaged_image_is_named(tmp_path):
    class_folders(tmp_path, {"cat": 2})
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(DataError, match="cannot read image") as caught:
        load_image_folder(tmp_path, size=(4, 4))
    one_line_naming(caught, tmp_path / "cat" / "broken.jpg")


@pytest.mark.parametrize("channels", [2, 0, 4, True])
def test_channels_other_than_1_or_3(tmp_path, channels):
    save(tmp_path / "a.png", pixels(1))
    with pytest.raises(DataError, match="1 \\(grayscale\\) or 3 \\(RGB\\)") as caught:
        load_image_folder(tmp_path, channels=channels)
    one_line_naming(caught, tmp_path)


@pytest.mark.parametrize("size", [(5000, 5000), (0, 8), (8,), (8.0, 8), "8x8"])
def test_absurd_size(tmp_path, size):
    save(tmp_path / "a.png", pixels(1))
    with pytest.raises(DataError, match="from 1 to 4096") as caught:
        load_image_folder(tmp_path, size=size)
    one_line_naming(caught, tmp_path)


def test_more_images_than_memory_allows_is_refused_before_decoding(tmp_path, monkeypatch):
    class_folders(tmp_path, {"a": 2})
    monkeypatch.setattr(image_folder, "MAX_BYTES", 1 << 20)
    monkeypatch.setattr(image_folder, "_decode_chunk", None)  # decoding would fail differently
    with pytest.raises(DataError, match=r"2 images of 3x300x1000 would need .* GiB of memory") as caught:
        load_image_folder(tmp_path, size=(300, 1000))
    one_line_naming(caught, tmp_path)


def test_an_image_over_4096_a_side_without_size(tmp_path):
    Image.new("L", (4097, 1)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="more than 4096 pixels a side; pass --size") as caught:
        load_image_folder(tmp_path)
    one_line_naming(caught, tmp_path / "a.png")


# ---- the Dataset ----------------------------------------------------------------------------

def _labels(count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.int64)


def test_dataset_accepts_one_channel_28x28_and_an_empty_test_split():
    images = torch.zeros(5, 1, 28, 28, dtype=torch.uint8)
    dataset = Dataset(images, _labels(5), images[:0], _labels(0), ("digit",), "synthetic")
    assert dataset.image_shape == (1, 28, 28)
    assert CifarDataset is Dataset  # the CIFAR modules re-export this one class


def test_dataset_refuses_mismatched_train_and_test_shapes():
    train = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    test = torch.zeros(2, 3, 28, 28, dtype=torch.uint8)
    with pytest.raises(DataError, match=r"\(1, 28, 28\) but test images are \(3, 28, 28\) in synthetic"):
        Dataset(train, _labels(2), test, _labels(2), ("a",), "synthetic")


@pytest.mark.parametrize("shape", [(2, 0, 8, 8), (2, 3, 8), (2, 1, 8, 0)])
def test_dataset_refuses_images_without_channels_height_or_width(shape):
    images = torch.zeros(shape, dtype=torch.uint8)
    with pytest.raises(DataError, match="uint8 \\(N, C, H, W\\) with C, H, W >= 1"):
        Dataset(images, _labels(2), images, _labels(2), ("a",), "synthetic")


def test_dataset_refuses_no_class_names():
    images = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(DataError, match="non-empty tuple of names"):
        Dataset(images, _labels(1), images, _labels(1), (), "synthetic")
