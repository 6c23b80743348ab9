"""`intq explain`: every line of the derivation is checked against the reference executor."""
from dataclasses import replace

import pytest
import torch

from conftest import Residual, Strided, calibrated, make_pixels
from intq.graph.config import RECOMMENDED, STUDY
from intq.graph.convert import convert
from intq.executors.reference import accumulate, run_integer
from intq.workflows.explain import ExplainError, explain
from intq.cifar.models import NetWithBias


def every_index(shape, count=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [tuple(int(torch.randint(0, n, (1,), generator=generator)) for n in shape) for _ in range(count)]


@pytest.mark.parametrize("model_class", [NetWithBias, Strided])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_explained_integer_equals_the_reference_everywhere(model_class, bits):
    torch.manual_seed(0)
    pixels = make_pixels(16)
    graph, stats = calibrated(model_class().eval(), pixels)
    config = replace(RECOMMENDED, weights=replace(RECOMMENDED.weights, bits=bits),
                     activations=replace(RECOMMENDED.activations, bits=max(bits, 4)))
    model = convert(graph, stats, config)
    values = {}
    run_integer(model, pixels[3:4], visit=lambda name, value: values.__setitem__(name, value[0]))
    for layer in model.quantized_layers():
        acc = accumulate(layer, values[layer.inputs[0]][None])[0]
        for index in every_index(values[layer.name].shape):
            e = explain(model, pixels[3], layer.name, index, graph)
            assert e.final == e.reference == int(values[layer.name][index])
            assert e.acc == int(acc[index])
            assert e.acc == e.acc_without_bias + e.bias == sum(w * x for w, x in e.terms) + e.bias
            assert e.rounded == round_half_away(e.product, 31 + e.shift)
            assert e.final == min(max(e.zero_point + e.rounded, e.lower), e.upper)
            assert "agrees" in e.lines[-2] or "agrees" in e.lines[-3]


def round_half_away(product: int, shift: int) -> int:
    magnitude = (abs(product) + (1 << (shift - 1))) >> shift
    return magnitude if product >= 0 else -magnitude


def test_study_preset_and_float_value():
    torch.manual_seed(0)
    pixels = make_pixels(8)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    model = convert(graph, stats, STUDY)
    e = explain(model, pixels[0], "fc3", (4,), graph)
    assert e.final == e.reference
    assert abs(e.dequantized - e.float_value) < 10 * e.scale + 1.0  # the study preset clips at 3 sigma


def test_unknown_layer_and_index_are_named():
    torch.manual_seed(0)
    pixels = make_pixels(4)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    model = convert(graph, stats, RECOMMENDED)
    with pytest.raises(ExplainError, match="'conv9'.*conv1, conv2"):
        explain(model, pixels[0], "conv9", (0,))
    with pytest.raises(ExplainError, match="outside fc1"):
        explain(model, pixels[0], "fc1", (500,))


def test_explain_applies_a_relu6_upper_clamp():
    """conv_a of the residual test model ends in ReLU6. Calibrated ranges never pass 6, so give its
    output a scale three times coarser: then 6 / s is about 85 codes and the clamp's upper bound binds."""
    from intq.arith.qparams import QParams

    torch.manual_seed(0)
    pixels = make_pixels(16)
    model = Residual().eval()
    with torch.no_grad():
        model.conv_a.weight.mul_(40)  # outputs well beyond 6
    graph, stats = calibrated(model, pixels)
    model = convert(graph, stats, RECOMMENDED)
    layer = model.layer("conv_a")
    out = layer.output_qparams
    layer.output_qparams = QParams(out.scale * 3, out.zero_point, out.dtype, out.axis)
    assert layer.bounds()[1] < out.dtype.qmax
    values = {}
    run_integer(model, pixels[:1], visit=lambda name, value: values.__setitem__(name, value[0]))
    assert int(values["conv_a"].max()) == layer.bounds()[1]  # some outputs saturate at the ReLU6 bound
    for index in every_index(values["conv_a"].shape, count=200):
        e = explain(model, pixels[0], "conv_a", index)
        assert (e.lower, e.upper) == layer.bounds()
        assert e.final == e.reference
