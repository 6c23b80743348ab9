"""Fixed-point requantization against exact Python integers and Fractions (tolerance 0)."""
from fractions import Fraction
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from conftest import Residual, Strided, calibrated, make_pixels
from intq.arith import fixed_point
from intq.graph import model_file
from intq.graph.config import PRESETS
from intq.graph.convert import convert
from intq.arith.fixed_point import (float64_requantizer, multiply_by_quantized_multiplier, quantize_multiplier, quantize_multipliers,
                              requantize, requantize_float64, requantize_with_bias, round_half_away, rounding_right_shift)
from intq.cifar.models import Net, NetWithBias

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EDGES = [0, 1, -1, INT32_MIN + 1, INT32_MIN + 2, INT32_MAX - 1, INT32_MAX, 12345, -12345]


def exact_round(value: Fraction) -> int:
    magnitude = math.floor(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def test_quantize_multiplier_worked_example():
    assert quantize_multiplier(0.0123) == (1690499128, 6)


def test_quantize_multiplier_of_powers_of_two():
    assert quantize_multiplier(0.5) == (2**30, 0)
    assert quantize_multiplier(1.0) == (2**30, -1)
    assert quantize_multiplier(0.25) == (2**30, 1)


def test_mantissa_that_rounds_up_to_two_to_the_31_is_renormalised():
    just_below_one = 1.0 - 2.0**-40  # f * 2^31 rounds to 2^31
    mantissa, shift = quantize_multiplier(just_below_one)
    assert mantissa == 2**30 and shift == -1


def test_tiny_multiplier_becomes_zero_and_zero_stays_zero():
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(1e-30) == (0, 0)


def old_round_half_away(x: float) -> float:
    """The form round_half_away had before: floor(|x| + 0.5), which eq. 2 warns against."""
    return math.copysign(math.floor(abs(x) + 0.5), x) if abs(x) < 2**52 else x


@pytest.mark.parametrize("value, expected", [(2.5, 3), (-2.5, -3), (0.5, 1), (-0.5, -1), (1.5, 2), (2.4999, 2),
                                             (0.0, 0), (0.49999999999999994, 0), (-0.49999999999999994, 0),
                                             (1.4999999999999998, 1), (2.0**52 + 1, 2**52 + 1), (2.0**60, 2**60)])
def test_round_half_away_worked_values(value, expected):
    assert round_half_away(value) == expected


def test_round_half_away_is_exact_where_the_old_form_was_not():
    """floor(|x| + 0.5) rounded 0.49999999999999994 up: |x| + 0.5 rounds to 1.0 in float64."""
    assert old_round_half_away(0.49999999999999994) == 1.0
    assert round_half_away(0.49999999999999994) == 0.0
    assert round_half_away(float("inf")) == float("inf") and math.isnan(round_half_away(float("nan")))


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_round_half_away_matches_exact_rounding(value):
    assert round_half_away(value) == exact_round(Fraction(value))


@settings(max_examples=1000)
@given(st.one_of(st.floats(0.5, 1.0, exclude_max=True),
                 st.integers(2**30, 2**31 - 1).map(lambda k: math.nextafter(k + 0.5, 0.0) / 2**31),
                 st.integers(2**30, 2**31 - 1).map(lambda k: (k + 0.5) / 2**31)))
def test_mantissas_are_the_ones_the_old_rounding_gave(fraction):
    """quantize_multiplier rounds f 2^31, f in [0.5, 1) (frexp): floats in [2^30, 2^31) are 2^-22 apart,
    so |x| + 0.5 is exact there and the old form was exact too: no mantissa moves."""
    x = fraction * 2**31
    assert round_half_away(x) == old_round_half_away(x) == exact_round(Fraction(x))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_converted_models_are_the_same_with_the_old_rounding(preset, monkeypatch):
    """Every mantissa of the test models under each preset, converted with the exact rounding and with
    floor(|x| + 0.5): the same model arrays."""
    pixels = make_pixels(16)
    for model_class in (Net, NetWithBias, Strided, Residual):
        torch.manual_seed(0)
        graph, stats = calibrated(model_class().eval(), pixels)
        exact = model_file.to_arrays(convert(graph, stats, PRESETS[preset]))
        with monkeypatch.context() as patch:
            patch.setattr(fixed_point, "round_half_away", old_round_half_away)
            old = model_file.to_arrays(convert(graph, stats, PRESETS[preset]))
        assert exact.keys() == old.keys()
        assert all(np.array_equal(exact[key], old[key]) for key in exact), model_class.__name__


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_quantize_multiplier_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        quantize_multiplier(bad)


def test_quantize_multiplier_refuses_huge_values():
    with pytest.raises(ValueError, match="too large"):
        quantize_multiplier(2.0**40)


@given(st.floats(1e-9, 1e3))
def test_quantize_multiplier_mantissa_range_and_precision(multiplier):
    mantissa, shift = quantize_multiplier(multiplier)
    assert 2**30 <= mantissa < 2**31
    approx = Fraction(mantissa, 2 ** (31 + shift)) if 31 + shift >= 0 else Fraction(mantissa * 2 ** -(31 + shift))
    assert abs(approx - Fraction(multiplier)) <= Fraction(multiplier) * Fraction(1, 2**31)


def test_quantize_multipliers_shapes_and_dtypes():
    mantissas, shifts = quantize_multipliers(np.array([0.5, 0.0123]))
    assert mantissas.dtype == np.int32 and shifts.dtype == np.int32
    assert mantissas.tolist() == [2**30, 1690499128] and shifts.tolist() == [0, 6]


@pytest.mark.parametrize("x, shift, expected", [(5, 1, 3), (-5, 1, -3), (7, 2, 2), (-6, 2, -2), (-5, 2, -1),
                                                (4, 1, 2), (-4, 1, -2), (0, 5, 0), (1, 1, 1), (-1, 1, -1)])
def test_rounding_right_shift_worked_values(x, shift, expected):
    assert rounding_right_shift(torch.tensor([x]), torch.tensor([shift])).item() == expected


@settings(max_examples=500)
@given(x=st.integers(-(2**62) + 1, 2**62 - 1), shift=st.integers(1, 62))
def test_rounding_right_shift_matches_exact_rounding(x, shift):
    got = rounding_right_shift(torch.tensor([x]), torch.tensor([shift])).item()
    assert got == exact_round(Fraction(x, 2**shift))


@settings(max_examples=500)
@given(acc=st.one_of(st.sampled_from(EDGES), st.integers(INT32_MIN + 1, INT32_MAX)),
       multiplier=st.floats(1e-7, 4.0))
def test_multiply_by_quantized_multiplier_is_one_exact_rounding(acc, multiplier):
    mantissa, shift = quantize_multiplier(multiplier)
    got = multiply_by_quantized_multiplier(torch.tensor([acc]), torch.tensor([mantissa]), torch.tensor([shift])).item()
    total = 31 + shift
    assert got == exact_round(Fraction(acc * mantissa, 2**total))


@pytest.mark.parametrize("acc", EDGES)
def test_multiply_by_quantized_multiplier_edge_accumulators(acc):
    mantissa, shift = quantize_multiplier(0.3)
    got = multiply_by_quantized_multiplier(torch.tensor([acc]), torch.tensor([mantissa]), torch.tensor([shift])).item()
    assert got == exact_round(Fraction(acc * mantissa, 2 ** (31 + shift)))


def test_zero_mantissa_gives_zero():
    got = multiply_by_quantized_multiplier(torch.tensor([INT32_MAX, INT32_MIN + 1]), torch.tensor([0]), torch.tensor([0]))
    assert got.tolist() == [0, 0]


@given(acc=st.integers(INT32_MIN + 1, INT32_MAX), zero_point=st.integers(0, 255))
def test_requantize_clamps_and_relu_lower_bound(acc, zero_point):
    mantissa, shift = quantize_multiplier(0.01)
    expected = exact_round(Fraction(acc * mantissa, 2 ** (31 + shift))) + zero_point
    plain = requantize(torch.tensor([acc]), torch.tensor([mantissa]), torch.tensor([shift]), zero_point, 0, 255).item()
    assert plain == min(max(expected, 0), 255)
    relu = requantize(torch.tensor([acc]), torch.tensor([mantissa]), torch.tensor([shift]), zero_point, zero_point, 255).item()
    assert relu == min(max(expected, zero_point), 255)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**31) + 2**20, 2**31 - 2**20 - 1), min_size=1, max_size=16),
       st.integers(-(2**20), 2**20), st.floats(1e-9, 0.99), st.integers(-(2**15), 2**15 - 1), st.integers(-300, 300))
def test_requantize_with_bias_equals_requantize_of_the_sum(products, bias, multiplier, zero_point, lower_offset):
    mantissa, shift = (torch.tensor(v, dtype=torch.int64) for v in quantize_multiplier(multiplier))
    p = torch.tensor(products, dtype=torch.int64)
    lower, upper = zero_point + lower_offset, zero_point + 200
    if lower > upper:
        lower = upper
    expected = requantize(p + bias, mantissa, shift, zero_point, lower, upper)
    result = requantize_with_bias(p.to(torch.int32) if bias == 0 else p, torch.tensor(bias), mantissa, shift,
                                  zero_point, lower, upper)
    assert torch.equal(result, expected)


def _near_ties(mantissa: int, shift: int, bias: int, bound: int) -> list[int]:
    """Products p whose x = (p + q_b) M lies at or next to a half-integer, within |p + q_b| <= bound."""
    s = shift + 31
    candidates = []
    for k in (0, 1, 2, 7, 100, 126, 127, 128, 255, 32766, 32767):
        for sign in (1, -1):
            centre = round(Fraction(sign * (2 * k + 1) * 2 ** (s - 1), mantissa)) - bias if mantissa else 0
            candidates += [centre - 1, centre, centre + 1]
    return [p for p in candidates if abs(p + bias) <= bound and abs(p) <= bound]


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-7, 0.99), st.integers(1, 2**31 - 1), st.integers(-(2**20), 2**20), st.integers(-(2**15), 2**15 - 1),
       st.sampled_from([(0, 127), (-128, 127), (0, 255), (-(2**15), 2**15 - 1), (0, 15)]), st.data())
def test_requantize_float64_equals_requantize_where_proven(multiplier, bound, bias, zero_point, type_range, data):
    """Exact against the integer requantizer on random products, the bound's edges and the products
    nearest every rounding tie; where float64_requantizer refuses, nothing is claimed."""
    mantissa, shift = quantize_multiplier(multiplier)
    relu = data.draw(st.booleans())
    lower = max(type_range[0], min(zero_point, type_range[1])) if relu else type_range[0]
    upper = type_range[1]
    constants = float64_requantizer(np.array([mantissa]), np.array([shift]), np.array([bias]), zero_point, lower, upper, bound)
    assume(constants is not None)
    low, high = max(-bound, -bound - bias), min(bound, bound - bias)
    assume(low <= high)
    products = data.draw(st.lists(st.integers(low, high), min_size=1, max_size=32))
    products += [low, high, min(max(0, low), high)] + _near_ties(mantissa, shift, bias, bound)
    p = torch.tensor(products, dtype=torch.int64)
    expected = requantize(p + bias, torch.tensor(mantissa), torch.tensor(shift), zero_point, lower, upper)
    multiplier_t, offset_t = (torch.from_numpy(a) for a in constants)
    got = requantize_float64(p.to(torch.float64), multiplier_t, offset_t, lower, upper)
    assert torch.equal(got.to(torch.int64), expected)


def test_float64_requantizer_refuses_a_multiplier_with_ties():
    """M = 1/4 (M0 = 2^30, s = 32): x = -2/4 is a tie, where floor(x + 1/2) = 0 but rounding half away
    from zero gives -1; the proof's tie condition refuses it."""
    mantissa, shift = quantize_multiplier(0.25)
    assert (mantissa, shift) == (2**30, 1)
    assert requantize(torch.tensor([-2]), torch.tensor(mantissa), torch.tensor(shift), 0, -128, 127).item() == -1
    assert float64_requantizer(np.array([mantissa]), np.array([shift]), None, 0, -128, 127, 1000) is None
    assert math.floor(-2 * 0.25 + 0.5) == 0


def test_float64_requantizer_refuses_a_range_float64_cannot_hold():
    """M = 0.0009: s = 41 leaves R = 2^12 exact values of step 2^-41, enough for int8 outputs and not
    for int16 ones."""
    mantissa, shift = quantize_multiplier(0.0009)
    assert shift + 31 == 41
    assert float64_requantizer(np.array([mantissa]), np.array([shift]), None, 0, -128, 127, 10**6) is not None
    assert float64_requantizer(np.array([mantissa]), np.array([shift]), None, 0, -(2**15), 2**15 - 1, 10**6) is None


def test_float64_requantizer_docstring_example():
    mantissa, shift = quantize_multiplier(0.0123)
    assert (mantissa, shift) == (1690499128, 6)
    multiplier, offset = float64_requantizer(np.array([mantissa]), np.array([shift]), None, 0, -128, 127, 10**6)
    assert multiplier[0] == mantissa * 2.0**-37 and offset[0] == 0.5


def test_float64_requantizer_needs_a_margin_only_where_products_can_round():
    """M = 0.0009 (s = 41, R = 2^12) with q_b M = -2000: c is exact, but products with p M0 >= 2^53
    round, and with |c| that close to R a rounded T could land inside the clamp, so only a bound that
    keeps |p M0| < 2^53 is accepted."""
    mantissa, shift = quantize_multiplier(0.0009)
    bias = round(-2000 * 2**41 / mantissa)
    args = (np.array([mantissa]), np.array([shift]), np.array([bias]), 0, -128, 127)
    assert float64_requantizer(*args, bound=abs(bias) + 2**20) is not None
    assert float64_requantizer(*args, bound=2**31 - 1) is None
