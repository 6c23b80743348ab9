"""Capture: the graph computes what the model computes; unsupported ops are named."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from intq.graph.capture import CaptureError, Conv2d, capture, graph_agrees, max_pool, run_float
from intq.cifar.models import Net


def test_net_graph_reproduces_the_model(pixels):
    torch.manual_seed(0)
    model = Net().eval()
    images = (pixels.float() / 255 - 0.5) / 0.5
    graph = capture(model, images[:2])
    assert [n.name for n in graph.weighted()] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    with torch.no_grad():
        assert torch.allclose(run_float(graph, images), model(images), atol=1e-5)


class WithSoftplus(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = nn.Softplus()
        self.fc = nn.Linear(4 * 30 * 30, 2)

    def forward(self, x):
        x = torch.exp(self.gate(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


def test_unsupported_ops_are_all_named_in_one_error():
    with pytest.raises(CaptureError) as error:
        capture(WithSoftplus(), torch.randn(1, 3, 32, 32))
    message = str(error.value)
    assert "gate (Softplus)" in message and "exp" in message and "WithSoftplus" in message


class ConvBnReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(x.reshape(x.size(0), -1))


def test_batchnorm_is_folded_into_the_conv():
    torch.manual_seed(0)
    model = ConvBnReLU()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    graph = capture(model, x)
    convs = [n for n in graph.nodes if isinstance(n.op, Conv2d)]
    assert len(convs) == 1 and convs[0].name == "conv" and convs[0].op.bias is not None
    assert "bn" not in [n.name for n in graph.nodes]
    with torch.no_grad():
        assert torch.allclose(run_float(graph, x), model(x), atol=1e-4)


def test_nan_weights_are_named():
    model = Net()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(CaptureError, match="'fc2'.*NaN"):
        capture(model, torch.randn(1, 3, 32, 32))


def test_view_that_is_not_a_flatten_is_caught():
    class BadView(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(x.view(-1, 16))  # mixes the batch dimension into features

    with pytest.raises(CaptureError, match="BadView.*view/reshape"):
        capture(BadView(), torch.randn(2, 1, 4, 8))


def test_graph_agreement_allows_rounding_in_proportion_to_the_output_and_nothing_more():
    expected = torch.tensor([[1.6, -0.3, 0.0], [0.9, 0.2, -1.1]])
    assert graph_agrees(expected + 2.3e-4, expected)  # ResNet-50's folded BatchNorm, random weights: 2.3e-4 on 1.6
    assert not graph_agrees(expected + 0.01, expected)  # a share of the range: a wrong op or view
    assert not graph_agrees(expected.flip(0), expected)  # rows swapped: the batch mixed up
    assert not graph_agrees(expected[:, :2], expected)
    assert not graph_agrees(torch.full_like(expected, float("nan")), expected)
    tiny = expected * 1e-3  # small logits: the absolute floor, 1e-4, still holds
    assert graph_agrees(tiny + 5e-5, tiny) and not graph_agrees(tiny + 3e-4, tiny)


@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (0, 0)),
                                                     ((3, 3), (1, 1), (1, 1)), ((2, 2), (2, 2), (1, 1))])
def test_max_pool_matches_torch_on_floats_and_integers(kernel, stride, padding):
    torch.manual_seed(0)
    x = torch.randint(-128, 128, (2, 3, 11, 9), dtype=torch.int8)
    expected = F.max_pool2d(x.float(), kernel, stride, padding)
    assert torch.equal(max_pool(x.float(), kernel, stride, padding), expected)
    integer = max_pool(x, kernel, stride, padding)
    assert integer.dtype == torch.int8 and torch.equal(integer.float(), expected)


@pytest.mark.parametrize("shape, named", [
    ((2, 3, 64, 64), "layer 'fc1' expects (N, 400), got (2, 2704) (from an input of shape (2, 3, 64, 64))"),
    ((2, 1, 32, 32), "layer 'conv1' expects (N, 3, H, W), got (2, 1, 32, 32)"),
    ((2, 3, 8, 8), "layer 'conv2' needs H >= 5, got (2, 6, 2, 2) (from an input of shape (2, 3, 8, 8))"),
])
def test_a_wrong_input_shape_names_the_layer_and_what_it_expects(shape, named):
    with pytest.raises(CaptureError) as error:
        capture(Net().eval(), torch.zeros(shape))
    assert str(error.value).startswith(f"Net: {named}")
