"""Cross-layer equalization (ptq/equalization.py, docs/math.md eq. 36): the equalized float graph computes
the same function, its pairs end with equal channel ranges, per-tensor weights then quantize better (the
depthwise layer's reconstruction error, the integer model's output), the chain stops where the function
would change, and convert refuses a graph equalized otherwise than its config says."""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from conftest import make_pixels
from intq.arith.qparams import Scheme, dequantize, quantize
from intq.calibrate.ranges import MinMax
from intq.graph.capture import Add, capture, run_float
from intq.graph.config import RECOMMENDED, WeightConfig
from intq.graph.convert import ConversionError, collect_statistics, convert, weight_qparams
from intq.ptq.equalization import (Pair, equalization_pairs, equalization_scales, equalize, input_ranges,
                                   output_ranges)
from intq.workflows.quantize_api import quantize as quantize_api

PER_TENSOR = WeightConfig(MinMax(), Scheme.SYMMETRIC, per_channel=False)


def unbalanced(module: nn.Module, spread: float = 3.0) -> nn.Module:
    """`module` in eval mode with every BatchNorm's scale e^u, u uniform in [-spread, spread]: after folding,
    its conv's output channels differ in range by up to e^(2 spread), as trained MobileNets' do."""
    with torch.no_grad():
        for norm in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.weight.copy_(torch.empty_like(norm.weight).uniform_(-spread, spread).exp())
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
    return module.eval()


def conv_bn(cin, cout, kernel=1, stride=1, groups=1, act=nn.ReLU):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            *([act()] if act else [])]


class MobileBlock(nn.Module):
    """conv 3x3 -> 1x1 expansion -> depthwise 3x3 (stride 2) -> max pool -> 1x1 projection -> ReLU -> global
    pool -> flatten -> linear: the chain MobileNet's blocks make, every link equalizable."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*conv_bn(3, 8, 3), *conv_bn(8, 24), *conv_bn(24, 24, 3, 2, groups=24),
                                      nn.MaxPool2d(2), *conv_bn(24, 12), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.features(x))


def mobile_block(seed: int = 0) -> MobileBlock:
    """A seeded MobileBlock with unbalanced channels."""
    torch.manual_seed(seed)
    return unbalanced(MobileBlock())


CHAIN = [("features_0", "features_3"), ("features_3", "features_6"), ("features_6", "features_10"),
         ("features_10", "fc")]


@pytest.fixture(scope="module")
def block():
    model = mobile_block()
    pixels = make_pixels(64)
    graph = capture(model, pixels[:2])
    return model, pixels, graph, equalize(graph)


def test_the_pairs_follow_the_chain_through_relu_pools_and_flatten(block):
    _, _, graph, _ = block
    assert equalization_pairs(graph) == [Pair(*pair) for pair in CHAIN]


def test_the_equalized_graph_computes_the_same_function(block):
    model, pixels, graph, equalized = block
    assert equalized.equalized and not graph.equalized
    x = graph.preprocessing.apply(pixels)
    with torch.no_grad():
        original, after = run_float(graph, x), run_float(equalized, x)
        assert torch.allclose(original, model(x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(after, original, rtol=1e-5, atol=1e-5 * float(original.abs().max()))
    moved = [name for name, _ in CHAIN if not torch.equal(graph.node(name).op.weight, equalized.node(name).op.weight)]
    assert moved == [name for name, _ in CHAIN]  # it did rescale every first layer of a pair


def test_every_pair_ends_with_equal_channel_ranges(block):
    _, _, graph, equalized = block
    for first, second in CHAIN:
        r1 = output_ranges(equalized.node(first).op.weight.double())
        r2 = input_ranges(equalized.node(second).op.weight.double(), getattr(equalized.node(second).op, "groups", 1))
        before = output_ranges(graph.node(first).op.weight.double())
        assert torch.allclose(r1, r2, rtol=1e-4), (first, second)
        assert float(r1.max() / r1.min()) < float(before.max() / before.min()), first


def layer_error(graph, name: str, x: torch.Tensor) -> float:
    """The layer's per-tensor W8 reconstruction error on its float input: mean over output channels of
    ||(Ŵ − W) x||_c / ||W x||_c (relative per channel, so that rescaled channels compare; channels that
    are 0 on every input left out)."""
    inputs = {}
    node = graph.node(name)
    run_float(graph, x, lambda tensor, value: inputs.setdefault(tensor, value))
    weight = node.op.weight
    rounded = dequantize(quantize(weight, weight_qparams(weight, PER_TENSOR)), weight_qparams(weight, PER_TENSOR))
    exact = torch.nn.functional.conv2d(inputs[node.inputs[0]], weight, None, node.op.stride, node.op.padding,
                                       node.op.dilation, node.op.groups)
    error = torch.nn.functional.conv2d(inputs[node.inputs[0]], rounded - weight, None, node.op.stride,
                                       node.op.padding, node.op.dilation, node.op.groups)
    signal, noise = exact.pow(2).sum((0, 2, 3)), error.pow(2).sum((0, 2, 3))
    return float((noise[signal > 0] / signal[signal > 0]).sqrt().mean())  # a channel dead on x has no signal


def test_equalization_lowers_the_per_tensor_reconstruction_error(block):
    _, pixels, graph, equalized = block
    x = graph.preprocessing.apply(pixels)
    for name in ("features_3", "features_6"):  # the 1x1 expansion and the depthwise conv, inside the chain
        assert layer_error(equalized, name, x) < 0.25 * layer_error(graph, name, x), name


def output_sqnr(model, pixels, config) -> float:
    """The integer model's output against the float model's, in dB."""
    from intq.executors.reference import run_integer
    integer = quantize_api(model, pixels, config=config, progress=False)
    graph = capture(model, pixels[:2])
    with torch.no_grad():
        reference = run_float(graph, graph.preprocessing.apply(pixels)).double()
    output = dequantize(run_integer(integer, pixels), integer.output_qparams(), torch.float64)
    return float(10 * torch.log10(reference.pow(2).mean() / (output - reference).pow(2).mean()))


def test_per_tensor_integer_model_gains_from_equalization(block):
    model, pixels, _, _ = block
    config = replace(RECOMMENDED, weights=PER_TENSOR)
    without = output_sqnr(model, pixels, config)
    with_it = output_sqnr(model, pixels, replace(config, equalization=True))
    assert with_it > without + 6.0, (without, with_it)


class Broken(nn.Module):
    """Links that end the chain: ReLU6, Hardswish, a residual add, a second reader; one that keeps it: leaky ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.d, self.e, self.f = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = nn.functional.relu6(self.a(x))  # a -> b: ReLU6, no pair
        x = nn.functional.hardswish(self.b(x))  # b -> c: Hardswish, no pair
        y = self.c(x)
        x = y + torch.relu(self.d(torch.relu(y)))  # c: two readers; d -> add, no pair
        x = nn.functional.leaky_relu(self.e(x), 0.1)  # e -> f: leaky ReLU, a pair
        return self.f(x)


def test_the_chain_stops_where_the_function_would_change():
    model = Broken().eval()
    graph = capture(model, make_pixels(2))
    assert equalization_pairs(graph) == [Pair("e", "f")]
    x = graph.preprocessing.apply(make_pixels(8))
    with torch.no_grad():
        assert torch.allclose(run_float(equalize(graph), x), model(x), rtol=1e-5, atol=1e-6)


def test_a_dead_channel_keeps_its_scale():
    assert torch.equal(equalization_scales(torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])),
                       torch.tensor([2.0, 1.0, 1.0]))
    model = mobile_block()
    with torch.no_grad():
        model.features[0].weight[2] = 0.0  # an output channel of the first conv that is all zeros
    graph = capture(model, make_pixels(2))
    equalized = equalize(graph)
    assert all(torch.isfinite(node.op.weight).all() for node in equalized.weighted())


def test_convert_refuses_a_graph_equalized_otherwise_than_its_config(block):
    _, pixels, graph, equalized = block
    stats = collect_statistics(graph, [pixels])
    with pytest.raises(ConversionError, match="equalization=True but the graph was not equalized") as error:
        convert(graph, stats, replace(RECOMMENDED, equalization=True))
    assert "\n" not in str(error.value)
    with pytest.raises(ConversionError, match="equalization=False but the graph was equalized"):
        convert(equalized, collect_statistics(equalized, [pixels]), RECOMMENDED)
    model = convert(equalized, collect_statistics(equalized, [pixels]), replace(RECOMMENDED, equalization=True))
    assert model.metadata["equalization"] is True and "bias_correction" not in model.metadata


def test_the_mobilenet_v2_example_equalizes_through_every_depthwise_conv():
    """examples/mobilenet_v2.py, loaded as the CLI loads a user's model file: every depthwise conv is the W2
    of one pair and the W1 of the next; the residual adds end the chains; the function stays."""
    from pathlib import Path
    from intq.arith.preprocessing import Preprocessing
    from intq.workflows.user_model import load_user_model
    torch.manual_seed(0)
    model = unbalanced(load_user_model(str(Path(__file__).resolve().parents[1] / "examples" / "mobilenet_v2.py") + ":cifar"))
    pixels = make_pixels(8)
    graph = capture(model, pixels[:2], Preprocessing((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
    pairs = equalization_pairs(graph)
    depthwise = [node.name for node in graph.weighted() if getattr(node.op, "groups", 1) > 1]
    assert len(depthwise) == 7 and len(pairs) == 16
    assert all(name in {p.second for p in pairs} and name in {p.first for p in pairs} for name in depthwise)
    into_adds = [node.name for node in graph.weighted()
                 if any(isinstance(graph.node(user).op, Add) for user in graph.users[node.name])]
    assert len(into_adds) == 6 and not set(into_adds) & {p.first for p in pairs}  # both operands of 3 adds
    x = graph.preprocessing.apply(pixels)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(run_float(equalize(graph), x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
