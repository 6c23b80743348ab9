"""Range methods: statistics of a tensor -> the real range [lo, hi] its integers should cover.

Every method reads a `TensorStats` (observers.py), so one streaming pass feeds them all. Each is a
frozen dataclass with `range(stats, dtype, scheme) -> (lo, hi)`; `dtype` and `scheme` matter only
to methods that weigh quantization error (mse). Ranges are later widened to include 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intq.observers import TensorStats
from intq.qparams import IntType, Scheme


@dataclass(frozen=True)
class MinMax:
    """[lo, hi] = [min x, max x]: nothing clipped, the step grows with the largest outlier."""

    def range(self, stats: TensorStats, dtype: IntType, scheme: Scheme) -> tuple[float, float]:
        return stats.min, stats.max

    def __str__(self) -> str:
        return "minmax"


@dataclass(frozen=True)
class NSigma:
    """[lo, hi] = [mean - k*std, mean + k*std] (the seed study: k = 3), population std."""

    k: float = 3.0

    def range(self, stats: TensorStats, dtype: IntType, scheme: Scheme) -> tuple[float, float]:
        return stats.mean - self.k * stats.std, stats.mean + self.k * stats.std

    def __str__(self) -> str:
        return f"nsigma({self.k:g})"


@dataclass(frozen=True)
class Percentile:
    """hi = the p-th percentile of x, lo = the (100 - p)-th (or min x for one-sided data).

    Read off the histogram at bin resolution, rounding outwards (the edge of the bin that holds
    the percentile), so percentile(100) = the upper edge of the last occupied bin.
    """

    p: float = 99.99

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
        factors = np.concatenate([np.arange(1, self.candidates + 1) / self.candidates,
                                  np.geomspace(1e-3, 1.0, 100)])  # (K,)
        lo, hi = _candidate_ranges(stats, factors, scheme)
        low_code, high_code, step = _representable(lo, hi, dtype, scheme)
        clipped = np.clip(centres[None, :], low_code[:, None], high_code[:, None])  # (K, B)
        inside = clipped == centres[None, :]
        error = np.where(inside, step[:, None] ** 2 / 12.0, (centres[None, :] - clipped) ** 2)
        best = int(np.argmin(error @ counts))
        return float(lo[best]), float(hi[best])

    def __str__(self) -> str:
        return "mse"


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


RANGE_METHODS = {"minmax": MinMax, "nsigma": NSigma, "percentile": Percentile, "mse": MSE}


def parse_range_method(text: str):
    """'minmax' | 'nsigma' | 'nsigma(3)' | 'percentile(99.9)' | 'mse' -> a range method."""
    name, _, arg = text.strip().partition("(")
    if name not in RANGE_METHODS:
        raise ValueError(f"unknown range method {text!r}; choose from {', '.join(RANGE_METHODS)}")
    if not arg:
        return RANGE_METHODS[name]()
    try:
        return RANGE_METHODS[name](float(arg.rstrip(")")))
    except (TypeError, ValueError):
        raise ValueError(f"range method {text!r}: bad argument") from None
