"""The input specification: any per-channel preprocessing and image size, the same integers on
every executor (docs/math.md eqs. 25-28)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from intq.arith.preprocessing import (STUDY_PREPROCESSING, Preprocessing, PreprocessingError, input_table,
                                      narrowest_type)
from intq.arith.qparams import IntType, QParams
from intq.executors.reference import ExecutionError, run_integer
from intq.executors.verify import verify
from intq.graph.capture import capture
from intq.graph.config import RECOMMENDED, STUDY
from intq.graph.convert import collect_statistics, convert

CIFAR = Preprocessing((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
IMAGENET = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
UNIT = Preprocessing((0.0,), (1.0,))  # ToTensor's [0, 1]


def test_the_study_normalisation_has_the_exact_form_2p_minus_255():
    qparams, u = STUDY_PREPROCESSING.exact_form(3)
    assert qparams.dtype == IntType(9, True) and float(qparams.scale) == 1.0 / 255.0 and int(qparams.zero_point) == 0
    assert np.array_equal(u[1], 2 * np.arange(256) - 255)


def test_unit_range_has_the_exact_form_p_itself():
    qparams, u = UNIT.exact_form(1)
    assert qparams.dtype == IntType(8, False) and np.array_equal(u[0], np.arange(256))


@pytest.mark.parametrize("preprocessing", [CIFAR, IMAGENET])
def test_mean_std_without_an_exact_form_gets_a_fine_input_within_an_eighth_of_a_pixel_step(preprocessing):
    assert preprocessing.exact_form(3) is None
    qparams = preprocessing.fine_qparams(3)
    table = input_table(preprocessing, qparams, 3)
    a, b = preprocessing.affine_terms(3)
    x = a[:, None] * np.arange(256)[None, :] + b[:, None]
    error = np.abs(table * float(qparams.scale) - x)
    assert error.max() <= float(qparams.scale) / 2 + 1e-12 and error.max() <= a.min() / 8 + 1e-12
    assert qparams.dtype.bits <= 12


def test_a_requantized_exact_form_uses_the_fixed_point_multiplier_of_eq_14():
    """The study preset's table: 2p - 255 requantized with M = (1/255) / s, as before the input spec."""
    qparams = QParams(np.array(0.0079), np.array(-3, np.int64), IntType(8, True))
    table = input_table(STUDY_PREPROCESSING, qparams, 3)
    float_table = np.clip(np.floor((2 * np.arange(256) - 255) / 255 / 0.0079 + 0.5) - 3, -128, 127)
    assert np.abs(table[0] - float_table).max() <= 1 and table.shape == (3, 256)


def test_apply_matches_torchvision_to_tensor_then_normalize():
    pixels = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET.mean).reshape(1, 3, 1, 1), torch.tensor(IMAGENET.std).reshape(1, 3, 1, 1)
    assert torch.equal(IMAGENET.apply(pixels), (pixels.float() / 255 - mean) / std)


def test_an_affine_preprocessing_is_a_mean_and_std():
    affine = Preprocessing.affine(2 / 255, -1.0)
    assert affine.mean == pytest.approx((0.5,)) and affine.std == pytest.approx((0.5,))


@pytest.mark.parametrize("mean, std, message", [
    ((0.5,), (0.0,), "std must be above 0"),
    ((0.5, 0.5), (0.5, 0.5, 0.5), "mean has 2 values and std 3"),
    ((float("nan"),), (0.5,), "mean must be 1 to 4096 finite numbers"),
    (("a",), (0.5,), "mean must be numbers"),
])
def test_bad_preprocessing_is_one_line(mean, std, message):
    with pytest.raises(PreprocessingError, match=message) as error:
        Preprocessing(mean, std)
    assert "\n" not in str(error.value)


def test_three_channel_preprocessing_on_one_channel_images_is_refused():
    with pytest.raises(PreprocessingError, match="names 3 channels .* the images have 1"):
        CIFAR.apply(torch.zeros((1, 1, 4, 4), dtype=torch.uint8))


def test_narrowest_type():
    assert narrowest_type(-255, 255) == IntType(9, True) and narrowest_type(0, 255) == IntType(8, False)
    assert narrowest_type(0, 1 << 17) is None


class SmallNet(nn.Module):
    """Any channel count and image size: conv, max-pool, conv, global average pool, linear."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv2(x))), 1))


def _model(channels, side, preprocessing, config):
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (24, channels, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    graph = capture(SmallNet(channels).eval(), pixels[:2], preprocessing)
    return convert(graph, collect_statistics(graph, [pixels]), config), pixels


CASES = [(3, 32, CIFAR, RECOMMENDED), (3, 32, CIFAR, STUDY), (1, 28, Preprocessing((0.1307,), (0.3081,)), RECOMMENDED),
         (3, 64, IMAGENET, STUDY), (3, 20, UNIT, RECOMMENDED), (1, 28, STUDY_PREPROCESSING, STUDY)]


@pytest.mark.parametrize("channels, side, preprocessing, config", CASES,
                         ids=[f"{c}x{s}x{s}-{p.mean[0]}-{cfg.name}" for c, s, p, cfg in CASES])
def test_every_executor_gives_the_reference_integers_on_any_input(channels, side, preprocessing, config):
    pytest.importorskip("onnxruntime")
    model, pixels = _model(channels, side, preprocessing, config)
    assert model.input.shape == (channels, side, side)
    rows = verify(model, pixels[:6], ("c", "onnx_exact", "onnx", "torch_quantized"))
    assert rows["c"]["differing_share"] == 0 and rows["onnx_exact"]["differing_share"] == 0
    assert rows["onnx"]["max_lsb"] <= 1 and rows["torch_quantized"]["max_lsb"] <= 1


def test_the_integer_model_reads_pixels_through_the_per_channel_table():
    model, pixels = _model(3, 32, CIFAR, STUDY)
    table = model.input.table
    assert table.shape == (3, 256) and not np.array_equal(table[0], table[2])  # channel by channel
    seen = {}
    run_integer(model, pixels[:1], lambda name, q: seen.setdefault(name, q))
    expected = torch.stack([torch.from_numpy(table[c])[pixels[0, c].long()] for c in range(3)])
    assert torch.equal(seen[model.input_name][0].long(), expected)


def test_an_image_of_another_size_is_refused_naming_both():
    model, _ = _model(1, 28, STUDY_PREPROCESSING, STUDY)
    with pytest.raises(ExecutionError, match=r"takes images of shape \(1, 28, 28\).*got \(1, 32, 32\)"):
        run_integer(model, torch.zeros((1, 1, 32, 32), dtype=torch.uint8))
