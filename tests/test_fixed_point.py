"""Fixed-point requantization against exact Python integers and Fractions (tolerance 0)."""
from fractions import Fraction
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from intq.fixed_point import (multiply_by_quantized_multiplier, quantize_multiplier, quantize_multipliers, requantize_with_bias,
                              requantize, rounding_right_shift)

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
