"""Lookup-table activations (QLookup, docs/math.md eq. 29): capture, calibration, the table against an
independent float64 computation, every executor against the reference, the model file."""
import math
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import edited_file_refusal, make_pixels, round_tripped
from intq.arith.lookup import ACTIVATIONS
from intq.arith.qparams import IntType, QParams, dequantize
from intq.executors.registry import executor, run
from intq.executors.reference import run_integer
from intq.executors.verify import layer_differences
from intq.graph.capture import Activation, capture, run_float
from intq.graph.config import RECOMMENDED, STUDY
from intq.graph.convert import ConversionError, collect_statistics, convert
from intq.graph.integer_model import QLookup
from intq.graph.model_check import ModelCheckError, check_model
from intq.graph.model_file import to_arrays

# kind -> the module that captures as it
MODULES = {
    "sigmoid": lambda: nn.Sigmoid(), "hardsigmoid": lambda: nn.Hardsigmoid(), "hardswish": lambda: nn.Hardswish(),
    "silu": lambda: nn.SiLU(), "tanh": lambda: nn.Tanh(), "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "hardtanh": lambda: nn.Hardtanh(-1.0, 1.0),
}

# The same functions written independently of torch, in float64 (math module).
INDEPENDENT = {
    "sigmoid": lambda x, p: 1 / (1 + math.exp(-x)),
    "hardsigmoid": lambda x, p: min(max(x / 6 + 0.5, 0.0), 1.0),
    "hardswish": lambda x, p: x * min(max(x + 3, 0.0), 6.0) / 6,
    "silu": lambda x, p: x / (1 + math.exp(-x)),
    "tanh": lambda x, p: math.tanh(x),
    "gelu": lambda x, p: 0.5 * x * (1 + math.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x, p: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "leaky_relu": lambda x, p: x if x >= 0 else p["negative_slope"] * x,
    "hardtanh": lambda x, p: min(max(x, p["min"]), p["max"]),
}


MAX_OUTPUT_STEPS = {8: 4, 4: 3}  # the model output's error from the float model, in its own steps


def at_bits(bits: int):
    """The recommended preset with `bits`-bit activations and logits."""
    return replace(RECOMMENDED, activations=replace(RECOMMENDED.activations, bits=bits, output_bits=None))


class Gated(nn.Module):
    """conv -> activation -> conv -> linear: the activation reads an 8-bit (or narrower) requantized value."""

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2)
        self.act = activation
        self.conv2 = nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4 * 13 * 13, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv2(self.act(self.conv1(x))), 1))


def converted(module: nn.Module, config, count: int = 32):
    torch.manual_seed(0)
    pixels = make_pixels(count)
    graph = capture(module.eval(), pixels[:2])
    return graph, convert(graph, collect_statistics(graph, [pixels]), config), pixels


def output_steps(graph, model, pixels: torch.Tensor, reference: torch.Tensor) -> float:
    """The model output's largest distance from the float graph's, in output steps: max |s (q - z) - f| / s."""
    output_qp = model.output_qparams()
    with torch.no_grad():
        float_output = run_float(graph, graph.preprocessing.apply(pixels)).double()
    return float((dequantize(reference, output_qp, torch.float64) - float_output).abs().max()) / float(output_qp.scale)


def independent_table(kind: str, params: dict, input_qp: QParams, output_qp: QParams) -> np.ndarray:
    """clamp(z_y + round(f(s_x (q - z_x)) / s_y)), half away from zero, code by code in Python floats."""
    codes = range(input_qp.dtype.qmin, input_qp.dtype.qmax + 1)
    scale, zero = float(output_qp.scale), int(output_qp.zero_point)
    table = []
    for q in codes:
        ratio = INDEPENDENT[kind](float(input_qp.scale) * (q - int(input_qp.zero_point)), params) / scale
        rounded = math.copysign(math.floor(abs(ratio) + 0.5), ratio)
        table.append(min(max(zero + int(rounded), output_qp.dtype.qmin), output_qp.dtype.qmax))
    return np.array(table)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_every_kind_end_to_end(kind, bits):
    graph, model, pixels = converted(Gated(MODULES[kind]()), at_bits(bits))
    (op,) = [op for op in model.layers if isinstance(op, QLookup)]
    assert op.kind == kind and op.inputs == ("conv1",) and not model.layer("conv1").relu
    assert op.input_qparams.dtype.bits == bits == op.output_qparams.dtype.bits
    assert np.array_equal(op.table, independent_table(kind, op.params, op.input_qparams, op.output_qparams))
    # the lookup op's integers against the float activation of the integers it read: within half an output step
    values = {}
    reference = run_integer(model, pixels, visit=lambda name, q: values.__setitem__(name, q))
    real_in = dequantize(values["conv1"], op.input_qparams, torch.float64)
    lower, upper = (float(op.output_qparams.scale) * (q - int(op.output_qparams.zero_point))
                    for q in (op.output_qparams.dtype.qmin, op.output_qparams.dtype.qmax))
    expected = ACTIVATIONS[kind][1](real_in, **op.params).clamp(lower, upper)
    error = (dequantize(values["act"], op.output_qparams, torch.float64) - expected).abs().max()
    assert error <= float(op.output_qparams.scale) / 2 + 1e-12
    steps = output_steps(graph, model, pixels, reference)  # the model output against the float model
    assert steps <= MAX_OUTPUT_STEPS[bits], steps
    exact_and_close(model, pixels[:12])


def exact_and_close(model, pixels):
    """c and onnx_exact bit-exact against the reference; onnx and torch_quantized within 1 LSB per op."""
    pytest.importorskip("onnxruntime")
    reference = run(executor("reference").prepare(model), pixels)
    names = ["onnx_exact", "onnx", "torch_quantized"] + (["c"] if shutil.which("cc") or shutil.which("gcc") else [])
    for name in names:
        chosen = executor(name)
        forward = chosen.prepare(model)
        if name in ("c", "onnx_exact"):
            assert torch.equal(run(forward, pixels), reference), name
            continue
        for op_name, row in layer_differences(model, chosen.op_steps(model, forward), pixels).items():
            assert row["max_lsb"] <= 1, (name, op_name, row)
            if isinstance(model.layer(op_name), QLookup):
                assert row["differing"] == 0, (name, op_name, row)  # the table itself, exactly


class Functional(nn.Module):
    """The functional and method forms, inplace ones included."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(9))
        self.fc = nn.Linear(4 * 32 * 32, 3)

    def forward(self, x):
        forms = [torch.sigmoid, lambda y: y.tanh(), lambda y: F.silu(y, inplace=True), F.hardswish,
                 lambda y: F.hardsigmoid(y, inplace=True), lambda y: F.gelu(y, approximate="tanh"),
                 lambda y: F.leaky_relu(y, 0.2, inplace=True), lambda y: F.hardtanh(y, -2.0, 2.0), F.gelu]
        for conv, form in zip(self.convs, forms):
            x = form(conv(x))
        return self.fc(torch.flatten(x, 1))


def test_functional_and_inplace_forms_are_captured_with_their_parameters():
    graph, model, pixels = converted(Functional(), RECOMMENDED, count=8)
    captured = [(node.op.kind, node.op.params) for node in graph.nodes if isinstance(node.op, Activation)]
    assert captured == [("sigmoid", {}), ("tanh", {}), ("silu", {}), ("hardswish", {}), ("hardsigmoid", {}),
                        ("gelu_tanh", {}), ("leaky_relu", {"negative_slope": 0.2}), ("hardtanh", {"min": -2.0, "max": 2.0}),
                        ("gelu", {})]
    assert [op.kind for op in model.layers if isinstance(op, QLookup)] == [kind for kind, _ in captured]
    assert torch.equal(run(executor("onnx_exact").prepare(model), pixels), run_integer(model, pixels).to(torch.int64))


class Clamps(nn.Module):
    """A LeakyReLU and a Hardtanh(-1, 1) after convs, a ReLU6 after a max pool (none can fuse), and a
    ReLU6 after a conv (fused into its clamp, as before)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.leaky, self.hardtanh, self.pool, self.relu6 = nn.LeakyReLU(0.1), nn.Hardtanh(-1, 1), nn.MaxPool2d(2), nn.ReLU6()
        self.fc = nn.Linear(4 * 12 * 12, 3)

    def forward(self, x):
        x = self.relu6(self.pool(self.hardtanh(self.conv2(self.leaky(self.conv1(x))))))
        return self.fc(torch.flatten(F.relu6(self.conv3(x)), 1))


def test_clamps_that_cannot_fuse_become_tables_and_a_fusable_relu6_still_fuses():
    graph, model, pixels = converted(Clamps(), RECOMMENDED, count=16)
    lookups = {op.name: (op.kind, op.params) for op in model.layers if isinstance(op, QLookup)}
    assert lookups == {"leaky": ("leaky_relu", {"negative_slope": 0.1}), "hardtanh": ("hardtanh", {"min": -1.0, "max": 1.0}),
                       "relu6": ("hardtanh", {"min": 0.0, "max": 6.0})}
    assert not model.layer("conv1").relu and not model.layer("conv2").relu and model.layer("conv2").relu_max is None
    assert model.layer("conv3").relu and model.layer("conv3").relu_max == 6.0  # fused, no table
    assert model.layer("relu6").output_qparams.dtype == IntType(8, False)  # hardtanh(0, 6) >= 0: unsigned, like a ReLU's
    exact_and_close(model, pixels[:8])


def test_a_lookup_on_an_input_wider_than_8_bits_is_refused_at_conversion():
    class OnInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(torch.sigmoid(x))

    torch.manual_seed(0)
    pixels = make_pixels(4)
    graph = capture(OnInput().eval(), pixels[:2])
    with pytest.raises(ConversionError, match="'sigmoid': lookup tables take inputs of at most 8 bits; its input 'x' is int9"):
        convert(graph, collect_statistics(graph, [pixels]), RECOMMENDED)


@pytest.fixture(scope="module")
def leaky_model():
    return converted(Gated(nn.LeakyReLU(0.1)), STUDY, count=8)[1:]


def test_the_model_file_keeps_kind_params_and_qparams_and_no_table(tmp_path, leaky_model):
    model, pixels = leaky_model
    loaded = round_tripped(model, pixels, tmp_path)
    assert not any(key.startswith("act.") for key in to_arrays(model))  # the table is derived, not stored
    (op,) = [op for op in loaded.layers if isinstance(op, QLookup)]
    assert (op.kind, op.params) == ("leaky_relu", {"negative_slope": 0.1})


def _nine_bits(ops):
    for qparams in (ops["conv1"]["output_qparams"], ops["act"]["input_qparams"]):
        qparams["bits"] = 9


HOSTILE = {
    "unknown kind": (lambda ops: ops["act"].update(kind="softmax"), "op #1 'act': unknown activation kind 'softmax'"),
    "NaN param": (lambda ops: ops["act"]["params"].update(negative_slope=float("nan")),
                  "op #1 'act': parameter negative_slope must be a finite number"),
    "missing param": (lambda ops: ops["act"].update(params={}), "leaky_relu takes parameters \\['negative_slope'\\]"),
    "text param": (lambda ops: ops["act"].update(params={"negative_slope": "0.1"}), "field 'params' must be an object"),
    "9-bit input": (_nine_bits, "op #1 'act': lookup tables take inputs of at most 8 bits, got int9"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_lookup_is_refused_in_one_line(tmp_path, leaky_model, case):
    edit, message = HOSTILE[case]
    assert re.search(message, edited_file_refusal(tmp_path, leaky_model[0], edit))


def test_check_model_recomputes_the_table_of_a_modified_op(leaky_model):
    model, _ = leaky_model
    (op,) = [op for op in model.layers if isinstance(op, QLookup)]
    edited = replace(op, params={"negative_slope": 2e6})
    model.layers[model.layers.index(op)] = edited
    try:
        with pytest.raises(ModelCheckError, match="magnitude at most 1e"):
            check_model(model)
    finally:
        model.layers[model.layers.index(edited)] = op


def test_explain_says_it_derives_conv_and_linear_outputs_not_a_lookup(leaky_model):
    from intq.workflows.explain import ExplainError, explain

    model, pixels = leaky_model
    with pytest.raises(ExplainError, match="'act' is a QLookup: explain derives conv and linear outputs"):
        explain(model, pixels[0], "act", (0, 0, 0))


def test_verify_names_the_path_each_op_took():
    """The lookup has no kernel in either engine: verify says it ran as exact integers there, the
    8-bit convolutions as the engines' kernels, and every op of the exact executors as exact."""
    from intq.executors.verify import path_summary, verify

    _, model, pixels = converted(Gated(nn.Hardswish()), RECOMMENDED, count=8)
    rows = verify(model, pixels, ("torch_quantized", "onnx", "onnx_exact"))
    onnx, torch_ops = rows["onnx"]["ops"], rows["torch_quantized"]["ops"]
    assert onnx["act"]["type"] == "QLookup" and onnx["act"]["path"].startswith("exact integer subgraph")
    assert "Gather" in onnx["act"]["path"]
    assert onnx["conv2"]["path"] == "ONNX Runtime kernel QLinearConv"
    assert torch_ops["act"]["path"] == "exact integers (no PyTorch kernel)"
    assert torch_ops["conv2"]["path"] == "PyTorch quantized kernel (onednn)"
    assert all(row["values"] > 0 and row["max_lsb"] <= 1 for row in onnx.values())
    assert path_summary(rows["onnx_exact"]["ops"]) == [f"all {len(model.layers)} ops: exact integer subgraph (ONNX Runtime)"]
    lines = path_summary(onnx)
    assert any(line.startswith("1 x QLookup: exact integer subgraph") for line in lines), lines
