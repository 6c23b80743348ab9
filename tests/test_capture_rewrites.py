"""Capture-level rewrites onto existing ops (graph/capture_rewrites.py): padding="same"/"valid", a mean over
(H, W), AdaptiveAvgPool2d to a dividing size, flatten forms, dropout and StochasticDepth as identity; each
captured (capture proves graph == model on the example), converted, and c / onnx_exact bit-exact against
the reference; each refusal names the node, the attribute and its value."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from intq.graph.capture import AvgPool2d, CaptureError, Conv2d, Flatten, Identity, capture, trace
from intq.graph.config import RECOMMENDED
from test_lookup import converted, exact_and_close


class SamePadding(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding="same")
        self.conv2 = nn.Conv2d(6, 6, (3, 5), padding="same", dilation=2)
        self.conv3 = nn.Conv2d(6, 4, 3, stride=2, padding="valid")
        self.fc = nn.Linear(4 * 15 * 15, 5)

    def forward(self, x):
        return self.fc(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))).flatten(1))


class Means(nn.Module):
    """x.mean((2, 3)), x.mean(dim=(-2, -1)) and torch.mean(x, (2, 3), keepdim=True) then nn.Flatten."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if self.form == "method":
            x = x.mean((2, 3))
        elif self.form == "negative":
            x = x.mean(dim=(-2, -1))
        else:
            x = self.flatten(torch.mean(x, (2, 3), keepdim=True))
        return self.fc(x)


class Adaptive(nn.Module):
    """30x30 -> AdaptiveAvgPool2d((5, 3)) (kernel (6, 10)) and F.adaptive_avg_pool2d(x, 2) (kernel 15)."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d((5, 3))
        self.fc = nn.Linear(6 * (4 if functional else 15), 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.adaptive_avg_pool2d(x, 2) if self.functional else self.pool(x)
        return self.fc(torch.flatten(x, start_dim=1))


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth's shape: identity in eval, random row drops in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        return x * torch.bernoulli(torch.full((x.shape[0], 1, 1, 1), 1 - self.p)) / (1 - self.p)


class Dropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.drop2d = nn.Dropout2d(0.2)
        self.depth = StochasticDepth(0.1)
        self.drop = nn.Dropout(0.3)
        self.flatten = nn.Flatten(start_dim=-3)
        self.fc = nn.Linear(6 * 15 * 15, 5)

    def forward(self, x):
        x = self.depth(self.drop2d(F.relu(self.conv(x))))
        x = F.dropout(x, 0.5, training=False)
        return self.fc(self.drop(self.flatten(x)))


def check_exact(module: nn.Module) -> list:
    """Captured, converted, and c / onnx_exact bit-exact against the reference; the graph's ops."""
    graph, model, pixels = converted(module, RECOMMENDED)
    exact_and_close(model, pixels[:6])
    return [node.op for node in graph.nodes]


def test_same_and_valid_padding_become_symmetric_padding():
    convs = [op for op in check_exact(SamePadding()) if isinstance(op, Conv2d)]
    assert [conv.padding for conv in convs] == [(1, 1), (2, 4), (0, 0)]


@pytest.mark.parametrize("form", ["method", "negative", "keepdim"])
def test_spatial_mean_becomes_global_average_pool(form):
    ops = check_exact(Means(form))
    assert AvgPool2d(None) in ops
    assert isinstance(ops[ops.index(AvgPool2d(None)) + 1], Flatten)


@pytest.mark.parametrize("functional, window", [(False, (6, 10)), (True, (15, 15))])
def test_adaptive_average_pool_to_a_dividing_size(functional, window):
    assert AvgPool2d(window, window) in check_exact(Adaptive(functional))


def test_dropouts_and_stochastic_depth_are_identity():
    ops = check_exact(Dropouts())
    assert sum(isinstance(op, Identity) for op in ops) == 4


class Single(nn.Module):
    """One layer (or call) after a conv, for the refusals."""

    def __init__(self, layer=None, call=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.layer = layer if layer is not None else nn.Identity()
        self.call = call or (lambda x: x)

    def forward(self, x):
        return self.call(self.layer(self.conv(x)))


def refusal(module: nn.Module) -> str:
    with pytest.raises(CaptureError) as error:
        capture(module, torch.randn(1, 3, 32, 32))
    return str(error.value)


def test_refusals_name_the_node_the_attribute_and_the_value():
    assert re.search(r"layer \(Conv2d\): padding='same' with kernel_size=\(4, 4\), dilation=\(1, 1\) needs asymmetric",
                     refusal(Single(nn.Conv2d(4, 4, 4, padding="same"))))
    assert "layer (Conv2d): padding_mode='reflect'" in refusal(Single(nn.Conv2d(4, 4, 3, padding=1,
                                                                                padding_mode="reflect")))
    assert "layer (MaxPool2d): dilation=2, return_indices=False (only dilation 1" in refusal(
        Single(nn.MaxPool2d(2, dilation=2)))
    assert "layer (Flatten): flatten with start_dim=2" in refusal(Single(nn.Flatten(start_dim=2)))
    assert "layer (AdaptiveAvgPool2d): output size (7, 7) does not divide the input size (30, 30)" in refusal(
        Single(nn.AdaptiveAvgPool2d(7)))


class Calls(nn.Module):
    def __init__(self, call):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.call = call

    def forward(self, x):
        return self.call(self.conv(x))


def test_call_refusals():
    assert "mean over dim=1" in refusal(Calls(lambda x: x.mean(1)))
    assert "mean over dim=(2,)" in refusal(Calls(lambda x: torch.mean(x, (2,))))
    assert "flatten with start_dim=0" in refusal(Calls(lambda x: torch.flatten(x)))
    assert "training=True (only training=False" in refusal(Calls(lambda x: F.dropout(x, 0.5)))
    assert "max_pool2d (call_function max_pool2d): dilation=2, return_indices=False (only dilation 1" in refusal(
        Calls(lambda x: F.max_pool2d(x, 2, dilation=2)))
    assert "output size (4, 4) does not divide the input size (30, 30)" in refusal(
        Calls(lambda x: F.adaptive_avg_pool2d(x, 4)))


def test_stochastic_depth_in_training_is_refused():
    with pytest.raises(CaptureError, match=r"depth \(StochasticDepth\): in training mode"):
        trace(Dropouts().train())
