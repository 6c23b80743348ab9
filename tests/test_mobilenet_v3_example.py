"""examples/mobilenet_v3.py (issue 13's MobileNetV3-style model): loaded as the CLI loads a user's model
file, it captures and converts with random weights on synthetic pixels, every op of the issue present
(depthwise convs, Hardswish and Hardsigmoid tables, the squeeze-excite product, a concatenation,
residual adds), and its integer logits follow the float model's."""
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from conftest import make_pixels, round_tripped
from intq.arith.preprocessing import Preprocessing
from intq.arith.qparams import dequantize
from intq.executors.reference import run_integer
from intq.graph.capture import capture
from intq.graph.config import RECOMMENDED
from intq.graph.convert import collect_statistics, convert
from intq.graph.integer_model import QAdd, QConcat, QConv2d, QLookup, QMul
from intq.workflows.user_model import load_user_model

SPEC = str(Path(__file__).resolve().parents[1] / "examples" / "mobilenet_v3.py") + ":cifar"
CIFAR = Preprocessing((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def seeded_model(pixels: torch.Tensor) -> nn.Module:
    """Random weights, BatchNorm statistics of the model's own activations on `pixels` (as after training)."""
    torch.manual_seed(0)
    model = load_user_model(SPEC)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # the plain average of the batches seen
    with torch.no_grad():
        model.train()(CIFAR.apply(pixels))
    return model.eval()


def test_mobilenet_v3_example_captures_and_converts(tmp_path):
    pixels = make_pixels(64)
    model = seeded_model(pixels)
    graph = capture(model, pixels[:2], CIFAR)
    integer = convert(graph, collect_statistics(graph, [pixels]), RECOMMENDED)

    kinds = Counter(type(op).__name__ for op in integer.layers)
    assert kinds["QMul"] == 5 and kinds["QConcat"] == 1 and kinds["QAdd"] == 3
    depthwise = [op for op in integer.layers if isinstance(op, QConv2d) and op.geometry["groups"] > 1]
    assert len(depthwise) == 8 and all(op.geometry["groups"] == op.weight.shape[0] for op in depthwise)
    assert Counter(op.kind for op in integer.layers if isinstance(op, QLookup)) == {"hardswish": 12, "hardsigmoid": 5}
    assert all(isinstance(op, (QAdd, QConcat, QMul)) == (len(op.inputs) > 1) for op in integer.layers)

    logits = dequantize(run_integer(integer, pixels), integer.layers[-1].output_qparams, torch.float64)
    with torch.no_grad():
        expected = model(CIFAR.apply(pixels)).double()
    assert torch.corrcoef(torch.stack([logits.flatten(), expected.flatten()]))[0, 1] > 0.99  # 0.9975 measured
    round_tripped(integer, pixels, tmp_path)
