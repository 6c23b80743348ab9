"""Range methods: statistics of a tensor -> the real range [lo, hi] its integers should cover.

Every method reads a `TensorStats` (observers.py), so one streaming pass feeds them all. Each is a
frozen dataclass with `range(stats, dtype, scheme) -> (lo, hi)`; `dtype` and `scheme` matter only
to methods that weigh quantization error (mse). Ranges are later widened to include 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from intq.calibrate.observers import TensorStats
from intq.arith.qparams import IntType, Scheme


@dataclass(frozen=True)
class MinMax:
    """[lo, hi] = [min x, max x]: nothing clipped, the step grows with the largest outlier."""

    def range(self, stats: TensorStats, dtype: IntType, scheme: Scheme) -> tuple[float, float]:
        return stats.min, stats.max

    def __str__(self) -> str:
        return "minmax"


MAX_SIGMAS = 1000.0  # beyond this mean +- k std only risks overflow: Chebyshev clips < 1e-6 of any tensor


@dataclass(frozen=True)
class NSigma:
    """[lo, hi] = [mean - k*std, mean + k*std] (the seed study: k = 3), population std."""

    k: float = 3.0

    def __post_init__(self) -> None:
        if not (isinstance(self.k, (int, float)) and math.isfinite(self.k) and 0 < self.k <= MAX_SIGMAS):
            raise ValueError(f"nsigma(k) needs a finite k with 0 < k <= {MAX_SIGMAS:g}, got {self.k!r}")

    def range(self, stats: TensorStats, dtype: IntType, scheme: Scheme) -> tuple[float, float]:
        return stats.mean - self.k * stats.std, stats.mean + self.k * stats.std

    def __str__(self) -> str:
        return f"nsigma({self.k:g})"


@dataclass(frozen=True)
class Percentile:
    """hi = the p-th percentile of x, lo = the (100 - p)-th (or min x for one-sided data), 50 < p <= 100
    (p <= 50 would put lo above hi).

    Read off the histogram at bin resolution, rounding outwards (the edge of the bin that holds
    the percentile), so percentile(100) = the upper edge of the last occupied bin.
    """

    p: float = 99.99

    def __post_init__(self) -> None:
        if not (isinstance(self.p, (int, float)) and math.isfinite(self.p) and 50 < self.p <= 100):
            raise ValueError(f"percentile(p) needs 50 < p <= 100 (the share of values kept, in %), got {self.p!r}")

    def range(self, stats: TensorStats, dtype: IntType, scheme: Scheme) -> tuple[float, float]:
        edges, counts = stats.occupied()
        cumulative = np.cumsum(counts) / counts.sum()
        hi_index = int(np.searchsorted(cumulative, self.p / 100.0))
        hi = min(float(edges[min(hi_index, counts.size - 1) + 1]), stats.max)
        if stats.min >= 0:
            return stats.min, hi
        lo_index = int(np.searchsorted(cumulative, 1.0 - self.p / 100.0))
        return max(float(edges[lo_index]), stats.min), hi

    def __str__(self) -> str:
        return f"percentile({self.p:g})"


@dataclass(frozen=True)
class MSE:
    """The range that minimises the expected squared quantization error on the histogram.

    For a candidate range with step s and representable interval [a, b] (eq. 12):
        E = sum_j n_j * (s^2 / 12)            for bin centres c_j in [a, b]  (rounding noise)
          + sum_j n_j * (c_j - clip(c_j))^2   for c_j outside                 (clipping error)
    with exact zeros (n_0 of them) excluded: 0 is always representable. Candidates shrink the
    min/max range by factors k/K, k = 1..K, and by 100 geometric factors down to 1/1000 (for
    ranges stretched by outliers), scaling both ends together.
    """

    candidates: int = 400

    def range(self, stats: TensorStats, dtype: IntType, scheme: Scheme) -> tuple[float, float]:
        edges, counts = stats.occupied()
        centres = (edges[:-1] + edges[1:]) / 2  # (B,)
        counts = _without_exact_zeros(counts, edges, stats.zeros)
        centres, counts = centres[counts > 0], counts[counts > 0]  # empty bins add no error
        factors = np.concatenate([np.arange(1, self.candidates + 1) / self.candidates,
                                  np.geomspace(1e-3, 1.0, 100)])  # (K,)
        lo, hi = _candidate_ranges(stats, factors, scheme)
        low_code, high_code, step = _representable(lo, hi, dtype, scheme)
        positive, negative = centres > 0, centres < 0
        outside = (_clipping_error(centres[positive], counts[positive], high_code)
                   + _clipping_error(-centres[negative], counts[negative], -low_code))
        clipped = _count_beyond(centres[positive], counts[positive], high_code) + \
            _count_beyond(-centres[negative], counts[negative], -low_code)
        error = outside + (counts.sum() - clipped) * step**2 / 12.0
        best = int(np.argmin(error))
        return float(lo[best]), float(hi[best])

    def __str__(self) -> str:
        return "mse"


@dataclass(frozen=True)
class Entropy:
    """The clip threshold T minimising KL(P || Q), as TensorRT calibrates (Migacz, GTC 2017).

    On the histogram of |x| (one-sided data: of x) with bins 0..B-1, for each candidate T = i bins:
    P = counts[:i] with every count beyond T added to bin i-1 (clipped values saturate);
    Q = P merged into L = number of codes on that side (2^(b-1) signed, 2^b unsigned) equal groups,
    each group's mass spread evenly over its non-empty bins;  KL(P || Q) = sum P log(P / Q) over
    P > 0 (eq. 16). Symmetric data gives [-T, T]; one-sided data [0, T]. Exact zeros are excluded.
    """

    candidates: int = 256

    def range(self, stats: TensorStats, dtype: IntType, scheme: Scheme) -> tuple[float, float]:
        one_sided = stats.min >= 0
        counts, width = _magnitude_histogram(stats, one_sided)
        levels = _levels_per_side(dtype, one_sided)
        if counts.size <= levels:
            threshold = counts.size * width
        else:
            steps = np.unique(np.linspace(levels, counts.size, self.candidates).astype(int))
            divergences = [_kl_divergence(counts, int(i), levels) for i in steps]
            threshold = int(steps[int(np.argmin(divergences))]) * width
        threshold = min(threshold, max(abs(stats.min), abs(stats.max)))
        return (0.0, threshold) if one_sided else (-threshold, threshold)

    def __str__(self) -> str:
        return "entropy"


def _magnitude_histogram(stats: TensorStats, one_sided: bool) -> tuple[np.ndarray, float]:
    """Counts of |x| per bin [k w, (k+1) w) up to the last occupied bin, exact zeros removed."""
    half = stats.counts.size // 2
    positive = stats.counts[half:].astype(np.float64)
    if not one_sided:
        positive = positive + stats.counts[:half][::-1]  # bin [-(k+1)w, -kw) mirrors [kw, (k+1)w)
    positive[0] = max(positive[0] - stats.zeros, 0.0)
    occupied = np.flatnonzero(positive)
    last = occupied[-1] + 1 if occupied.size else 1
    return positive[:last], stats.bin_width


def _levels_per_side(dtype: IntType, one_sided: bool) -> int:
    """Codes available on [0, T]: 2^(b-1) for signed types, 2^b (one-sided) or 2^(b-1) unsigned."""
    if dtype.signed or not one_sided:
        return (dtype.qmax - dtype.qmin + 1) // 2
    return dtype.qmax - dtype.qmin + 1


def _kl_divergence(counts: np.ndarray, bins: int, levels: int) -> float:
    """KL(P || Q) of the first `bins` bins (tail folded into the last) against L-level Q (eq. 16)."""
    source = counts[:bins]
    reference = source.copy()
    reference[-1] += counts[bins:].sum()
    starts = np.linspace(0, bins, levels + 1).astype(int)[:-1]  # group i = bins [starts[i], starts[i+1])
    sizes = np.diff(np.append(starts, bins))
    occupied = source > 0
    mass = np.add.reduceat(source, starts)
    nonzero = np.add.reduceat(occupied.astype(np.float64), starts)
    per_bin = np.divide(mass, nonzero, out=np.zeros_like(mass), where=nonzero > 0)
    expanded = np.repeat(per_bin, sizes) * occupied
    p = reference / reference.sum()
    q = expanded / max(expanded.sum(), 1e-300)
    mask = p > 0
    q = np.where(mask & (q == 0), 1e-12, q)  # TensorRT smooths empty Q bins the same way
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _suffix_sums(values: np.ndarray, counts: np.ndarray, thresholds: np.ndarray):
    """For each threshold t: sums over values > t of n, n*v and n*v^2 (values >= 0, any order)."""
    order = np.argsort(values)
    v, n = values[order], counts[order]
    cumulative = [np.concatenate([[0.0], np.cumsum((n * v**k)[::-1])])[::-1] for k in range(3)]
    start = np.searchsorted(v, thresholds, side="right")  # first value beyond t
    return [c[start] for c in cumulative]


def _clipping_error(values: np.ndarray, counts: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """sum over values v > t of n (v - t)^2 = S2 - 2 t S1 + t^2 S0, for every threshold t."""
    s0, s1, s2 = _suffix_sums(values, counts, thresholds)
    return np.maximum(s2 - 2 * thresholds * s1 + thresholds**2 * s0, 0.0)


def _count_beyond(values: np.ndarray, counts: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return _suffix_sums(values, counts, thresholds)[0]


def _without_exact_zeros(counts: np.ndarray, edges: np.ndarray, zeros: int) -> np.ndarray:
    """Histogram counts with the exact zeros removed from the bin [0, w) that holds them."""
    counts = counts.astype(np.float64)
    zero_bin = np.searchsorted(edges, 0.0, side="right") - 1
    if 0 <= zero_bin < counts.size:
        counts[zero_bin] = max(counts[zero_bin] - zeros, 0.0)
    return counts


def _candidate_ranges(stats: TensorStats, factors: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """(lo_k, hi_k) = factor_k * (min, max), widened to 0; symmetric: +-factor_k * max|x|."""
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    if scheme is Scheme.SYMMETRIC and lo < 0:
        magnitude = max(-lo, hi)
        return -factors * magnitude, factors * magnitude
    return factors * lo, factors * hi


def _representable(lo: np.ndarray, hi: np.ndarray, dtype: IntType, scheme: Scheme):
    """(lowest real code, highest real code, step) of each candidate range's grid (eq. 3-5)."""
    levels = dtype.qmax - dtype.qmin
    if scheme is Scheme.SYMMETRIC and dtype.signed:
        step = np.maximum(-lo, hi) / dtype.qmax
        return step * dtype.qmin, step * dtype.qmax, step
    if scheme is Scheme.SYMMETRIC:
        step = hi / levels
        return np.zeros_like(step), hi, step
    step = (hi - lo) / levels
    if scheme is Scheme.SPAN:
        return step * dtype.qmin, step * dtype.qmax, step
    return lo, hi, step


RANGE_METHODS = {"minmax": MinMax, "nsigma": NSigma, "percentile": Percentile, "mse": MSE, "entropy": Entropy}


def parse_range_method(text: str):
    """'minmax' | 'nsigma' | 'nsigma(3)' | 'percentile(99.9)' | 'mse' | 'entropy' -> a range method.

    Only nsigma and percentile take an argument, a number in their range (see each class);
    anything else raises ValueError saying what was expected.
    """
    name, paren, arg = text.strip().partition("(")
    if name not in RANGE_METHODS:
        raise ValueError(f"unknown range method {text!r}; choose from {', '.join(RANGE_METHODS)}")
    if not paren:
        return RANGE_METHODS[name]()
    if name not in ("nsigma", "percentile") or not arg.endswith(")"):
        raise ValueError(f"range method {text!r}: only nsigma(K) and percentile(P) take an argument, in parentheses")
    try:
        value = float(arg[:-1])
    except ValueError:
        raise ValueError(f"range method {text!r}: {arg[:-1]!r} is not a number") from None
    try:
        return RANGE_METHODS[name](value)
    except ValueError as err:
        raise ValueError(f"range method {text!r}: {err}") from None
