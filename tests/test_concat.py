"""Concatenation along channels (QConcat, docs/math.md eq. 30): capture, conversion, every executor
against the reference, the model file and its hostile edits."""
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import edited_file_refusal, make_pixels, round_tripped, with_mantissa_off_by_one
from intq.arith.fixed_point import quantize_multipliers
from intq.arith.qparams import dequantize
from intq.executors.reference import run_integer
from intq.executors.simulate import layer_agreement
from intq.graph.capture import CaptureError, capture, run_float
from intq.graph.config import RECOMMENDED
from intq.graph.integer_model import QConcat, concat_multipliers
from intq.graph.model_check import ModelCheckError, check_model, same_qparams
from intq.graph.model_file import to_arrays
from test_lookup import at_bits, converted, exact_and_close

MAX_OUTPUT_STEPS = {8: 4, 4: 3}  # the model output's error from the float model, in its own steps


class TwoBranches(nn.Module):
    """Two conv branches (one with a ReLU) concatenated, then a conv and a linear layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.c = nn.Conv2d(9, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 15 * 15, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        return self.fc(torch.flatten(self.c(y), 1))


class ThreeWay(nn.Module):
    """A three-way cat written as a tuple on dim -3, of branches of different widths."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.d = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 4, 5, padding=2)
        self.c = nn.Conv2d(9, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 15 * 15, 5)

    def forward(self, x):
        y = torch.cat((self.a(x), torch.relu(self.b(x)), self.d(x)), -3)
        return self.fc(torch.flatten(self.c(y), 1))


class WithItself(nn.Module):
    """The model input concatenated with itself, and a conv's output with itself."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(6, 4, 3, stride=2)
        self.c = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4 * 13 * 13, 3)

    def forward(self, x):
        y = self.a(torch.cat([x, x], dim=1))
        return self.fc(torch.flatten(self.c(torch.cat([y, y], 1)), 1))


MODELS = {"two branches": TwoBranches, "three-way": ThreeWay, "with itself": WithItself}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_concat_end_to_end(name, bits):
    graph, model, pixels = converted(MODELS[name](), at_bits(bits), count=24)
    concats = [op for op in model.layers if isinstance(op, QConcat)]
    assert concats and all(len(op.mantissa) == len(op.inputs) >= 2 for op in concats)
    for op in concats:
        assert op.output_qparams.dtype.bits == bits
        mantissa, shift = quantize_multipliers(concat_multipliers(op.input_qparams, op.output_qparams))
        assert np.array_equal(op.mantissa, mantissa) and np.array_equal(op.shift, shift)
    reference = run_integer(model, pixels)
    output_qp = model.output_qparams()
    with torch.no_grad():
        float_output = run_float(graph, graph.preprocessing.apply(pixels)).double()
    steps = float((dequantize(reference, output_qp, torch.float64) - float_output).abs().max()) / float(output_qp.scale)
    assert steps <= MAX_OUTPUT_STEPS[bits], steps
    for row in layer_agreement(model, pixels[:8]):  # the float64 simulation of every op, the cat included
        assert row["max_lsb"] <= 1, row
    exact_and_close(model, pixels[:12])


def test_each_input_is_requantized_to_the_outputs_grid():
    """q_y = clamp(z_y + round(M_i (q_i - z_i))) per input, against Python integers and exact fractions."""
    from fractions import Fraction

    _, model, pixels = converted(TwoBranches(), RECOMMENDED, count=8)
    op = model.layer("cat")
    values = {}
    run_integer(model, pixels, visit=lambda name, q: values.__setitem__(name, q))
    lower, upper = op.bounds()
    zero_y = int(op.output_qparams.zero_point)
    offset = 0
    for index, (name, qp) in enumerate(zip(op.inputs, op.input_qparams)):
        x = values[name]
        multiplier = Fraction(int(op.mantissa[index]), 2 ** (31 + int(op.shift[index])))
        got = values["cat"][:, offset : offset + x.shape[1]]
        for q, y in list(zip(x.reshape(-1).tolist(), got.reshape(-1).tolist()))[:2000]:
            real = multiplier * (q - int(qp.zero_point))
            rounded = int(abs(real) + Fraction(1, 2)) * (1 if real >= 0 else -1)  # half away from zero
            assert y == min(max(zero_y + rounded, lower), upper)
        offset += x.shape[1]
    assert offset == values["cat"].shape[1]


def test_an_input_with_the_outputs_qparams_passes_unchanged():
    """cat([y, y]) is calibrated on y's own range: M = 1 (mantissa 2^30, shift -1), the integers unchanged."""
    _, model, pixels = converted(WithItself(), RECOMMENDED, count=8)
    op = model.layers[[o.name for o in model.layers].index("a") + 1]
    assert isinstance(op, QConcat) and op.inputs == ("a", "a")
    assert same_qparams(op.output_qparams, op.input_qparams[0])
    assert same_qparams(op.input_qparams[1], model.layer("a").output_qparams)
    assert op.mantissa.tolist() == [2**30, 2**30] and op.shift.tolist() == [-1, -1]
    values = {}
    run_integer(model, pixels, visit=lambda name, q: values.__setitem__(name, q))
    assert torch.equal(values[op.name], torch.cat([values["a"], values["a"]], dim=1))


def test_a_multiplier_of_one_is_mantissa_two_to_the_thirty_and_shift_minus_one():
    mantissa, shift = quantize_multipliers(np.array([1.0, 0.5]))
    assert mantissa.tolist() == [2**30, 2**30] and shift.tolist() == [-1, 0]


class OnHeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return torch.cat([y, y], dim=2)


def test_a_cat_on_another_dim_is_refused_naming_the_node_and_the_dim():
    with pytest.raises(CaptureError, match=r"cat \(call_function cat\): torch\.cat on dim 2; intq concatenates along "
                                           r"channels only"):
        capture(OnHeight().eval(), make_pixels(2))


@pytest.fixture(scope="module")
def cat_model():
    return converted(TwoBranches(), RECOMMENDED, count=8)[1:]


def test_the_model_file_round_trips(tmp_path, cat_model):
    model, pixels = cat_model
    round_tripped(model, pixels, tmp_path)
    arrays = to_arrays(model)
    assert arrays["cat.mantissa"].shape == arrays["cat.shift"].shape == (2,)


HOSTILE = {
    "wrong mantissa": (lambda model: with_mantissa_off_by_one(model, "cat"), lambda ops: None,
                       r"op #2 'cat': mantissa/shift of channel 0 are \(\d+, -?\d+\); its scales give"),
    "shapes that do not match": (None, lambda ops: ops["b"]["geometry"].update(stride=[2, 2]),
                                 r"op #2 'cat': inputs of shapes \(4, 32, 32\), \(5, 16, 16\) \(a concatenation along "
                                 r"channels needs \(C, H, W\) inputs of one H and W\)"),
    "input parameters": (None, lambda ops: ops["cat"]["input_qparams"][1].update(scale=0.5),
                         r"op #2 'cat': its input parameters differ from those of 'b'"),
    "one input_qparams too few": (None, lambda ops: ops["cat"]["input_qparams"].pop(),
                                  r"op #2 'cat': takes 2 input_qparams, got 1"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_concat_is_refused_in_one_line(tmp_path, cat_model, case):
    edit_model, edit, message = HOSTILE[case]
    model = edit_model(cat_model[0]) if edit_model else cat_model[0]
    assert re.search(message, edited_file_refusal(tmp_path, model, edit))


def test_check_model_refuses_a_concat_of_one_input(cat_model):
    model, _ = cat_model
    op = model.layer("cat")
    single = replace(op, inputs=op.inputs[:1], input_qparams=op.input_qparams[:1], mantissa=op.mantissa[:1],
                     shift=op.shift[:1])
    edited = replace(model, layers=[single if layer is op else layer for layer in model.layers])
    with pytest.raises(ModelCheckError, match="'cat': takes two or more inputs, lists 1"):
        check_model(edited)


def test_explain_says_it_derives_conv_and_linear_outputs_not_a_concat(cat_model):
    from intq.workflows.explain import ExplainError, explain

    model, pixels = cat_model
    with pytest.raises(ExplainError, match="'cat' is a QConcat: explain derives conv and linear outputs"):
        explain(model, pixels[0], "cat", (0, 0, 0))
