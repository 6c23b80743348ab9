"""The reference executor: integer dtypes throughout, and the float simulation as its oracle."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import calibrated
from intq.graph.config import RECOMMENDED, STUDY
from intq.graph.convert import convert
from intq.arith.fixed_point import float64_requantizer, requantize
from intq.executors.reference import ExecutionError, accumulate, exact_float_dtype, pixels_to_input, run_integer
from intq.arith.qparams import IntType, quantize
from intq.executors.simulate import layer_agreement


@pytest.fixture(scope="module", params=[STUDY, RECOMMENDED], ids=lambda c: c.name)
def preset(request):
    return request.param


def test_every_tensor_between_input_and_logits_is_an_integer_dtype(seeded_model, pixels, preset):
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, preset)
    seen = {}
    run_integer(model, pixels, visit=lambda name, value: seen.__setitem__(name, value.dtype))
    assert len(seen) == len(model.layers) + 1
    for name, dtype in seen.items():
        assert not dtype.is_floating_point, f"{name} is {dtype}"
    assert seen["conv1"] == (torch.int8 if preset is STUDY else torch.uint8)


def test_fused_pooling_path_gives_the_same_integers(seeded_model, pixels, preset):
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, preset)
    fused = run_integer(model, pixels)
    unfused = run_integer(model, pixels, visit=lambda name, value: None)
    assert torch.equal(fused, unfused)


def test_reference_equals_float64_simulation_layer_by_layer(seeded_model, pixels, preset):
    graph, stats = calibrated(seeded_model, pixels)
    rows = layer_agreement(convert(graph, stats, preset), pixels)
    assert [row["layer"] for row in rows] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert all(row["differing"] == 0 for row in rows), rows


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_sub_8_bit_models_run_integer_only_and_match_the_simulation(seeded_model, pixels, bits):
    graph, stats = calibrated(seeded_model, pixels)
    config = replace(RECOMMENDED, weights=replace(RECOMMENDED.weights, bits=bits),
                     activations=replace(RECOMMENDED.activations, bits=bits))
    model = convert(graph, stats, config)
    assert model.layer("conv1").output_qparams.dtype == IntType(bits, False)
    assert int(abs(torch.as_tensor(model.layer("fc1").weight).int()).max()) <= 2 ** (bits - 1) - 1
    assert all(row["differing"] == 0 for row in layer_agreement(model, pixels))


def test_integer_logits_track_the_float_model(seeded_model, pixels):
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, RECOMMENDED)
    logits = run_integer(model, pixels).to(torch.int64)
    qp = model.output_qparams()
    real = (logits - int(qp.zero_point)).double() * float(qp.scale)
    with torch.no_grad():
        expected = seeded_model((pixels.float() / 255 - 0.5) / 0.5).double()
    assert torch.corrcoef(torch.stack([real.flatten(), expected.flatten()]))[0, 1] > 0.99


def test_folded_input_is_the_exact_normalised_image_times_255(seeded_model, pixels):
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, RECOMMENDED)
    x = pixels_to_input(pixels, model)
    assert x.dtype == torch.int16
    assert torch.equal(x.to(torch.int64), 2 * pixels.to(torch.int64) - 255)
    assert torch.allclose(x.double() / 255, (pixels.double() / 255 - 0.5) / 0.5, rtol=0, atol=1e-15)


def test_input_must_be_uint8_pixels(seeded_model, pixels):
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, STUDY)
    with pytest.raises(ExecutionError, match="uint8"):
        run_integer(model, pixels.float())


def test_exact_float_dtype_follows_the_bound():
    assert exact_float_dtype(2**24) == torch.float32
    assert exact_float_dtype(2**24 + 1) == torch.float64
    with pytest.raises(ExecutionError):
        exact_float_dtype(2**53 + 1)


def test_requantized_input_equals_quantizing_the_normalised_image(seeded_model, pixels):
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, STUDY)
    every_pixel = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    expected = quantize((every_pixel.double() * 2 - 255) / 255, model.input.qparams)
    assert torch.equal(pixels_to_input(every_pixel, model).to(torch.int64), expected)


def test_tie_prone_multipliers_take_the_integer_requantizer(seeded_model, pixels):
    """With M0 = 2^30 (M a power of two) many accumulators land on rounding ties, where the float64
    path (eq. 24) would round half up: those layers must keep the integer requantizer (eq. 20) and
    still equal the simulation."""
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, RECOMMENDED)
    for layer in model.quantized_layers():
        layer.mantissa = np.full_like(layer.mantissa, 2**30)
        lower, upper = layer.bounds()
        assert float64_requantizer(layer.mantissa, layer.shift, layer.bias, int(layer.output_qparams.zero_point), lower, upper,
                                   layer.accumulator_bound) is None
    values = {}
    run_integer(model, pixels, visit=lambda name, q: values.__setitem__(name, q))
    for layer in model.quantized_layers():
        acc = accumulate(layer, values[layer.inputs[0]])
        per_channel = (1, -1) + (1,) * (acc.dim() - 2)  # (C,) -> broadcast over axis 1 of (N, C[, H, W])
        mantissa, shift = (torch.as_tensor(a).to(torch.int64).reshape(per_channel) for a in (layer.mantissa, layer.shift))
        expected = requantize(acc, mantissa, shift, int(layer.output_qparams.zero_point), *layer.bounds())
        assert torch.equal(values[layer.name].to(torch.int64), expected), layer.name


def test_self_test_refuses_a_backend_whose_convolutions_round(monkeypatch):
    """The reference's exactness rests on float convolutions that sum integers without transforms; a
    backend that rounds (Winograd, FFT, TF32) is refused at first use, naming it."""
    import intq.executors.reference as reference

    real = reference.integer_conv2d
    monkeypatch.setattr(reference, "integer_conv2d", lambda x, w, g: real(x, w, g).to(torch.float16).to(x.dtype))
    reference.check_exact_sums.cache_clear()
    try:
        with pytest.raises(ExecutionError, match="does not sum integers exactly"):
            reference.check_exact_sums("cpu", torch.float32)
    finally:
        reference.check_exact_sums.cache_clear()


def test_self_test_passes_on_this_backend():
    import intq.executors.reference as reference

    reference.check_exact_sums.cache_clear()
    reference.check_exact_sums("cpu", torch.float32)
    reference.check_exact_sums("cpu", torch.float64)


def test_images_of_another_size_or_type_are_refused_naming_both(seeded_model, pixels):
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, RECOMMENDED)
    with pytest.raises(ExecutionError, match=r"takes images of shape \(3, 32, 32\).*got \(3, 64, 64\)"):
        run_integer(model, torch.zeros((2, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(ExecutionError, match="uint8 pixels of shape"):
        run_integer(model, pixels.float())


def test_chunks_run_side_by_side_give_the_integers_of_one_pass(seeded_model, pixels):
    """run_in_chunks runs T chunks at a time on T worker threads: the logits equal those of every op run
    on the whole batch in one pass (the visit path, no chunks, no fusion), in order, and the caller's
    thread count is as it was."""
    graph, stats = calibrated(seeded_model, pixels)
    model = convert(graph, stats, RECOMMENDED)
    batch = torch.cat([pixels, pixels.flip(0)])[:100]  # 4 chunks, the last one short
    one_pass = run_integer(model, batch, visit=lambda name, value: None)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(run_integer(model, batch), one_pass), f"{threads} threads"
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
