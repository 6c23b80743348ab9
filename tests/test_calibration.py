"""Range methods on distributions whose answer is known."""
import re

import pytest
import torch

from intq.calibrate.ranges import MSE, Entropy, MinMax, NSigma, Percentile, parse_range_method
from intq.calibrate.observers import observe
from intq.arith.qparams import INT8, UINT8, IntType, Scheme, choose_qparams, dequantize, quantize


@pytest.fixture(scope="module")
def gaussian():
    torch.manual_seed(0)
    return observe(torch.randn(2_000_000))


def test_minmax_is_the_observed_range():
    stats = observe(torch.tensor([-3.0, 0.5, 7.0]))
    assert MinMax().range(stats, INT8, Scheme.SYMMETRIC) == (-3.0, 7.0)


def test_nsigma_on_uniform_is_mean_plus_minus_k_std():
    torch.manual_seed(0)
    stats = observe(torch.rand(1_000_000) * 2 - 1)  # std of U(-1, 1) = 1/sqrt(3)
    lo, hi = NSigma(3).range(stats, INT8, Scheme.SPAN)
    assert hi == pytest.approx(3 / 3**0.5, rel=1e-2)
    assert lo == pytest.approx(-3 / 3**0.5, rel=1e-2)


def test_percentile_on_uniform_matches_quantile(gaussian):
    torch.manual_seed(0)
    stats = observe(torch.rand(1_000_000) * 10)
    lo, hi = Percentile(99.0).range(stats, UINT8, Scheme.ASYMMETRIC)
    assert lo == pytest.approx(0.0, abs=1e-4)
    assert hi == pytest.approx(9.9, abs=0.02)


def test_percentile_of_gaussian_is_two_sided(gaussian):
    lo, hi = Percentile(99.9).range(gaussian, INT8, Scheme.SYMMETRIC)
    assert hi == pytest.approx(3.09, abs=0.03)   # z(0.999)
    assert lo == pytest.approx(-3.09, abs=0.03)


def fake_quant_error(x: torch.Tensor, lo: float, hi: float, dtype, scheme) -> float:
    """Mean squared error of quantize-dequantize of the actual samples with range [lo, hi]."""
    qp = choose_qparams(lo, hi, dtype, scheme)
    return float(((dequantize(quantize(x, qp), qp, torch.float64) - x.double()) ** 2).mean())


def brute_force_clip(x: torch.Tensor, dtype, scheme, one_sided: bool) -> float:
    """The clip value with the smallest actual fake-quant error, by scanning a fine grid."""
    top = float(x.abs().max())
    grid = torch.linspace(top / 400, top, 400).tolist()
    return min(grid, key=lambda a: fake_quant_error(x, 0.0 if one_sided else -a, a, dtype, scheme))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_mse_on_gaussian_reaches_the_brute_force_optimum(bits):
    torch.manual_seed(0)
    x = torch.randn(200_000)
    dtype = IntType(bits, True)
    lo, hi = MSE().range(observe(x), dtype, Scheme.SYMMETRIC)
    assert lo == -hi
    best = brute_force_clip(x, dtype, Scheme.SYMMETRIC, one_sided=False)
    assert fake_quant_error(x, lo, hi, dtype, Scheme.SYMMETRIC) <= 1.02 * fake_quant_error(x, -best, best, dtype, Scheme.SYMMETRIC)
    if bits == 8:
        assert hi == pytest.approx(3.92, rel=0.06)  # Banner et al. (ACIQ), optimal 8-bit clip of N(0, 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_on_laplace_reaches_the_brute_force_optimum(bits):
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    dtype = IntType(bits, True)
    lo, hi = MSE().range(observe(x), dtype, Scheme.SYMMETRIC)
    best = brute_force_clip(x, dtype, Scheme.SYMMETRIC, one_sided=False)
    assert fake_quant_error(x, lo, hi, dtype, Scheme.SYMMETRIC) <= 1.02 * fake_quant_error(x, -best, best, dtype, Scheme.SYMMETRIC)
    assert hi < float(x.abs().max()) * 0.9  # heavy tails: the optimum clips


def test_outliers_blow_up_minmax_and_mse_does_better_than_both_fixed_rules():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(200_000), torch.tensor([200.0, -150.0])])
    stats = observe(x)
    assert MinMax().range(stats, INT8, Scheme.SYMMETRIC) == (-150.0, 200.0)
    assert Percentile(99.99).range(stats, INT8, Scheme.SYMMETRIC)[1] < 10
    errors = {str(m): fake_quant_error(x, *m.range(stats, INT8, Scheme.SYMMETRIC), INT8, Scheme.SYMMETRIC)
              for m in (MinMax(), Percentile(99.99), MSE())}
    assert errors["mse"] <= min(errors["minmax"], errors["percentile(99.99)"])


def test_mse_on_post_relu_data_ignores_the_spike_at_zero():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(200_000))
    lo, hi = MSE().range(observe(x), UINT8, Scheme.ASYMMETRIC)
    assert lo == 0.0
    best = brute_force_clip(x, UINT8, Scheme.ASYMMETRIC, one_sided=True)
    assert fake_quant_error(x, lo, hi, UINT8, Scheme.ASYMMETRIC) <= 1.02 * fake_quant_error(x, 0.0, best, UINT8, Scheme.ASYMMETRIC)


@pytest.mark.parametrize("text, expected", [("minmax", MinMax()), ("nsigma(2.5)", NSigma(2.5)),
                                            ("percentile(99.9)", Percentile(99.9)), ("mse", MSE()), ("nsigma", NSigma()), ("entropy", Entropy())])
def test_parse_range_method(text, expected):
    assert parse_range_method(text) == expected


def test_parse_range_method_names_the_bad_method():
    with pytest.raises(ValueError, match="kl"):
        parse_range_method("kl")


def test_entropy_keeps_the_whole_range_of_uniform_data():
    torch.manual_seed(0)
    stats = observe(torch.rand(500_000) * 2 - 1)
    lo, hi = Entropy().range(stats, INT8, Scheme.SYMMETRIC)
    assert hi == pytest.approx(1.0, rel=0.02) and lo == -hi


def test_entropy_clips_heavy_tails_but_not_below_the_bulk():
    """KL calibration keeps Gaussian data (beyond 3.5 sigma) and clips a Laplace's long tail."""
    torch.manual_seed(0)
    gaussian = torch.randn(1_000_000)
    assert 3.5 < Entropy().range(observe(gaussian), INT8, Scheme.SYMMETRIC)[1] <= float(gaussian.abs().max())
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1_000_000,))
    hi = Entropy().range(observe(laplace), INT8, Scheme.SYMMETRIC)[1]
    assert 5.0 < hi < 0.9 * float(laplace.abs().max())


def test_entropy_ignores_outliers_and_the_post_relu_spike():
    torch.manual_seed(0)
    x = torch.relu(torch.cat([torch.randn(500_000), torch.tensor([80.0])]))
    lo, hi = Entropy().range(observe(x), UINT8, Scheme.ASYMMETRIC)
    assert lo == 0.0 and 3.0 < hi < 10.0


@pytest.mark.parametrize("text, message", [
    ("nsigma(nan)", "finite k"), ("nsigma(-3)", "0 < k"), ("nsigma(0)", "0 < k"), ("nsigma(inf)", "finite k"),
    ("percentile(200)", "50 < p <= 100"), ("percentile(50)", "50 < p <= 100"), ("percentile(0)", "50 < p <= 100"),
    ("nsigma(abc)", "'abc' is not a number"), ("mse(3)", "only nsigma(K) and percentile(P)"),
    ("percentile(99.9", "in parentheses")])
def test_range_method_arguments_outside_their_range_are_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_range_method(text)


def test_range_method_limits_are_accepted():
    assert parse_range_method("percentile(100)") == Percentile(100.0)
    assert parse_range_method("nsigma(1000)") == NSigma(1000.0)
