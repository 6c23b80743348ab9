"""Streaming statistics of a tensor: O(1) memory however many batches are observed.

An observer keeps count, min, max, mean and variance (Chan/Welford merge of batch moments) and a
fixed-bin histogram that widens by merging bin pairs. Protocol: `update(x)`, then `stats()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

HISTOGRAM_BINS = 8192
_HALF = HISTOGRAM_BINS // 2


@dataclass(frozen=True, eq=False)
class TensorStats:
    """A snapshot of an observer. Bin i covers [(i - 4096) * w, (i - 4095) * w), w = bin_width."""

    count: int
    min: float
    max: float
    mean: float
    var: float
    counts: np.ndarray  # int64, HISTOGRAM_BINS
    bin_width: float
    zeros: int = 0  # exact 0s of a non-negative tensor (post-ReLU spike): representable, error-free
    shape: tuple[int, ...] = ()  # one sample's shape (the batch dimension dropped)
    window_means: dict = field(default_factory=dict)  # {Window: mean} of the layers reading it (window_means.py)

    @property
    def std(self) -> float:
        return float(np.sqrt(max(self.var, 0.0)))

    @property
    def bin_edges(self) -> np.ndarray:
        return (np.arange(HISTOGRAM_BINS + 1) - _HALF) * self.bin_width

    def occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """(edges, counts) trimmed to the bins between the first and last non-empty one."""
        nonzero = np.flatnonzero(self.counts)
        if nonzero.size == 0:
            return self.bin_edges[_HALF : _HALF + 2], np.zeros(1, np.int64)
        first, last = nonzero[0], nonzero[-1]
        return self.bin_edges[first : last + 2], self.counts[first : last + 1]


def merge_moments(n_a: int, mean_a: float, m2_a: float, n_b: int, mean_b: float, m2_b: float) -> tuple[int, float, float]:
    """Chan et al. parallel merge of (count, mean, M2 = sum of squared deviations).

    n = n_a + n_b; delta = mean_b - mean_a; mean = mean_a + delta * n_b / n;
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.  Variance = M2 / n (population).
    """
    n = n_a + n_b
    if n == 0:
        return 0, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


def widened_counts(counts: np.ndarray) -> np.ndarray:
    """Histogram at twice the bin width: new bin j = old bins 2j - 4096 and 2j - 4095 (exact)."""
    merged = counts.reshape(-1, 2).sum(axis=1)  # (8192,) -> (4096,) pairs
    out = np.zeros_like(counts)
    out[_HALF // 2 : _HALF // 2 + merged.size] = merged
    return out


def batch_moments(x: torch.Tensor) -> tuple[float, float]:
    """(mean, M2) of one batch from power sums: mean = S1/n, M2 = max(S2 - S1^2/n, 0).

    S1 is a float32 cascade sum, S2 a float32 dot product (both blocked, relative error ~1e-6); the
    cancellation in S2 - S1^2/n is harmless while |mean| is not >> std, which holds for
    activations. Batches are then merged exactly with merge_moments.
    """
    n = x.numel()
    s1 = float(x.sum())
    s2 = float(torch.dot(x, x))
    return s1 / n, max(s2 - s1 * s1 / n, 0.0)


class TensorObserver:
    """Observes batches of one tensor; `stats()` gives min/max, mean/std and the histogram."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.counts = np.zeros(HISTOGRAM_BINS, np.int64)
        self.bin_width = 0.0
        self.zeros = 0
        self.shape: tuple[int, ...] = ()

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch (batch dimension first) into the statistics. Raises ValueError on NaN or Inf."""
        self.shape = tuple(x.shape[1:])
        x = x.detach().reshape(-1)  # (N, ...) -> (N * ...,)
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("tensor contains NaN or Inf")
        batch_mean, batch_m2 = batch_moments(x.float())
        self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, x.numel(), batch_mean, batch_m2)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if lo >= 0:  # exact zeros matter where ReLU piles them up; counting costs a pass
            self.zeros += x.numel() - int(torch.count_nonzero(x))
        self._update_histogram(x, max(abs(lo), abs(hi)))

    def _update_histogram(self, x: torch.Tensor, magnitude: float) -> None:
        if self.bin_width == 0.0:
            self.bin_width = _initial_bin_width(magnitude)
        while magnitude >= _HALF * self.bin_width:
            self.counts = widened_counts(self.counts)
            self.bin_width *= 2.0
        # w is a power of two, so x / w is exact; + 4096 makes every index >= 0, so the int32
        # cast truncates like floor. Rounding of the sum can give index 8192 for x just below
        # the top edge: that count belongs to the last bin.
        index = (_scaled(x, 1.0 / self.bin_width) + _HALF).to(torch.int32)
        counts = torch.bincount(index, minlength=HISTOGRAM_BINS).cpu().numpy()
        self.counts += counts[:HISTOGRAM_BINS]
        self.counts[-1] += counts[HISTOGRAM_BINS:].sum()

    def stats(self) -> TensorStats:
        if self.count == 0:
            raise ValueError("observer has seen no values")
        var = self.m2 / self.count
        return TensorStats(
            self.count, self.min, self.max, self.mean, var, self.counts.copy(), self.bin_width, self.zeros, self.shape
        )


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x * factor, in float32 while `factor` (a power of two) fits it, else in float64.

    Tiny or denormal tensors (weights x 1e-38) get bin widths below 2^-128, whose reciprocal
    is inf in float32; float64 holds it exactly, so the product stays exact either way.
    """
    if factor <= _FLOAT32_MAX:
        return x.float() * factor
    return x.double() * factor


def _initial_bin_width(magnitude: float) -> float:
    """The smallest power of two w with |x|max < 4096 * w: w = 2^(floor(log2(|x|max / 4096)) + 1).

    Widening doubles w until the same condition holds, so streaming and one-shot observation
    end with the same width and identical counts. An all-zero batch gets 2^-20.
    """
    if magnitude == 0.0:
        return 2.0**-20
    return 2.0 ** (np.floor(np.log2(magnitude / _HALF)) + 1)


def observe(x: torch.Tensor) -> TensorStats:
    """Statistics of a single tensor (weights): one update, then stats."""
    observer = TensorObserver()
    observer.update(x)
    return observer.stats()
