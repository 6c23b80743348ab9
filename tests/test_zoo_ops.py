"""The leftovers torchvision's classifiers need (issue 13, part 4): MaxPool2d(ceil_mode=True) (eq. 31),
in-place activations, a BatchNorm with no layer to fold into (a depthwise 1x1 conv or a diagonal linear,
eq. 13), AdaptiveAvgPool2d to a multiple of its input folded into the Linear after it (eq. 32). Each
captured (capture proves graph == model on its example), converted, close to the float model, c and
onnx_exact bit-exact against the reference, the other engines within 1 LSB per op; each refusal names
the node and the attribute or sizes; the model file's ceil_mode."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import edited_file_refusal, round_tripped
from intq.arith.qparams import dequantize
from intq.executors.reference import run_integer
from intq.executors.simulate import layer_agreement
from intq.graph.capture import CaptureError, Conv2d, Identity, Linear, MaxPool2d, ReLU, capture, run_float, trace
from intq.graph.integer_model import QMaxPool, pool_output_size
from intq.graph.model_check import ModelCheckError, check_model
from intq.graph.model_file import ModelFileError, load, to_arrays
from test_lookup import at_bits, converted, exact_and_close

MAX_OUTPUT_STEPS = 6  # the model output's error from the float model, in its own steps (8 bits)


def check_all(kind: type, count: int = 16):
    """A seeded `kind()` captured, converted, near the float model, the float64 simulation within 1 LSB per op, c and
    onnx_exact bit-exact and onnx / torch_quantized within 1 LSB per op; (graph, model, pixels)."""
    torch.manual_seed(0)
    module = kind()
    graph, model, pixels = converted(module, at_bits(8), count=count)
    reference = run_integer(model, pixels)
    output_qp = model.output_qparams()
    with torch.no_grad():
        expected = module(graph.preprocessing.apply(pixels)).double()
        assert torch.allclose(run_float(graph, graph.preprocessing.apply(pixels)).double(), expected, atol=1e-4)
    steps = float((dequantize(reference, output_qp, torch.float64) - expected).abs().max()) / float(output_qp.scale)
    assert steps <= MAX_OUTPUT_STEPS, steps
    for row in layer_agreement(model, pixels[:4]):
        assert row["max_lsb"] <= 1, row
    exact_and_close(model, pixels[:6])
    return graph, model, pixels


# ---- MaxPool2d(ceil_mode=True) ----

@pytest.mark.parametrize("size, kernel, stride, padding", [(n, k, s, p) for n in range(1, 10) for k in range(1, 5)
                                                          for s in range(1, 4) for p in range(k // 2 + 1) if n + 2 * p >= k])
def test_the_ceil_mode_output_size_is_pytorchs(size, kernel, stride, padding):
    """eq. 31 against PyTorch's own shape, the last window dropped when it would start past the input."""
    for ceil_mode in (False, True):
        got = F.max_pool2d(torch.zeros(1, 1, size, 1), (kernel, 1), (stride, 1), (padding, 0), ceil_mode=ceil_mode)
        assert pool_output_size(size, kernel, stride, padding, ceil_mode) == got.shape[2]


class CeilPools(nn.Module):
    """F.max_pool2d(2, 2, padding=1, ceil_mode=True) on 15x15, where ceil's last window would start in the
    right padding and PyTorch drops it (8 windows, not 9), then squeezenet's MaxPool2d(3, 2, ceil_mode=True)
    on 8x8: 4 windows, the last one clipped (floor: 3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2)  # 15x15
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2, 1, ceil_mode=True)
        x = self.pool1(F.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def ceil_model():
    return check_all(CeilPools)


def test_ceil_mode_max_pools_end_to_end(ceil_model):
    graph, model, _ = ceil_model
    assert [node.op for node in graph.nodes if isinstance(node.op, MaxPool2d)] == [
        MaxPool2d((2, 2), (2, 2), (1, 1), True), MaxPool2d((3, 3), (2, 2), (0, 0), True)]
    assert [op.ceil_mode for op in model.layers if isinstance(op, QMaxPool)] == [True, True]


def test_ceil_mode_round_trips_and_files_without_it_read_floor(tmp_path, ceil_model):
    _, model, pixels = ceil_model
    round_tripped(model, pixels, tmp_path)
    floor = replace(model, layers=[replace(op, ceil_mode=False) if isinstance(op, QMaxPool) else op
                                   for op in model.layers])
    meta = json.loads(to_arrays(floor)["__meta__"].tobytes().decode())
    pools = [op for op in meta["layers"] if op["type"] == "QMaxPool"]
    assert pools and all("ceil_mode" not in op for op in pools)  # what main wrote; it reads as floor
    np.savez_compressed(tmp_path / "floor.npz", **to_arrays(floor))
    with pytest.raises(ModelFileError, match=r"'fc': a linear layer with 96 input features reads a tensor of shape "
                                             r"\(54,\)"):
        load(tmp_path / "floor.npz")  # floor sizes: pool1 gives 3x3, which the linear layer does not read


def test_a_hostile_ceil_mode_is_refused(tmp_path, ceil_model):
    message = edited_file_refusal(tmp_path, ceil_model[1], lambda ops: ops["pool1"].update(ceil_mode="yes"))
    assert "field 'ceil_mode' must be true or false, got 'yes'" in message


def test_check_model_recomputes_the_ceil_mode_shape(ceil_model):
    model = ceil_model[1]
    edited = replace(model, layers=[replace(op, ceil_mode=False) if op.name == "pool1" else op
                                    for op in model.layers])
    with pytest.raises(ModelCheckError, match="'fc': a linear layer with 96 input features reads a tensor of shape "
                                              r"\(54,\)"):
        check_model(edited)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_the_c_runtime_refuses_a_ceil_pool_entered_as_floor(tmp_path, ceil_model):
    """pool1's 4 windows over 8 columns exist only with ceil_mode (eq. 31); the op table's entry edited to
    ceil_mode 0 fails intq_check before anything runs."""
    from intq.executors.c_export import export_c
    from test_c_export import compile_and_run

    _, model, pixels = ceil_model
    export_c(model, pixels[:1], tmp_path)
    header = (tmp_path / "model.h").read_text()
    index = [op.name for op in model.layers].index("pool1")
    entry = header.index(f"/* op {index}: QMaxPool")
    assert ".ceil_mode = 1" in header[entry:]
    (tmp_path / "model.h").write_text(header[:entry] + header[entry:].replace(".ceil_mode = 1", ".ceil_mode = 0", 1))
    result = compile_and_run(tmp_path)
    assert result.returncode == 3 and f"op {index} of model.h fails the runtime's shape and length check" in result.stdout


# ---- in-place activations ----

class InPlace(nn.Module):
    """Every in-place form; y.relu_() overwrites y after conv 9 read it and before conv 8 and add_ do."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, stride=4 if i == 0 else 1, padding=1)
                                   for i in range(10))  # 8x8 after the first
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        c = self.convs
        x = F.relu(c[0](x), inplace=True)
        x = self.relu(c[1](x))
        x = F.relu6(c[2](x), inplace=True)
        x = F.hardtanh(c[3](x), -0.5, 0.5, True)
        x = F.hardswish(c[4](x), inplace=True)
        x = F.hardsigmoid(c[5](x), True)
        x = F.silu(c[6](x), inplace=True)
        y = c[7](x)
        before = c[9](y)
        y.relu_()
        w = c[8](y)
        w.add_(y)
        return self.fc((w + before).flatten(1))


def test_in_place_activations_are_their_out_of_place_ops():
    graph, _, _ = check_all(InPlace)
    inputs = {node.name: node.inputs for node in graph.nodes}
    assert inputs["convs_9"] == ("convs_7",) and inputs["convs_8"] == ("relu_",)  # read before / after relu_
    assert inputs["add_"] == ("convs_8", "relu_") and inputs["add"] == ("add_", "convs_9")
    assert isinstance(graph.node("relu_").op, ReLU)


# ---- BatchNorm with no layer to fold into ----

def _batchnorm(channels: int, kind=nn.BatchNorm2d) -> nn.Module:
    """A BatchNorm with random running statistics and affine parameters (seeded by its width)."""
    bn = kind(channels)
    generator = torch.Generator().manual_seed(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=generator))
        bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        bn.weight.copy_(torch.randn(channels, generator=generator))
        bn.bias.copy_(torch.randn(channels, generator=generator))
    return bn


class LooseBatchNorms(nn.Module):
    """BatchNorm2d on the input, after a conv (folds), after a conv whose output an add reads too, after an
    add, a pool and a concat; BatchNorm1d after a Linear (folds) and after a ReLU."""

    def __init__(self):
        super().__init__()
        self.bn_in = _batchnorm(3)
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, stride=2, padding=1), _batchnorm(6)  # 16x16
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), _batchnorm(6)
        self.bn_add, self.pool, self.bn_pool, self.bn_cat = _batchnorm(6), nn.MaxPool2d(2), _batchnorm(6), _batchnorm(12)
        self.fc1, self.bn_fc = nn.Linear(12 * 8 * 8, 10), _batchnorm(10, nn.BatchNorm1d)
        self.bn_1d, self.fc2 = _batchnorm(10, nn.BatchNorm1d), nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.bn_in(x))))
        y = self.conv2(x)
        z = F.relu(self.bn2(y)) + y
        z = self.bn_pool(self.pool(self.bn_add(z)))
        c = self.bn_cat(torch.cat([z, self.pool(x)], 1))
        h = F.relu(self.bn_fc(self.fc1(c.flatten(1))))
        return self.fc2(self.bn_1d(h))


def test_loose_batchnorms_become_depthwise_convs_or_diagonal_linears():
    graph, model, _ = check_all(LooseBatchNorms)
    names = [node.name for node in graph.nodes]
    assert "bn1" not in names and "bn_fc" not in names  # folded into conv1 and fc1
    for name in ("bn_in", "bn2", "bn_add", "bn_pool", "bn_cat"):
        op = graph.node(name).op
        assert isinstance(op, Conv2d) and op.groups == op.weight.shape[0] and op.weight.shape[1:] == (1, 1, 1)
        assert model.layer(name).geometry["groups"] == op.groups
    linear = graph.node("bn_1d").op
    assert isinstance(linear, Linear) and torch.equal(linear.weight, torch.diag(torch.diagonal(linear.weight)))


def test_batchnorm_in_training_mode_or_without_running_statistics_is_refused():
    with pytest.raises(CaptureError, match=r"bn_in \(BatchNorm2d\): in training mode \(call model.eval\(\)\)"):
        trace(LooseBatchNorms().train())
    model = LooseBatchNorms()
    model.bn_cat = nn.BatchNorm2d(12, track_running_stats=False)
    with pytest.raises(CaptureError, match=r"bn_cat \(BatchNorm2d\): track_running_stats=False"):
        capture(model, torch.randn(2, 3, 32, 32))


# ---- AdaptiveAvgPool2d to a multiple of the input ----

class Replicated(nn.Module):
    """vgg's head at a small input: 1x1 features, AdaptiveAvgPool2d((6, 3)), flatten, dropout, Linear."""

    def __init__(self, reader: str = "linear"):
        super().__init__()
        self.reader = reader
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.rep = nn.AdaptiveAvgPool2d((6, 3))
        self.drop = nn.Dropout()
        self.fc = nn.Linear(6 * 18, 5)

    def forward(self, x):
        x = self.rep(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1))
        if self.reader == "conv":
            return x
        return self.fc(self.drop(torch.flatten(x, 1)))


def test_a_replicating_adaptive_pool_folds_into_the_linear():
    graph, model, _ = check_all(Replicated)
    assert isinstance(graph.node("rep").op, Identity)
    assert model.layer("fc").weight.shape == (5, 6)  # 6 x 18 columns summed into 6


def test_fold_sums_each_inputs_replicated_columns():
    module = Replicated().eval()
    graph = capture(module, torch.randn(2, 3, 32, 32))
    expected = module.fc.weight.detach().reshape(5, 6, 18).sum(dim=2)  # each channel's 6x3 copies
    assert torch.allclose(graph.node("fc").op.weight, expected, atol=1e-6)


def test_a_replication_read_by_anything_else_is_refused_naming_the_sizes():
    with pytest.raises(CaptureError, match=r"rep \(AdaptiveAvgPool2d\): output size \(6, 3\) is a multiple of the "
                                           r"input size \(1, 1\), a replication intq folds only into a flatten then "
                                           r"one Linear; here it is read by the output"):
        capture(Replicated("conv").eval(), torch.randn(2, 3, 32, 32))
