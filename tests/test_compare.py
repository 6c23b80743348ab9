"""`intq compare`: the same float model through PyTorch's PTQ (torchao pt2e, torch.ao FX as the
fallback) and through intq."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import calibrated, make_pixels, write_image_folder
from hostile import run_cli
from intq.workflows.compare import batch_sizes, compare
from intq.workflows.peer import (FX_ROW, PT2E_ROW, PeerError, compiled_int8, graph_tensors, peer_quantize,
                                 pt2e_quantize, reshape_views, torch_ao_quantize)
from intq.graph.config import RECOMMENDED
from intq.graph.convert import convert
from intq.cifar.data import Dataset
from intq.cifar.models import Net

pytest.importorskip("torchao")


def study_normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255 - 0.5) / 0.5


class MobileBlock(nn.Module):
    """Depthwise conv, Hardswish, a Hardsigmoid gate (mul) and a channel concatenation: the ops of a
    MobileNetV3-style model, each of which pt2e must take."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Hardswish())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
        self.project = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.depthwise(x)
        y = y * self.gate(y)
        x = self.project(torch.cat([x, y], dim=1))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mobile_block() -> nn.Module:
    torch.manual_seed(0)
    model = MobileBlock().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.2, 0.2)
        model.stem[1].running_var.uniform_(0.5, 2.0)
        model.head.weight.mul_(8)  # well separated logits, so that int8 keeps their order
    return model


@torch.fx.wrap
def numpy_relu(x: torch.Tensor) -> torch.Tensor:
    """A leaf to torch.fx, but .numpy() on torch.export's fake tensors fails: a model pt2e cannot take."""
    return torch.from_numpy(np.maximum(x.detach().numpy(), 0))


class NumpyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(numpy_relu(self.conv(x)), 1), 1))


class BranchingNet(NumpyNet):
    def forward(self, x):  # control flow on a value: neither torch.export nor torch.fx traces it
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x if x.sum() > 0 else -x), 1), 1))


def test_view_becomes_reshape_and_computes_the_same():
    torch.manual_seed(0)
    model = Net().eval()
    traced = reshape_views(model)
    assert "reshape" in traced.code and ".view(" not in traced.code
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(traced(x), model(x))


def test_pt2e_takes_depthwise_hardswish_mul_and_cat_and_agrees_with_float():
    model, pixels = mobile_block(), make_pixels(96)
    converted = pt2e_quantize(model, pixels[:64], study_normalize)
    x = study_normalize(pixels[64:])
    with torch.no_grad():
        expected, got = model(x), converted(x)
    assert (expected.argmax(1) == got.argmax(1)).float().mean() >= 0.9
    assert (expected - got).abs().max() < 0.1 * expected.abs().max()
    int8 = {name: t for name, t in graph_tensors(converted).items() if t.dtype == torch.int8}
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(t.numel() for t in int8.values()) == sorted(w.numel() for w in weights)  # every weight int8


def test_compiled_pt2e_runs_int8_kernels_and_matches_eager():
    from torch._dynamo.utils import counters
    model, pixels = mobile_block(), make_pixels(24)
    converted = pt2e_quantize(model, pixels[:16], study_normalize)
    counters.clear()
    forward, seconds = compiled_int8(converted, study_normalize, [8], (3, 32, 32))
    lowered = counters["inductor"]
    assert lowered["qconv_weight_prepack_matcher_count"] == 4 and lowered["qlinear_weight_prepack_matcher_count"] == 1
    assert seconds > 0
    with torch.no_grad():
        eager, compiled = converted(study_normalize(pixels[16:])), forward(pixels[16:])
    assert torch.equal(eager.argmax(1), compiled.argmax(1))
    assert (eager - compiled).abs().max() < 0.05 * eager.abs().max()


def test_fx_runs_only_where_pt2e_cannot_and_says_why():
    torch.manual_seed(0)
    pixels = make_pixels(8)
    peer = peer_quantize(NumpyNet().eval(), pixels, study_normalize, [8], compile_model=False)
    assert peer.row == FX_ROW and len(peer.notes) == 1
    assert peer.notes[0].startswith("fallback: torchao pt2e could not run (RuntimeError: ") and "numpy" in peer.notes[0]
    assert peer.forward(pixels[:3]).shape == (3, 10)
    with pytest.raises(PeerError, match=r"torchao pt2e: .*; torch.ao FX: TraceError"):
        peer_quantize(BranchingNet().eval(), pixels, study_normalize, [8], compile_model=False)


def test_batch_sizes_are_every_shape_compare_runs():
    assert batch_sizes(10_000) == {1, 256, 500}
    assert batch_sizes(1_234) == {1, 256, 500, 234}
    assert batch_sizes(64) == {1, 64}


def test_compare_rows_cover_float_pt2e_and_intq():
    torch.manual_seed(0)
    model = Net().eval()
    pixels = make_pixels(64)
    labels = torch.randint(0, 10, (64,))
    data = Dataset(pixels, labels, pixels, labels, tuple(f"c{i}" for i in range(10)), "synthetic")
    graph, stats = calibrated(model, pixels)
    rows = compare(model, convert(graph, stats, RECOMMENDED), 1000, data, pixels, compile_peer=False)
    assert [row["executor"] for row in rows] == ["PyTorch float32", PT2E_ROW, "intq reference (integer)",
                                                 "intq on PyTorch kernels (onednn)", "intq on ONNX Runtime",
                                                 "intq QDQ on ONNX Runtime"]
    assert rows[1]["note"] == "eager: quantize/dequantize around float ops (int8 simulated, not int8 speed)"
    assert rows[1]["top1_agreement_with_intq"] >= 90.0
    assert rows[2]["top1_agreement_with_intq"] == 100.0
    assert rows[4]["top1_agreement_with_intq"] >= 98.0
    assert rows[5]["top1_agreement_with_intq"] >= 98.0 and rows[5]["note"].startswith("QDQ graph: float ops")
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights < rows[5]["bytes"] < rows[0]["bytes"] / 3  # the QDQ file: int8 weights, int32 biases, scales
    assert weights < rows[1]["bytes"] < rows[0]["bytes"] / 3  # int8 weights, float32 biases and scales
    assert all(row["throughput_b256"] > 0 and row["latency_ms_b1"] > 0 for row in rows)


def test_torch_ao_model_runs_on_uint8_batches():
    torch.manual_seed(0)
    quantized = torch_ao_quantize(Net().eval(), make_pixels(16))
    assert quantized(study_normalize(make_pixels(4))).shape == (4, 10)


USER_MODEL = """import torch
import torch.nn as nn


class Mobile(nn.Module):  # depthwise conv, Hardswish and a channel concatenation
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Hardswish())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.cat([x, self.depthwise(x)], dim=1))


def build():
    return Mobile()
"""


def test_compare_command_on_a_user_model(tmp_path):
    """README's user-model options, with the pt2e row (eager, to keep the test short)."""
    data = write_image_folder(tmp_path / "data", train_per_class=3, test_per_class=2)
    (tmp_path / "mine.py").write_text(USER_MODEL)
    namespace = {}
    exec((tmp_path / "mine.py").read_text(), namespace)
    torch.manual_seed(0)
    torch.save(namespace["build"]().state_dict(), tmp_path / "w.pt")
    result = run_cli(["compare", "--model", f"{tmp_path / 'mine.py'}:build", "--weights", tmp_path / "w.pt",
                      "--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.25", "0.3", "--data", data,
                      "--cache", tmp_path / "c", "--peer-eager"])
    assert result.code == 0, result.err
    assert PT2E_ROW in result.out and "intq reference" in result.out and "intq on ONNX Runtime" in result.out
    assert "intq QDQ on ONNX Runtime" in result.out
    assert f"note ({PT2E_ROW}): eager: quantize/dequantize" in result.out
