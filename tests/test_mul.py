"""Elementwise products (QMul, docs/math.md eq. 34): torchvision's squeeze-excite gate in both operand
orders and a same-shape product, capture and its refusals, conversion, every executor against the
reference, the overflow budget, the model file and its hostile edits."""
import re
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops import SqueezeExcitation

from conftest import edited_file_refusal, make_pixels, round_tripped, with_mantissa_off_by_one
from intq.arith.fixed_point import quantize_multipliers
from intq.arith.qparams import IntType, QParams, dequantize
from intq.executors.reference import run_integer, run_op
from intq.executors.simulate import layer_agreement
from intq.graph.capture import CaptureError, capture, run_float
from intq.graph.config import RECOMMENDED
from intq.graph.convert import ConversionError
from intq.graph.integer_model import QMul, mul_multiplier, product_bound
from intq.graph.model_check import ModelCheckError, check_mul
from intq.graph.model_file import to_arrays
from test_lookup import at_bits, converted, exact_and_close

MAX_OUTPUT_STEPS = {8: 4, 4: 3}  # the model output's error from the float model, in its own steps


class ScaleTimesInput(nn.Module):
    """conv -> torchvision's SqueezeExcitation (global mean, 1x1 convs, Hardsigmoid, scale * input) -> conv -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.se = SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid)
        self.head = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4 * 13 * 13, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.head(self.se(torch.relu(self.conv(x)))), 1))


class InputTimesScale(ScaleTimesInput):
    """The same gate written input first, as torch.mul(x, s), then a method x.mul(s) of a second gate."""

    def forward(self, x):
        x = torch.relu(self.conv(x))
        s = self.se.scale_activation(self.se.fc2(self.se.activation(self.se.fc1(x.mean((2, 3), keepdim=True)))))
        y = torch.mul(x, s).mul(s)
        return self.fc(torch.flatten(self.head(y), 1))


class SameShape(nn.Module):
    """Two conv branches multiplied elementwise (one gated by a sigmoid), with a fused ReLU after."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 15 * 15, 5)

    def forward(self, x):
        y = torch.relu(self.a(x) * torch.sigmoid(self.b(x)))
        return self.fc(torch.flatten(self.head(y), 1))


MODELS = {"scale * input": ScaleTimesInput, "input * scale": InputTimesScale, "same shape": SameShape}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_mul_end_to_end(name, bits):
    graph, model, pixels = converted(MODELS[name](), at_bits(bits), count=24)
    products = [op for op in model.layers if isinstance(op, QMul)]
    assert products and all(op.output_qparams.dtype.bits == bits for op in products)
    for op in products:
        mantissa, shift = quantize_multipliers(mul_multiplier(op.input_qparams, op.output_qparams))
        assert np.array_equal(op.mantissa, mantissa) and np.array_equal(op.shift, shift)
    reference = run_integer(model, pixels)
    output_qp = model.output_qparams()
    with torch.no_grad():
        float_output = run_float(graph, graph.preprocessing.apply(pixels)).double()
    steps = float((dequantize(reference, output_qp, torch.float64) - float_output).abs().max()) / float(output_qp.scale)
    assert steps <= MAX_OUTPUT_STEPS[bits], steps
    for row in layer_agreement(model, pixels[:8]):  # the float64 simulation of every op, the product included
        assert row["max_lsb"] <= 1, row
    exact_and_close(model, pixels[:12])


def _exact_product(op: QMul, q_a: int, q_b: int) -> int:
    """clamp(z_y + round(M (q_a - z_a)(q_b - z_b))) with M = M0 2^-(31 + n), in Python integers and fractions."""
    (qp_a, qp_b), lower, upper = op.input_qparams, *op.bounds()
    real = Fraction(int(op.mantissa[0]), 2 ** (31 + int(op.shift[0]))) * (q_a - int(qp_a.zero_point)) * (q_b - int(qp_b.zero_point))
    rounded = int(abs(real) + Fraction(1, 2)) * (1 if real >= 0 else -1)  # half away from zero
    return min(max(int(op.output_qparams.zero_point) + rounded, lower), upper)


@pytest.mark.parametrize("name", ["scale * input", "input * scale"])
def test_the_gate_multiplies_every_pixel_of_its_channel(name):
    """q_y[c, h, w] from q_a[c, h, w] and the gate's q_s[c] alone, against Python integers and exact fractions."""
    _, model, pixels = converted(MODELS[name](), RECOMMENDED, count=4)
    op = next(op for op in model.layers if isinstance(op, QMul))
    values = {}
    run_integer(model, pixels, visit=lambda name, q: values.__setitem__(name, q))
    a, b = (values[name] for name in op.inputs)
    assert (a.shape[2:] == (1, 1)) == (name == "scale * input") and (b.shape[2:] == (1, 1)) == (name != "scale * input")
    got = values[op.name]
    assert got.shape == (4, 8, 15, 15)
    expand = lambda q: q.expand(got.shape).reshape(-1).tolist()  # noqa: E731  (N, C, 1, 1) -> (N, C, H, W)
    for q_a, q_b, y in list(zip(expand(a), expand(b), got.reshape(-1).tolist()))[::7]:
        assert y == _exact_product(op, q_a, q_b)


def _qparams(bits: int, zero: int, scale: float = 0.01) -> QParams:
    return QParams(scale=scale, zero_point=zero, dtype=IntType(bits, signed=True))


def _mul_op(qp_a: QParams, qp_b: QParams, out: QParams) -> QMul:
    mantissa, shift = quantize_multipliers(mul_multiplier((qp_a, qp_b), out))
    return QMul("m", ("a", "b"), (qp_a, qp_b), out, mantissa, shift)


def test_the_widest_products_that_fit_are_exact_and_wider_ones_are_refused():
    """eq. 34's budget: symmetric int16 operands (|q - z| <= 2^15, a product <= 2^30) run exactly at
    their extreme codes; int16 operands with extreme zero points (|q - z| up to 2^16 - 1 and 2^15 + 100) are refused."""
    out = _qparams(16, 3, scale=0.02)
    symmetric = _mul_op(_qparams(16, 0), _qparams(16, 0, scale=0.5), out)
    assert product_bound(symmetric.input_qparams) == 2**30
    assert check_mul(symmetric, [(2, 1, 1), (2, 3, 3)], "op #5 'm'") == (2, 3, 3)
    codes = torch.tensor([-32768, -32767, -1, 0, 1, 32766, 32767], dtype=torch.int16)
    a, b = codes[:, None].expand(7, 7).reshape(1, 49, 1, 1), codes[None, :].expand(7, 7).reshape(1, 49, 1, 1)
    got = run_op(symmetric, a, b).reshape(-1).tolist()
    assert got == [_exact_product(symmetric, int(x), int(y)) for x, y in zip(a.reshape(-1), b.reshape(-1))]
    assert len(set(got)) > 3  # not all clamped
    assert product_bound((_qparams(16, -32768), _qparams(16, 0))) == 65535 * 32768 <= 2**31 - 1  # still fits
    lopsided = _mul_op(_qparams(16, -32768), _qparams(16, 100), out)
    with pytest.raises(ModelCheckError, match=r"op #5 'm': worst-case product 2,154,004,380 of int16 \(zero point "
                                              r"-32768\) and int16 \(zero point 100\) operands exceeds int32"):
        check_mul(lopsided, [(2, 3, 3), (2, 3, 3)], "op #5 'm'")


class Rectified(nn.Module):
    """relu(a(x)) * relu(b(x)): two non-negative operands."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.relu(self.a(x)) * torch.relu(self.b(x))


def test_a_product_of_16_bit_rectified_values_is_refused_at_conversion():
    """Both operands uint16 (after a ReLU, zero point 0): (2^16 - 1)^2 > 2^31 - 1, refused in one line."""
    with pytest.raises(ConversionError, match=r"op #2 'mul': worst-case product 4,294,836,225 of uint16 \(zero point 0\) "
                                              r"and uint16 \(zero point 0\) operands exceeds int32 \(eq\. 34's budget\)"):
        converted(Rectified(), at_bits(16), count=4)


class Spatial(nn.Module):
    """A (N, 1, H, W) spatial attention map times (N, C, H, W): not a broadcast intq runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return self.a(x) * self.b(x)


class ByNumber(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.a(x) * 0.5


class ByBuffer(ByNumber):
    def __init__(self):
        super().__init__()
        self.register_buffer("gain", torch.ones(1, 4, 1, 1))

    def forward(self, x):
        return self.gain.mul(self.a(x))


REFUSALS = {
    "spatial map": (Spatial, r"Spatial: mul \(mul\): operands of shapes \(2, 4, 32, 32\) and \(2, 1, 32, 32\); intq "
                             r"multiplies equal shapes or a \(N, C, 1, 1\) gate by an \(N, C, H, W\) tensor"),
    "number": (ByNumber, r"mul \(call_function mul\): multiplication by the constant 0\.5; intq multiplies two traced "
                         r"tensors only"),
    "buffer": (ByBuffer, r"mul \(call_method mul\): multiplication by the constant tensor 'gain'"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_an_unsupported_product_is_refused_naming_the_node(case):
    module, message = REFUSALS[case]
    with pytest.raises(CaptureError, match=message) as error:
        capture(module().eval(), make_pixels(2))
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def se_model():
    return converted(ScaleTimesInput(), RECOMMENDED, count=8)[1:]


def test_the_model_file_round_trips(tmp_path, se_model):
    model, pixels = se_model
    round_tripped(model, pixels, tmp_path)
    arrays = to_arrays(model)
    assert arrays["mul.mantissa"].shape == arrays["mul.shift"].shape == (1,)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.parametrize("field, wrong", [(".in2_c = 8", ".in2_c = 9"), (".in2_w = 15", ".in2_w = 16"),
                                          (".multiplier_count = 1,", ".multiplier_count = 2,")])
def test_c_runtime_refuses_a_product_whose_operand_shape_does_not_match(tmp_path, se_model, field, wrong):
    """intq_check reads the second operand's shape and the multiplier count before anything runs: an
    edited model.h exits 3 naming the product instead of reading out of bounds."""
    from intq.executors.c_export import export_c
    from test_c_export import compile_and_run

    model, pixels = se_model
    export_c(model, pixels[:1], tmp_path)
    header = (tmp_path / "model.h").read_text()
    entry = next(line for line in header.splitlines() if "INTQ_MUL" in line)
    assert field in entry, entry
    (tmp_path / "model.h").write_text(header.replace(entry, entry.replace(field, wrong)))
    result = compile_and_run(tmp_path)
    assert result.returncode == 3 and "op 5 of model.h fails the runtime's shape and length check" in result.stdout


def _gate_of_other_channels(ops):
    """The product reads the first 1x1 conv's 4 channels (its own QParams) as its gate."""
    ops["mul"]["inputs"][0] = "se_fc1"
    ops["mul"]["input_qparams"][0] = dict(ops["se_fc1"]["output_qparams"])


HOSTILE = {
    "wrong mantissa": (lambda model: with_mantissa_off_by_one(model, "mul"), lambda ops: None,
                       r"op #5 'mul': mantissa/shift of channel 0 are \(\d+, -?\d+\); its scales give"),
    "a gate of other channels": (None, _gate_of_other_channels,
                                 r"op #5 'mul': operands of shapes \(4, 1, 1\) and \(8, 15, 15\) \(a product needs "
                                 r"equal shapes, or \(C, 1, 1\) against \(C, H, W\)\)"),
    "input parameters": (None, lambda ops: ops["mul"]["input_qparams"][1].update(scale=0.5),
                         r"op #5 'mul': its input parameters differ from those of 'conv'"),
    "one input_qparams too few": (None, lambda ops: ops["mul"]["input_qparams"].pop(),
                                  r"op #5 'mul': takes 2 input_qparams, got 1"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_product_is_refused_in_one_line(tmp_path, se_model, case):
    edit_model, edit, message = HOSTILE[case]
    model = edit_model(se_model[0]) if edit_model else se_model[0]
    assert re.search(message, edited_file_refusal(tmp_path, model, edit))


def test_check_model_refuses_a_gate_of_other_channels():
    op = _mul_op(_qparams(8, 0), _qparams(8, 0), _qparams(8, 0))
    with pytest.raises(ModelCheckError, match=r"'m': operands of shapes \(4, 1, 1\) and \(8, 15, 15\) \(a product "
                                              r"needs equal shapes, or \(C, 1, 1\) against \(C, H, W\)\)"):
        check_mul(op, [(4, 1, 1), (8, 15, 15)], "op #5 'm'")
