"""Empirical bias correction (graph/bias_correction.py, calibrate/window_means.py, docs/math.md eq. 37): the
window means give each layer's mean output shift exactly, the statistics pass gathers them for every layer,
the correction lowers the integer model's per-channel mean error, and the result is an ordinary
IntegerModel (bit-exact on c and onnx_exact, engines within 1 LSB, the same file); the QConfig switches
and the command-line flags."""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_pixels, round_tripped
from hostile import run_cli
from intq.arith.qparams import Scheme, dequantize
from intq.calibrate.ranges import MinMax
from intq.calibrate.window_means import LINEAR_WINDOW, Window, WindowMeanObserver, window_sums
from intq.cli import parser
from intq.commands import _config
from intq.executors.reference import run_integer
from intq.graph.bias_correction import layer_window, mean_output_shift
from intq.graph.capture import capture, run_float
from intq.graph.config import RECOMMENDED, QConfig, WeightConfig
from intq.graph.convert import ConversionError, collect_statistics, convert
from intq.workflows.quantize_api import quantize
from test_equalization import mobile_block
from test_lookup import exact_and_close

PER_TENSOR = WeightConfig(MinMax(), Scheme.SYMMETRIC, per_channel=False)


def test_window_sums_count_the_padding_out():
    sums, windows = window_sums(torch.ones(2, 4, 4, dtype=torch.float64), Window((3, 3), padding=(1, 1)))
    assert windows == 16 and sums.shape == (2, 3, 3)
    assert sums[0, 1, 1] == 16 and sums[0, 0, 0] == 9 and sums[1, 0, 1] == 12  # the top row meets padding 4 times


GEOMETRIES = {  # (in channels, out channels, kernel, stride, padding, dilation, groups)
    "3x3": (4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "depthwise stride 2": (6, 6, (3, 3), (2, 2), (1, 1), (1, 1), 6),
    "grouped dilated": (4, 6, (3, 3), (1, 1), (2, 2), (2, 2), 2),
    "1x3 uneven": (3, 5, (1, 3), (2, 1), (0, 1), (1, 1), 1),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_window_means_give_the_mean_output_shift_of_a_conv(name):
    cin, cout, kernel, stride, padding, dilation, groups = GEOMETRIES[name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, cin, 9, 10, generator=generator, dtype=torch.float64) + 0.5
    error = torch.randn(cout, cin // groups, *kernel, generator=generator, dtype=torch.float64)
    window = Window(kernel, stride, padding, dilation)
    observer = WindowMeanObserver({window})
    for batch in x.split(3):  # streamed in uneven batches
        observer.update(batch)
    measured = F.conv2d(x, error, None, stride, padding, dilation, groups).mean((0, 2, 3))
    assert torch.allclose(mean_output_shift(error, observer.means()[window], groups), measured, rtol=1e-10, atol=1e-12)


def test_window_means_give_the_mean_output_shift_of_a_linear():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 8, generator=generator, dtype=torch.float64)  # a Linear reads the last axis
    error = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    observer = WindowMeanObserver({LINEAR_WINDOW})
    observer.update(x)
    assert torch.allclose(mean_output_shift(error, observer.means()[LINEAR_WINDOW]), F.linear(x, error).mean((0, 1)))
    assert torch.allclose(mean_output_shift(torch.tensor([[0.01, 0.02]]), [2.0, 1.0]), torch.tensor([0.04], dtype=torch.float64))


def test_the_statistics_hold_every_layers_window_mean():
    graph = capture(mobile_block(), make_pixels(2))
    stats = collect_statistics(graph, [make_pixels(8)])
    for node in graph.weighted():
        means = stats[node.inputs[0]].window_means[layer_window(node.op)]
        channels = node.op.weight.shape[1] * getattr(node.op, "groups", 1)
        assert means.shape == ((channels,) if node.name == "fc" else (channels, *node.op.weight.shape[2:])), node.name


def float_inputs(graph, pixels) -> dict[str, torch.Tensor]:
    """{layer: its input in the float graph}."""
    values = {}
    with torch.no_grad():
        run_float(graph, graph.preprocessing.apply(pixels), lambda name, value: values.setdefault(name, value.double()))
    return {node.name: values[node.inputs[0]] for node in graph.weighted()}


def integer_inputs(integer, pixels) -> dict[str, torch.Tensor]:
    """{layer: its input as the integer model computes it, dequantized}."""
    values = {}
    run_integer(integer, pixels, lambda name, q: values.setdefault(name, q))
    return {layer.name: dequantize(values[layer.inputs[0]], layer.input_qparams, torch.float64)
            for layer in integer.layers if hasattr(layer, "weight")}


def layer_mean_errors(graph, integer, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (per output channel, the mean over every position and image of Ŵx + b̂ − (Wx + b) on the
    given inputs, Ŵ and b̂ the integer model's own weights and bias dequantized; half a bias step)}."""
    errors = {}
    for node in graph.weighted():
        layer = integer.layer(node.name)
        scale = torch.as_tensor(float(layer.input_qparams.scale) * layer.weight_qparams.scale).reshape(-1)
        weight = dequantize(torch.as_tensor(layer.weight), layer.weight_qparams, torch.float64)
        bias = scale * torch.as_tensor(layer.bias if layer.bias is not None else 0, dtype=torch.float64)
        exact_bias = node.op.bias.double() if node.op.bias is not None else 0
        x, error = inputs[node.name], weight - node.op.weight.double()
        if node.name == "fc":
            error = F.linear(x, error).mean(0)
        else:
            error = F.conv2d(x, error, None, node.op.stride, node.op.padding, node.op.dilation, node.op.groups)
            error = error.mean((0, 2, 3))
        errors[node.name] = (error + bias - exact_bias, scale / 2)
    return errors


def corrected_and_plain(bits: int, pixels):
    model = mobile_block()
    config = replace(RECOMMENDED, weights=replace(PER_TENSOR, bits=bits))
    graph = capture(model, pixels[:2])
    return (graph, quantize(model, pixels, config=replace(config, bias_correction=True), progress=False),
            quantize(model, pixels, config=config, progress=False))


def test_each_layer_keeps_no_mean_error_on_its_float_inputs():
    pixels = make_pixels(48)
    graph, corrected, plain = corrected_and_plain(4, pixels)
    assert corrected.metadata["bias_correction"] is True and "bias_correction" not in plain.metadata
    inputs = float_inputs(graph, pixels)
    for name, (error, half_step) in layer_mean_errors(graph, corrected, inputs).items():
        assert (error.abs() <= half_step * (1 + 1e-6) + 1e-12).all(), name  # only the int32 bias's rounding left
    uncorrected = layer_mean_errors(graph, plain, inputs)
    del uncorrected["features_0"]  # it reads the image, whose random pixels average to ~0: little to shift
    assert all(float((error.abs() / half_step).max()) > 10 for error, half_step in uncorrected.values())


def test_bias_correction_lowers_each_layers_mean_error_on_the_integer_models_inputs():
    """Corrected from the float inputs' means, the weights' mean error is mostly gone on the inputs the
    integer model computes too: what is left is ΔW times the inputs' own mean shift (eq. 37), small at W8
    (at W4 per-tensor on this block it is not: docs/math.md)."""
    pixels = make_pixels(48)
    graph, corrected, plain = corrected_and_plain(8, pixels)
    after = layer_mean_errors(graph, corrected, integer_inputs(corrected, pixels))
    before = layer_mean_errors(graph, plain, integer_inputs(plain, pixels))
    for name in ("features_3", "features_6", "features_10", "fc"):  # features_0's error is a few bias steps
        assert float(after[name][0].abs().mean()) < 0.2 * float(before[name][0].abs().mean()), name


def test_a_corrected_model_is_an_ordinary_integer_model(tmp_path):
    model, pixels = mobile_block(), make_pixels(32)
    config = replace(RECOMMENDED, weights=PER_TENSOR, equalization=True, bias_correction=True)
    integer = quantize(model, pixels, config=config, progress=False)
    exact_and_close(integer, pixels)
    loaded = round_tripped(integer, pixels, tmp_path)
    assert loaded.metadata["equalization"] is True and loaded.metadata["bias_correction"] is True


def test_convert_names_the_layer_when_the_window_means_are_missing():
    graph = capture(mobile_block(), make_pixels(2))
    stats = {name: replace(value, window_means={}) for name, value in collect_statistics(graph, [make_pixels(8)]).items()}
    with pytest.raises(ConversionError, match="layer 'features_0': bias correction needs the mean"):
        convert(graph, stats, replace(RECOMMENDED, bias_correction=True))


@pytest.mark.parametrize("switch", ["equalization", "bias_correction"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_switch_that_is_not_a_boolean_is_one_line(switch, value):
    with pytest.raises(ValueError) as error:
        replace(RECOMMENDED, **{switch: value})
    assert str(error.value) == f"QConfig {switch} must be True or False, got {value!r}"
    assert isinstance(QConfig("q", RECOMMENDED.weights, RECOMMENDED.activations, True, None), QConfig)


@pytest.mark.parametrize("extra, expected", [
    ([], (False, False)), (["--equalization"], (True, False)), (["--bias-correction"], (False, True)),
    (["--equalization", "--bias-correction", "--method", "mse", "--granularity", "per-tensor"], (True, True)),
])
def test_the_command_line_flags_set_the_switches(extra, expected):
    config = _config(parser().parse_args(["quantize", "ckpt.npz", *extra]))
    assert (config.equalization, config.bias_correction) == expected
    assert config.weights.per_channel == ("per-tensor" not in extra)


def test_quantize_with_both_flags_writes_a_model_that_says_so(tmp_path):
    from conftest import write_image_folder
    from intq.graph.model_file import load
    model = mobile_block()
    torch.save(model.state_dict(), tmp_path / "block.pt")
    (tmp_path / "block.py").write_text("from test_equalization import MobileBlock\n\ndef block():\n    return MobileBlock()\n")
    data = write_image_folder(tmp_path / "images", 3, 2)
    result = run_cli(["quantize", "--model", tmp_path / "block.py:block", "--weights", tmp_path / "block.pt",
                      "--data", data, "--cache", tmp_path / "cache", "--method", "mse", "--granularity", "per-tensor",
                      "--equalization", "--bias-correction", "--out", tmp_path / "m.npz"])
    assert result.code == 0, result.err
    assert "equalization: 4 layer pairs" in result.err
    metadata = load(tmp_path / "m.npz").metadata
    assert metadata["equalization"] is True and metadata["bias_correction"] is True
