"""Conversion: integer parameters, the overflow proof, and clear errors for bad layers."""
import numpy as np
import pytest
import torch

from conftest import calibrated
from intq import model_file
from intq.capture import Graph, Linear, Node, with_users
from intq.config import RECOMMENDED, STUDY
from intq.convert import ConversionError, convert, observed_tensors
from intq.executors.reference import run_integer
from intq.models import Net, NetWithBias
from intq.observers import observe


def test_observed_tensors_are_what_each_next_layer_reads(pixels):
    graph, _ = calibrated(Net(), pixels)
    assert observed_tensors(graph) == {"input": "x", "conv1": "pool", "conv2": "view", "fc1": "relu_2",
                                       "fc2": "relu_3", "fc3": "fc3"}


def test_recommended_preset_parameters(pixels):
    torch.manual_seed(0)
    graph, stats = calibrated(NetWithBias(), pixels)
    model = convert(graph, stats, RECOMMENDED)
    fc3 = model.layer("fc3")
    assert fc3.weight.dtype == np.int8 and fc3.bias.dtype == np.int32
    assert fc3.mantissa.dtype == np.int32 and fc3.shift.dtype == np.int32
    assert np.all((fc3.mantissa >= 2**30) & (fc3.mantissa < 2**31))
    assert fc3.weight_qparams.scale.shape == (10,)
    assert model.layer("conv1").output_qparams.dtype.signed is False
    assert model.input.folded


def test_bias_scale_is_input_scale_times_weight_scale(pixels):
    torch.manual_seed(0)
    model = NetWithBias()
    with torch.no_grad():
        model.fc3.bias.copy_(torch.linspace(-1, 1, 10))
    graph, stats = calibrated(model, pixels)
    fc3 = convert(graph, stats, RECOMMENDED).layer("fc3")
    scale = float(fc3.input_qparams.scale) * fc3.weight_qparams.scale
    assert np.allclose(fc3.bias * scale, np.linspace(-1, 1, 10), atol=scale.max())


def test_study_preset_is_per_tensor_signed_and_requantizes_the_input(pixels):
    graph, stats = calibrated(Net(), pixels)
    model = convert(graph, stats, STUDY)
    assert model.layer("conv1").weight_qparams.scale.shape == ()
    assert all(layer.output_qparams.dtype.signed for layer in model.quantized_layers())
    assert not model.input.folded and model.input.qparams.dtype.bits == 8


def test_accumulator_bound_is_recorded_and_respected(pixels):
    graph, stats = calibrated(Net(), pixels)
    model = convert(graph, stats, RECOMMENDED)
    for layer in model.quantized_layers():
        assert 0 < layer.accumulator_bound < 2**31


def test_overflow_proof_rejects_a_layer_that_could_overflow_int32():
    """70,000 inputs of |x - z| <= 256 times weights of 127: ~2.3e9 > 2^31 - 1."""
    weight = torch.ones(2, 70_000)
    weight[:, 0] = 0.5
    graph = with_users(Graph("x", [Node("huge", Linear(weight, None), ("x",))], "huge"))
    stats = {"x": observe(torch.rand(70_000) * 2 - 1), "huge": observe(torch.randn(100) * 1000)}
    with pytest.raises(ConversionError, match="'huge'.*exceeds int32"):
        convert(graph, stats, RECOMMENDED)


def test_constant_weight_tensor_is_named(pixels):
    model = Net()
    with torch.no_grad():
        model.conv2.weight.fill_(0.25)
    graph, stats = calibrated(model, pixels)
    with pytest.raises(ConversionError, match="'conv2'.*constant"):
        convert(graph, stats, STUDY)


def test_save_and_load_round_trip_without_pickle(tmp_path, pixels):
    graph, stats = calibrated(NetWithBias(), pixels)
    model = convert(graph, stats, RECOMMENDED, {"model": "NetWithBias"})
    path = tmp_path / "model.npz"
    size = model_file.save(model, path)
    assert size == path.stat().st_size
    with np.load(path, allow_pickle=False) as archive:
        assert archive["fc3.weight"].dtype == np.int8
        assert archive["fc3.bias"].dtype == np.int32
        assert archive["conv1.mantissa"].dtype == np.int32
    loaded = model_file.load(path)
    assert loaded.metadata["model"] == "NetWithBias"
    assert torch.equal(run_integer(loaded, pixels), run_integer(model, pixels))


def test_loading_a_file_that_is_not_a_model_names_it(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(model_file.ModelFileError, match="other.npz"):
        model_file.load(path)


@pytest.mark.parametrize("bits, packed_bytes", [(4, 24_000), (2, 12_000)])
def test_sub_byte_weights_are_packed_and_round_trip(tmp_path, pixels, bits, packed_bytes):
    from dataclasses import replace

    graph, stats = calibrated(Net(), pixels)
    model = convert(graph, stats, replace(RECOMMENDED, weights=replace(RECOMMENDED.weights, bits=bits)))
    path = tmp_path / "small.npz"
    model_file.save(model, path)
    with np.load(path, allow_pickle=False) as archive:
        assert archive["fc1.weight"].dtype == np.uint8 and archive["fc1.weight"].size == packed_bytes
    loaded = model_file.load(path)
    assert np.array_equal(loaded.layer("fc1").weight, model.layer("fc1").weight)
    assert torch.equal(run_integer(loaded, pixels), run_integer(model, pixels))


def test_per_channel_weights_keep_small_channels_that_per_tensor_rounds_away():
    """One channel 100x larger than the rest: a per-tensor scale rounds the small channels to 0."""
    from dataclasses import replace

    from intq.convert import weight_qparams
    from intq.qparams import dequantize, quantize

    torch.manual_seed(0)
    weight = torch.randn(8, 16) * 0.01
    weight[0] *= 100
    per_tensor = replace(RECOMMENDED.weights, per_channel=False)
    errors = {}
    for label, config in (("per-tensor", per_tensor), ("per-channel", RECOMMENDED.weights)):
        qp = weight_qparams(weight, config)
        errors[label] = float(((dequantize(quantize(weight, qp), qp) - weight)[1:] ** 2).mean())
        if label == "per-tensor":
            assert (quantize(weight, qp)[1:] == 0).float().mean() > 0.5
    assert errors["per-channel"] < errors["per-tensor"] / 100
