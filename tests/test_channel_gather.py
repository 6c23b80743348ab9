"""Channel shuffles and channel slices (QChannelGather, docs/math.md eq. 33): capture of the chains that
spell them, conversion, every executor against the reference, the model file and its hostile edits."""
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import edited_file_refusal, make_pixels, round_tripped
from intq.executors.registry import executor, run
from intq.executors.reference import run_integer
from intq.graph.capture import CaptureError, ChannelGather, capture
from intq.graph.capture_channels import channel_move
from intq.graph.capture_rewrites import Refused
from intq.graph.config import RECOMMENDED
from intq.graph.convert import collect_statistics, convert
from intq.graph.integer_model import QChannelGather
from intq.graph.model_check import ModelCheckError, check_model
from intq.graph.model_file import to_arrays
from test_lookup import at_bits, converted, exact_and_close, output_steps

MAX_OUTPUT_STEPS = {8: 4, 4: 3}  # the model output's error from the float model, in its own steps


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's shufflenetv2.channel_shuffle, verbatim."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups

    # reshape
    x = x.view(batchsize, groups, channels_per_group, height, width)

    x = torch.transpose(x, 1, 2).contiguous()

    # flatten
    x = x.view(batchsize, -1, height, width)

    return x


class Shuffled(nn.Module):
    """ShuffleNet's unit: chunk, one branch, cat, shuffle; then a conv and a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4))
        self.head = nn.Conv2d(8, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)
        return self.fc(torch.flatten(self.head(x), 1))


class Splits(nn.Module):
    """torch.split with a list of sizes, x.split(int), x[:, a:b] and torch.concat / torch.concatenate."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 9, 3, stride=2, padding=1)
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(4, 3, 3, padding=1)
        self.head = nn.Conv2d(12, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        x = self.stem(x)
        p, q, r = torch.split(x, [2, 4, 3], dim=1)
        s, _ = x.split(6, 1)  # channels 0..5, then 6..8 unused
        y = torch.concat([self.a(p), torch.relu(self.b(q)), r], dim=1)
        y = torch.concatenate((y[:, 3:9], s), 1)
        return self.fc(self.head(y).reshape(x.size(0), -1))


MODELS = {"shuffle": Shuffled, "splits": Splits}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gather_end_to_end(name, bits):
    graph, model, pixels = converted(MODELS[name](), at_bits(bits), count=24)
    gathers = [op for op in model.layers if isinstance(op, QChannelGather)]
    assert gathers
    qparams = model.value_qparams()
    for op in gathers:  # the integers move unchanged: the input's QParams
        assert qparams[op.name] is qparams[op.inputs[0]]
    steps = output_steps(graph, model, pixels, run_integer(model, pixels))
    assert steps <= MAX_OUTPUT_STEPS[bits], steps
    exact_and_close(model, pixels[:12])


def test_the_shuffle_and_the_chunks_become_channel_maps():
    """chunk -> the halves [0, 4) and [4, 8); the shuffle of 2 groups of 4 -> 0, 4, 1, 5, 2, 6, 3, 7."""
    graph = capture(Shuffled().eval(), make_pixels(2))
    maps = {node.name: node.op.indices for node in graph.nodes if isinstance(node.op, ChannelGather)}
    assert maps == {"getitem": (0, 1, 2, 3), "getitem_1": (4, 5, 6, 7), "view_1": (0, 4, 1, 5, 2, 6, 3, 7)}
    assert graph.node("view_1").inputs == ("cat",)


def test_the_splits_become_channel_maps():
    graph = capture(Splits().eval(), make_pixels(2))
    maps = [node.op.indices for node in graph.nodes if isinstance(node.op, ChannelGather)]
    assert maps == [(0, 1), (2, 3, 4, 5), (6, 7, 8), (3, 4, 5, 6, 7, 8), (0, 1, 2, 3, 4, 5)]


def test_the_gather_moves_integers_unchanged():
    _, model, pixels = converted(Shuffled(), RECOMMENDED, count=4)
    values = {}
    run_integer(model, pixels, visit=lambda name, q: values.__setitem__(name, q))
    op = model.layer("view_1")
    assert torch.equal(values["view_1"], values["cat"][:, list(op.indices)])


def test_channel_move_reads_whole_channel_moves_only():
    shape = (2, 6, 3, 4)
    positions = torch.arange(2 * 6 * 3 * 4).reshape(shape)
    assert channel_move(positions, shape) == "identity"
    assert channel_move(positions.reshape(2, -1), shape) == "flatten"
    assert isinstance(channel_move(positions.reshape(1, -1)[:, :5], (1, 144)), Refused)  # a slice, not a flatten
    assert channel_move(positions.flip(1), shape) == ChannelGather((5, 4, 3, 2, 1, 0))
    assert isinstance(channel_move(positions.flip(3), shape), Refused)  # the columns reversed
    assert "from (2, 6, 3, 4) to (2, 6, 3, 4)" in channel_move(positions.transpose(2, 3).reshape(shape), shape).reason
    assert "from (2, 6, 3, 4) to (2, 6, 4, 3)" in channel_move(positions.transpose(2, 3), shape).reason


class SpatialMix(nn.Module):
    """A reshape that moves values between channels and positions (a space-to-depth)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        return self.b(y.reshape(n, c * 4, h // 2, w // 2))


class Shifted(nn.Module):
    """x[:, :, 1:] slices rows: the same shape pattern (N, C, H', W) but not a channel move."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.a(x)[:, :, 1:]


def test_a_reshape_that_mixes_positions_and_channels_is_refused_naming_the_node_and_shapes():
    with pytest.raises(CaptureError, match=r"SpatialMix: unsupported operations: reshape \(call_method reshape\): a "
                                           r"view/reshape/transpose/slice chain from \(2, 4, 16, 16\) to "
                                           r"\(2, 16, 8, 8\) that is neither a flatten"):
        capture(SpatialMix().eval(), make_pixels(2))
    with pytest.raises(CaptureError, match=r"getitem \(call_function getitem\): .* from \(2, 4, 16, 16\) to "
                                           r"\(2, 4, 15, 16\)"):
        capture(Shifted().eval(), make_pixels(2))


@pytest.fixture(scope="module")
def shuffle_model():
    """The shuffle unit converted at 8 bits, and its pixels."""
    _, model, pixels = converted(Shuffled(), RECOMMENDED, count=8)
    return model, pixels


def test_the_model_file_round_trips_with_int32_indices(tmp_path, shuffle_model):
    assert round_tripped(*shuffle_model, tmp_path).layer("view_1").indices == (0, 4, 1, 5, 2, 6, 3, 7)
    assert to_arrays(shuffle_model[0])["view_1.indices"].dtype == np.int32


def _tampered(index: int, model):
    arrays = to_arrays(model)
    arrays["view_1.indices"] = arrays["view_1.indices"].copy()
    arrays["view_1.indices"][3] = index
    return arrays


@pytest.mark.parametrize("index, message", [(8, r"'view_1': index 8 is not a channel of its input \(8 channels\)"),
                                            (-1, r"'view_1': array 'indices' holds -1, not a channel index")])
def test_a_tampered_index_is_refused_in_one_line(tmp_path, shuffle_model, index, message):
    from intq.graph.model_file import ModelFileError, load

    np.savez_compressed(tmp_path / "edited.npz", **_tampered(index, shuffle_model[0]))
    with pytest.raises(ModelFileError) as error:
        load(tmp_path / "edited.npz")
    assert "\n" not in str(error.value) and re.search(message, str(error.value)), str(error.value)


def test_a_count_that_differs_from_the_array_is_refused(tmp_path, shuffle_model):
    message = edited_file_refusal(tmp_path, shuffle_model[0], lambda ops: ops["view_1"].update(channels=7))
    assert re.search(r"array 'view_1.indices'.*shape \(7,\)", message), message


def test_check_model_refuses_an_index_outside_the_input(shuffle_model):
    from dataclasses import replace

    model, _ = shuffle_model
    op = model.layer("view_1")
    edited = replace(model, layers=[replace(op, indices=(0, 9)) if layer is op else layer for layer in model.layers])
    with pytest.raises(ModelCheckError, match="'view_1': index 9 is not a channel of its input"):
        check_model(edited)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_torchvision_shufflenet_captures_converts_and_runs_bit_exact_in_c():
    """shufflenet_v2_x1_0 at 64 x 64: 16 shuffles and 13 chunk pairs (each half of a shuffle: one gather)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = torchvision.models.shufflenet_v2_x1_0(num_classes=10).eval()
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    graph = capture(module, pixels[:2])
    assert sum(isinstance(node.op, ChannelGather) for node in graph.nodes) == 3 + 13 * 2
    model = convert(graph, collect_statistics(graph, [pixels]), RECOMMENDED)
    assert torch.equal(run(executor("c").prepare(model), pixels[:2]), run_integer(model, pixels[:2]))
