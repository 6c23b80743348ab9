"""intq.quantize, the one-call API: every accepted form of calibration data gives the same integer
model as uint8 pixels, and every refused form is one line naming what was given."""
import io
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import intq
from intq.graph.model_file import to_arrays
from intq.workflows.quantize_api import DataInputError, ProgressLine, QuantizeError

CIFAR = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.243, 0.261)}
README_SNIPPET = """\
import intq
from torch.utils.data import DataLoader
loader = DataLoader(my_dataset, batch_size=256)            # yields (images, labels)
int_model = intq.quantize(model, loader, input={"mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.243, 0.261)})
intq.save(int_model, "model.npz")
logits = intq.run_integer(int_model, uint8_images)
"""


class Small(nn.Module):
    """conv-relu-maxpool-conv-relu-global average-linear: runs on any (C, H, W) with H, W >= 2."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def small_model(channels: int = 3) -> Small:
    torch.manual_seed(0)
    return Small(channels)


def pixels(count: int, shape=(3, 16, 16), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator)


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    """torchvision's ToTensor + Normalize on uint8 (N, C, H, W): (p/255 - mean) / std in float32."""
    mean = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


def assert_same_model(a: intq.IntegerModel, b: intq.IntegerModel) -> None:
    """Every array of the two model files, metadata included, is identical."""
    arrays_a, arrays_b = to_arrays(a), to_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        assert np.array_equal(arrays_a[name], arrays_b[name]), name


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def reference():
    """The model calibrated on 64 uint8 images under CIFAR's mean/std, and those images."""
    images = pixels(64)
    return intq.quantize(small_model(), images, input=CIFAR), images


# ------------------------------------------------------------------------------- accepted forms

def test_uint8_tensor_gives_a_model_with_its_metadata(reference):
    model, images = reference
    assert model.metadata["api"] == "intq.quantize"
    assert model.metadata["calibration_images"] == 64
    assert model.metadata["preset"] == "recommended"
    assert model.input.preprocessing == intq.Preprocessing(CIFAR["mean"], CIFAR["std"])
    assert intq.run_integer(model, images).shape == (64, 5)


def test_float_images_under_the_declared_input_give_the_same_model(reference):
    model, images = reference
    floats = normalised(images, CIFAR["mean"], CIFAR["std"])
    assert_same_model(intq.quantize(small_model(), floats, input=CIFAR), model)


@pytest.mark.parametrize("form", ["numpy", "list", "generator", "tuple input", "preprocessing input"])
def test_other_forms_give_the_same_model(reference, form):
    model, images = reference
    data, declared = images, CIFAR
    if form == "numpy":
        data = images.numpy()
    elif form == "list":
        data = [images[:20], images[20:50], images[50:]]
    elif form == "generator":
        data = (images[start : start + 10] for start in range(0, 64, 10))
    elif form == "tuple input":
        declared = (CIFAR["mean"], CIFAR["std"])
    else:
        declared = intq.Preprocessing(CIFAR["mean"], CIFAR["std"])
    assert_same_model(intq.quantize(small_model(), data, input=declared), model)


def test_dataloader_of_image_label_pairs(reference):
    """The case that crashed before (AttributeError on the [images, labels] list)."""
    model, images = reference
    loader = DataLoader(TensorDataset(images, torch.zeros(64, dtype=torch.int64)), batch_size=16)
    assert_same_model(intq.quantize(small_model(), loader, input=CIFAR), model)


class ImageLabelDataset(Dataset):
    """Single float images (C, H, W) with a label, as a torchvision dataset with Normalize gives them."""

    def __init__(self, images: torch.Tensor):
        self.images = normalised(images, CIFAR["mean"], CIFAR["std"])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index % 5


def test_dataset_of_single_images_is_batched(reference):
    model, images = reference
    assert_same_model(intq.quantize(small_model(), ImageLabelDataset(images), input=CIFAR), model)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64)])
def test_any_image_shape(shape):
    images = pixels(8, shape)
    model = intq.quantize(small_model(shape[0]), images)
    assert model.input.shape == shape
    assert intq.run_integer(model, images).shape == (8, 5)


def test_image_folder_path(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for index in range(3):
            image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)  # PIL's (H, W, C)
            image_module.fromarray(image).save(tmp_path / label / f"{index}.png")
    model = intq.quantize(small_model(), str(tmp_path), progress=False)
    assert model.metadata["calibration_images"] == 6
    assert model.input.shape == (3, 12, 10)


def test_config_by_name_and_user_metadata():
    model = intq.quantize(small_model(), pixels(16), config="study", metadata={"run": 7})
    assert model.metadata["preset"] == "study" and model.metadata["run"] == 7


def test_max_images_stops_reading():
    batches = (pixels(10, seed=seed) for seed in itertools.count())
    model = intq.quantize(small_model(), batches, max_images=25)  # an endless source
    assert model.metadata["calibration_images"] == 25
    assert next(batches).shape == (10, 3, 16, 16)  # the source was not read past the third batch


def test_nothing_is_printed_off_a_terminal(capsys):
    intq.quantize(small_model(), pixels(8), progress=True)
    assert capsys.readouterr() == ("", "")


def test_the_progress_line_is_rewritten_in_place():
    stream = io.StringIO()
    line = ProgressLine(stream)
    line.images(256)
    line.images(3000)  # within PROGRESS_INTERVAL of the first: shown by close
    line.close()
    assert stream.getvalue() == "\rcalibrating: 256 images\rcalibrating: 3,000 images\n"


def test_the_readme_snippet_runs_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = pixels(40)
    labels = torch.arange(40) % 5
    scope = {"my_dataset": TensorDataset(normalised(images, CIFAR["mean"], CIFAR["std"]), labels),
             "model": small_model(), "uint8_images": images}
    exec(README_SNIPPET, scope)
    assert scope["logits"].shape == (40, 5)
    assert_same_model(intq.load(tmp_path / "model.npz"), scope["int_model"])


# ------------------------------------------------------------------------------------ refusals

def test_cifar_normalised_floats_under_the_default_input_name_it():
    floats = normalised(pixels(8), CIFAR["mean"], CIFAR["std"])
    with pytest.raises(DataInputError) as error:
        intq.quantize(small_model(), floats)
    message = one_line(error)
    assert "mean 0.5, std 0.5" in message and "input=None declares the default" in message


def test_floats_off_the_pixel_grid():
    half_pixel = 0.5 / (255 * torch.tensor(CIFAR["std"])).reshape(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
    floats = normalised(pixels(8).clamp(max=254), CIFAR["mean"], CIFAR["std"]) + half_pixel
    with pytest.raises(DataInputError) as error:
        intq.quantize(small_model(), floats, input=CIFAR)
    assert "not a whole pixel" in one_line(error)


def test_a_3d_tensor_is_not_a_batch():
    with pytest.raises(DataInputError) as error:
        intq.quantize(small_model(), pixels(1)[0])
    assert "unsqueeze(0)" in one_line(error) and "(3, 16, 16)" in str(error.value)


def test_channels_last_numpy_is_not_guessed():
    with pytest.raises(DataInputError) as error:
        intq.quantize(small_model(), pixels(4).permute(0, 2, 3, 1).numpy())
    message = one_line(error)
    assert "numpy.ndarray uint8 (4, 16, 16, 3)" in message and "(N, C, H, W)" in message


def test_a_list_of_strings():
    with pytest.raises(DataInputError) as error:
        intq.quantize(small_model(), ["cat.png", "dog.png"])
    assert "batch 1 is str 'cat.png'" in one_line(error)


def test_an_empty_list():
    with pytest.raises(DataInputError) as error:
        intq.quantize(small_model(), [])
    assert "no images" in one_line(error)


def test_mixed_shapes_name_both():
    with pytest.raises(DataInputError) as error:
        intq.quantize(small_model(), [pixels(2), pixels(2, (3, 12, 12))])
    message = one_line(error)
    assert "(3, 12, 12)" in message and "(3, 16, 16)" in message


def test_a_dict_batch_is_refused():
    with pytest.raises(DataInputError) as error:
        intq.quantize(small_model(), [{"image": pixels(2), "label": 0}])
    assert "dict with keys image, label" in one_line(error)


def test_an_unknown_preset_lists_them():
    with pytest.raises(QuantizeError) as error:
        intq.quantize(small_model(), pixels(2), config="fast")
    assert "study, recommended, x86" in one_line(error)


@pytest.mark.parametrize("declared", [{"mean": 0.5}, (0.5,), "imagenet", {"mean": 0.5, "std": 0}])
def test_a_bad_input_declaration(declared):
    with pytest.raises(QuantizeError) as error:
        intq.quantize(small_model(), pixels(2), input=declared)
    assert one_line(error).startswith("input")


def test_a_bad_image_limit():
    with pytest.raises(QuantizeError) as error:
        intq.quantize(small_model(), pixels(2), max_images=0)
    assert "max_images" in one_line(error)
