"""Learned rounding (issue 14, part 2): AdaRound layer by layer and BRECQ/QDrop block by block choose
floor or ceil of w/s for every weight on the range method's grid, and the result is an ordinary
IntegerModel. On small random models: each layer's (each block's) reconstruction error falls below
nearest rounding's, every code is floor or ceil of w/s, the same seed gives the same integers, c and
onnx_exact stay bit-exact, and bad options are one line."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import calibrated, make_pixels, round_tripped, write_image_folder
from hostile import run_cli
from intq.arith.qparams import dequantize
from intq.cifar.models import ARCHITECTURES
from intq.cifar.train import save_weights
from intq.executors.reference import run_integer
from intq.graph.capture import run_float
from intq.graph.config import RoundingConfig
from intq.graph.convert import ConversionError, convert
from intq.graph.integer_model import QLayer
from intq.graph.model_file import load
from intq.ptq.adaround import annealed_beta, initial_logits, rectified_sigmoid
from intq.ptq.reconstruction import learned_integer_model
from intq.workflows.sweep import SweepCell, cell_config
from test_lookup import exact_and_close

ITERATIONS = 500  # enough to move many choices on these small layers, a few seconds each


class Small(nn.Module):
    """Two convolutions with ReLUs and a linear head on 16x16 images: three layers judged one by one."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


class TwoBlocks(nn.Module):
    """A stem and two residual blocks (conv-ReLU-conv, identity shortcut, add, ReLU), pooled to a linear
    head, on 16x16 images: block reconstruction's units are the stem with the first block, and the
    second block with the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for first, second in (self.convs[:2], self.convs[2:]):
            x = F.relu(x + second(F.relu(first(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def smooth_pixels(count: int, seed: int) -> torch.Tensor:
    """Seeded random 4x4 images upsampled to 16x16: neighbouring pixels correlate as in photographs.
    (On independent pixels nearest rounding is already the best a first layer can do: the expected
    error is then a sum of squared weight errors.)"""
    coarse = make_pixels(count, seed)[:, :, :4, :4].float()
    return F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False).round().to(torch.uint8)


def learned(graph, stats, config, method, pixels, seed=0):
    rounding = RoundingConfig(method, iterations=ITERATIONS, seed=seed, batch_size=16)
    images = graph.preprocessing.apply(pixels)
    return learned_integer_model(graph, stats, replace(config, rounding=rounding), images)[0]


@pytest.fixture(scope="module")
def small():
    """Small's graph, calibration pixels, and its nearest and AdaRound models at W4A8 and W3A8."""
    pixels = smooth_pixels(96, seed=3)
    graph, stats = calibrated(small_model(), pixels)
    models = {}
    for bits in (4, 3):
        config = cell_config(SweepCell("mse", "per-channel", bits, 8))
        models[bits] = convert(graph, stats, config), learned(graph, stats, config, "adaround", pixels)
    return graph, pixels, models


def float_values(graph, pixels) -> dict[str, torch.Tensor]:
    """{tensor: its value in the float model on `pixels`}."""
    values = {}
    with torch.no_grad():
        run_float(graph, graph.preprocessing.apply(pixels), lambda name, value: values.__setitem__(name, value))
    return values


def integer_values(model, pixels) -> dict[str, torch.Tensor]:
    """{op (and the input): its output integers in the reference executor on `pixels`}."""
    values = {}
    run_integer(model, pixels, lambda name, q: values.__setitem__(name, q))
    return values


def layer_errors(graph, model, pixels) -> dict[str, float]:
    """{weighted layer: |f(W_q x~ + b) - f(W x + b)|^2 summed over the calibration images}: each layer's
    own output error, x~ its input in the integer model (the reference executor's, dequantized), x in
    the float model, f its fused ReLU or none. What AdaRound lowers, layer by layer (eq. 39)."""
    integers, reals, errors = integer_values(model, pixels), float_values(graph, pixels), {}
    for node in graph.weighted():
        layer = model.layer(node.name)
        quantized_input = dequantize(integers[layer.inputs[0]], layer.input_qparams)
        weight = dequantize(torch.as_tensor(layer.weight), layer.weight_qparams)
        activation = F.relu if layer.relu else (lambda y: y)
        if quantized_input.dim() == 4:
            op = node.op
            geometry = dict(stride=op.stride, padding=op.padding, dilation=op.dilation, groups=op.groups)
            outputs = [F.conv2d(quantized_input, weight, op.bias, **geometry),
                       F.conv2d(reals[node.inputs[0]], op.weight, op.bias, **geometry)]
        else:
            outputs = [F.linear(quantized_input, weight, node.op.bias), F.linear(reals[node.inputs[0]], node.op.weight, node.op.bias)]
        errors[node.name] = float((activation(outputs[0]) - activation(outputs[1])).pow(2).sum())
    return errors


@pytest.mark.parametrize("bits", [4, 3])
def test_adaround_lowers_every_layers_reconstruction_error(small, bits):
    graph, pixels, models = small
    nearest, adaround = (layer_errors(graph, model, pixels) for model in models[bits])
    for name in nearest:
        assert adaround[name] < 0.9 * nearest[name], (bits, name, nearest[name], adaround[name])


@pytest.mark.parametrize("bits", [4, 3])
def test_every_learned_weight_is_the_floor_or_the_ceiling_of_w_over_s(small, bits):
    graph, _, models = small
    nearest, adaround = models[bits]
    moved = 0
    for near, layer in ((nearest.layer(n.name), adaround.layer(n.name)) for n in graph.weighted()):
        qp = layer.weight_qparams
        assert np.array_equal(qp.scale, near.weight_qparams.scale)  # the same grid as nearest rounding
        ratio = graph.node(layer.name).op.weight.double().numpy() / qp.scale.reshape(-1, *[1] * (layer.weight.ndim - 1))
        low, high = (np.clip(f(ratio), qp.dtype.qmin, qp.dtype.qmax) for f in (np.floor, np.ceil))
        assert np.all((layer.weight == low) | (layer.weight == high)), layer.name
        moved += int((layer.weight != near.weight).sum())
    assert moved > 0  # some weights went the other way from nearest


def test_the_same_seed_gives_the_same_integers(small):
    graph, pixels, models = small
    graph, stats = calibrated(small_model(), pixels)  # captured and calibrated afresh
    again = learned(graph, stats, cell_config(SweepCell("mse", "per-channel", 3, 8)), "adaround", pixels)
    first = models[3][1]
    for node in graph.weighted():
        assert np.array_equal(again.layer(node.name).weight, first.layer(node.name).weight), node.name
    assert again.metadata["rounding"] == "adaround" and again.metadata["rounding_seed"] == 0


def small_model():
    torch.manual_seed(0)
    return Small().eval()


def block_output_error(graph, model, pixels, block: str, block_output: str) -> float:
    """|y_q - y|^2 at a block's output: the integer model's op `block` (dequantized) against the float
    model's tensor `block_output`."""
    integers = integer_values(model, pixels)[block]
    return float((dequantize(integers, model.layer(block).output_qparams) - float_values(graph, pixels)[block_output])
                 .pow(2).sum())


@pytest.fixture(scope="module")
def blocks():
    """TwoBlocks at W3A4: its graph, calibration pixels, nearest and BRECQ/QDrop models."""
    torch.manual_seed(0)
    pixels = smooth_pixels(96, seed=4)
    graph, stats = calibrated(TwoBlocks().eval(), pixels)
    config = cell_config(SweepCell("mse", "per-channel", 3, 4))
    return graph, pixels, convert(graph, stats, config), learned(graph, stats, config, "brecq", pixels)


def test_block_reconstruction_lowers_the_block_output_error(blocks):
    graph, pixels, nearest, brecq = blocks
    before, after = (block_output_error(graph, model, pixels, "add", "relu_2") for model in (nearest, brecq))
    assert after < 0.95 * before, (before, after)  # 0.86 measured
    assert brecq.metadata["rounding"] == "brecq"


def test_the_learned_model_is_an_ordinary_integer_model(blocks, tmp_path):
    _, pixels, _, brecq = blocks
    loaded = round_tripped(brecq, pixels[:8], tmp_path)
    exact_and_close(loaded, pixels[:8])  # c and onnx_exact bit-exact, the engines within 1 LSB per op


def test_the_rectified_sigmoid_and_its_schedule():
    assert float(rectified_sigmoid(torch.tensor(0.0))) == 0.5
    assert float(rectified_sigmoid(torch.tensor(-3.0))) == 0.0 and float(rectified_sigmoid(torch.tensor(3.0))) == 1.0
    fractions = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(rectified_sigmoid(initial_logits(fractions)), fractions, atol=1e-6)
    assert annealed_beta(100, 1000) is None and annealed_beta(200, 1000) == 20.0 and annealed_beta(1000, 1000) == 2.0


@pytest.mark.parametrize("options, message", [
    (dict(method="fast"), "rounding must be one of nearest, adaround, brecq, got 'fast'"),
    (dict(method="adaround", iterations=0), "rounding iterations must be a whole number of at least 1, got 0"),
    (dict(method="brecq", drop=1.0), "rounding drop must be a probability in [0, 1), got 1.0"),
    (dict(method="brecq", regularization=float("nan")), "rounding regularization must be a finite number >= 0"),
])
def test_bad_rounding_options_are_one_line(options, message):
    with pytest.raises(ValueError, match=r"^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RoundingConfig(**options)


def test_convert_refuses_a_learned_rounding_without_codes_and_codes_off_the_grid(small):
    graph, stats = calibrated(small_model(), small[1])
    config = cell_config(SweepCell("mse", "per-channel", 3, 8))
    with pytest.raises(ConversionError, match="rounding 'adaround' learns from calibration images"):
        convert(graph, stats, replace(config, rounding=RoundingConfig("adaround")))
    nearest = convert(graph, stats, config)
    codes = {"conv2": torch.as_tensor(nearest.layer("conv2").weight.astype(np.int64)) + 2}
    with pytest.raises(ConversionError, match="layer 'conv2': .* learned weight codes are neither floor nor ceil of w/s"):
        convert(graph, stats, config, rounded=codes)


@pytest.mark.parametrize("argv, message", [
    (["--rounding-iters", "5"], "--rounding-iters: only with a learned --rounding"),
    (["--rounding", "adaround", "--rounding-iters", "0"], "rounding iterations must be a whole number of at least 1"),
    (["--layer-bits", "conv1=9"], "--layer-bits: bit widths must be 2..8, each layer named once, got conv1=9"),
    (["--layer-bits", "nowhere=4", "--method", "mse"], "per-layer bits name unknown layers nowhere"),
    (["--layer-abits", "conv1=8,conv1=4"], "--layer-abits: bit widths must be 2..8, each layer named once, got conv1"),
    (["--layer-abits", "view=8", "--method", "mse"], "per-layer activation bits name unknown layers view"),
])
def test_quantize_refuses_bad_rounding_options_in_one_line(tmp_path, argv, message):
    save_weights(ARCHITECTURES["Net"]().eval(), [(1, 0, 1.0)], tmp_path / "net.npz")
    data = write_image_folder(tmp_path / "images", train_per_class=1, test_per_class=1)
    result = run_cli(["quantize", tmp_path / "net.npz", "--arch", "Net", "--data", data, "--cache", tmp_path / "c", *argv])
    assert result.code != 0 and message in result.err.splitlines()[-1], result.err


def test_quantize_command_learns_the_rounding(tmp_path):
    torch.manual_seed(0)
    save_weights(ARCHITECTURES["Net"]().eval(), [(1, 0, 1.0)], tmp_path / "net.npz")
    data = write_image_folder(tmp_path / "images", train_per_class=3, test_per_class=1)
    result = run_cli(["quantize", tmp_path / "net.npz", "--arch", "Net", "--data", data, "--cache", tmp_path / "c",
                      "--method", "mse", "--wbits", "3", "--layer-bits", "conv1=8,fc3=8", "--rounding", "brecq",
                      "--rounding-iters", "20", "--out", tmp_path / "m.npz"])
    assert result.code == 0, result.err
    assert "rounding brecq: 2 layers or blocks x 20 iterations" in result.out
    model = load(tmp_path / "m.npz")
    assert model.metadata["rounding"] == "brecq" and model.metadata["rounding_images"] == 30
    bits = {layer.name: layer.weight_qparams.dtype.bits for layer in model.layers if isinstance(layer, QLayer)}
    assert bits == {"conv1": 8, "conv2": 3, "fc1": 3, "fc2": 3, "fc3": 8}


def test_intq_quantize_learns_the_rounding_on_its_first_images():
    import intq

    pixels = smooth_pixels(40, seed=5)
    config = replace(intq.RECOMMENDED, rounding=intq.RoundingConfig("adaround", iterations=20, images=32))
    model = intq.quantize(small_model(), (pixels[i : i + 16] for i in range(0, 40, 16)), config=config)
    assert model.metadata["rounding"] == "adaround" and model.metadata["rounding_images"] == 32
    assert model.metadata["calibration_images"] == 40
