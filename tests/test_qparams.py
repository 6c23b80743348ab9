"""The affine mapping against exact rational arithmetic (tolerance 0)."""
from dataclasses import replace
from fractions import Fraction
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from intq.calibrate.ranges import MSE, MinMax, NSigma
from intq.graph.config import WeightConfig
from intq.graph.convert import weight_qparams
from intq.graph.integer_model import accumulator_bound
from intq.arith.qparams import INT8, UINT8, IntType, Scheme, choose_qparams, dequantize, quantize, round_half_away_from_zero


def exact_round(value: Fraction) -> int:
    """Round half away from zero on an exact rational."""
    magnitude = math.floor(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


@pytest.mark.parametrize("value, expected", [(2.5, 3), (-2.5, -3), (0.5, 1), (-0.5, -1), (2.4999, 2),
                                             (0.0, 0), (-0.0, 0), (1.5, 2), (-1.5, -2), (0.49999997, 0)])
def test_round_half_away_from_zero_worked_values(value, expected):
    for dtype in (torch.float32, torch.float64):
        assert round_half_away_from_zero(torch.tensor([value], dtype=dtype)).item() == expected


@given(st.floats(-1e6, 1e6, allow_nan=False, width=32))
def test_round_half_away_from_zero_matches_exact_rounding(value):
    x = torch.tensor([value], dtype=torch.float32)
    assert round_half_away_from_zero(x).item() == exact_round(Fraction(float(x.item())))


def test_int_type_ranges():
    assert (INT8.qmin, INT8.qmax) == (-128, 127)
    assert (UINT8.qmin, UINT8.qmax) == (0, 255)
    assert (IntType(4, True).qmin, IntType(4, True).qmax) == (-8, 7)
    assert (IntType(2, False).qmin, IntType(2, False).qmax) == (0, 3)


def test_int_type_rejects_one_bit():
    with pytest.raises(ValueError, match="bit width"):
        IntType(1, True)


def test_symmetric_restricted_weights_worked_example():
    qp = choose_qparams(-0.5, 0.6, INT8, Scheme.SYMMETRIC, restricted=True)
    assert float(qp.scale) == pytest.approx(0.6 / 127)
    assert int(qp.zero_point) == 0
    q = quantize(torch.tensor([-0.6, 0.6, 0.0]), qp)
    assert q.tolist() == [-127, 127, 0]


def test_asymmetric_unsigned_post_relu_range_has_zero_point_zero():
    qp = choose_qparams(0.0, 10.2, UINT8, Scheme.ASYMMETRIC)
    assert float(qp.scale) == pytest.approx(0.04)
    assert int(qp.zero_point) == 0


def test_asymmetric_range_is_widened_to_include_zero():
    qp = choose_qparams(2.0, 6.0, UINT8, Scheme.ASYMMETRIC)
    assert float(qp.scale) == pytest.approx(6.0 / 255)
    assert quantize(torch.tensor([0.0]), qp).item() == int(qp.zero_point)


def test_span_scheme_is_the_study_bookkeeping():
    qp = choose_qparams(-1.5, 1.5, INT8, Scheme.SPAN)
    assert float(qp.scale) == pytest.approx(3.0 / 255)
    assert int(qp.zero_point) == 0


@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("dtype", [INT8, UINT8, IntType(3, True)])
def test_zero_width_range_is_handled_without_division_by_zero(scheme, dtype):
    qp = choose_qparams(0.0, 0.0, dtype, scheme)
    assert float(qp.scale) == 1.0
    assert dequantize(quantize(torch.zeros(3), qp), qp).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("scheme", [Scheme.SYMMETRIC, Scheme.ASYMMETRIC])
def test_constant_nonzero_tensor_gets_a_positive_scale(scheme):
    qp = choose_qparams(0.7, 0.7, INT8, scheme)
    assert float(qp.scale) > 0
    assert dequantize(quantize(torch.tensor([0.7]), qp), qp).item() == pytest.approx(0.7, abs=float(qp.scale))


def test_span_scheme_reaches_only_half_of_a_one_sided_range():
    """The study's defect, reproduced by its preset: range/255 used around zero covers [0, hi/2]."""
    qp = choose_qparams(0.0, 0.7, INT8, Scheme.SPAN)
    assert dequantize(quantize(torch.tensor([0.7]), qp), qp).item() == pytest.approx(127 * 0.7 / 255)


def test_non_finite_range_is_refused():
    with pytest.raises(ValueError, match="not finite"):
        choose_qparams(float("nan"), 1.0, INT8, Scheme.SYMMETRIC)


def test_per_channel_quantize_uses_each_channels_scale():
    weight = torch.tensor([[1.0, -1.0], [100.0, -25.0]])
    qp = choose_qparams(np.array([-1.0, -50.0]), np.array([1.0, 100.0]), INT8, Scheme.SYMMETRIC, restricted=True, axis=0)
    assert quantize(weight, qp).tolist() == [[127, -127], [127, -32]]  # -25 / (100/127) = -31.75


@settings(max_examples=300)
@given(
    value=st.floats(-1e4, 1e4, allow_nan=False),
    scale=st.floats(1e-4, 10.0),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    zero_offset=st.integers(0, 255),
)
def test_quantize_matches_exact_formula(value, scale, bits, signed, zero_offset):
    dtype = IntType(bits, signed)
    zero_point = dtype.qmin + zero_offset % (dtype.qmax - dtype.qmin + 1)
    from intq.arith.qparams import QParams

    qp = QParams(np.array(scale), np.array(zero_point), dtype)
    q = quantize(torch.tensor([value], dtype=torch.float64), qp).item()
    exact = exact_round(Fraction(value) / Fraction(scale)) + zero_point
    assert q == min(max(exact, dtype.qmin), dtype.qmax)
    assert dequantize(torch.tensor([q]), qp, torch.float64).item() == pytest.approx(scale * (q - zero_point))


@given(lo=st.floats(-100, 0), hi=st.floats(0, 100), bits=st.integers(2, 8))
def test_asymmetric_grid_covers_the_range_within_one_step(lo, hi, bits):
    dtype = IntType(bits, False)
    qp = choose_qparams(lo, hi, dtype, Scheme.ASYMMETRIC)
    scale, zero = float(qp.scale), int(qp.zero_point)
    if hi - lo > 0:
        assert scale * (dtype.qmin - zero) <= lo + scale
        assert scale * (dtype.qmax - zero) >= hi - scale
    assert dtype.qmin <= zero <= dtype.qmax


def test_a_range_whose_scale_underflows_gets_a_usable_scale():
    """hi = 1e-322: (hi - lo) / 255 underflows float64 to 0; the range is treated as zero-width."""
    qp = choose_qparams(0.0, 1e-322, UINT8, Scheme.ASYMMETRIC)
    assert float(qp.scale) == 1.0 and int(qp.zero_point) == 0


def test_restricted_changes_no_symmetric_scale():
    """A symmetric signed scale always divides by 2^(b-1) - 1 (eq. 3); `restricted` changes it only
    for the asymmetric and span schemes."""
    for dtype in (INT8, IntType(2, True)):
        plain = choose_qparams(-0.5, 0.6, dtype, Scheme.SYMMETRIC)
        restricted = choose_qparams(-0.5, 0.6, dtype, Scheme.SYMMETRIC, restricted=True)
        assert float(plain.scale) == float(restricted.scale) == 0.6 / dtype.qmax
    assert float(choose_qparams(-1.0, 1.0, INT8, Scheme.SPAN, restricted=True).scale) == 2.0 / 254


def outlier_weights() -> torch.Tensor:
    """(2, 200) conv-like weights: small values and one large negative outlier per channel."""
    weight = torch.randn(2, 200, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[:, 0] = torch.tensor([-1.0, -0.8])
    return weight


@pytest.mark.parametrize("bits", [8, 2])
@pytest.mark.parametrize("method", ["mse", "nsigma"])
def test_clipped_weights_reach_the_types_minimum_and_the_bound_counts_it(bits, method):
    """The restricted range sets the scale, not the type: a weight beyond a clipping range quantizes
    to qmin = -2^(b-1) (-128, or -2 at 2 bits), and the accumulator bound (eq. 11) adds 2^(b-1) for it."""
    weight = outlier_weights()
    config = WeightConfig({"mse": MSE(), "nsigma": NSigma(3.0)}[method], Scheme.SYMMETRIC, per_channel=True, bits=bits)
    q = quantize(weight, weight_qparams(weight, config))
    qmin = -(2 ** (bits - 1))
    assert q[:, 0].tolist() == [qmin, qmin] and int(q.min()) == qmin
    input_qp = choose_qparams(0.0, 1.0, UINT8, Scheme.ASYMMETRIC)  # z = 0: max|q_x - z_x| = 255
    bound = accumulator_bound(q.numpy(), None, input_qp)
    assert bound == max(sum(abs(int(v)) for v in row) for row in q.tolist()) * 255
    assert bound > accumulator_bound(q.clamp(min=qmin + 1).numpy(), None, input_qp)
    minmax = quantize(weight, weight_qparams(weight, replace(config, method=MinMax())))
    assert int(minmax.min()) == qmin + 1  # a range that covers every weight stops at -(2^(b-1) - 1)
