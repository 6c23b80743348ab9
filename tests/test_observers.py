"""Streaming statistics: many batches give what one pass over all the data gives."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from intq.calibrate.observers import HISTOGRAM_BINS, TensorObserver, merge_moments, observe, widened_counts


def test_streaming_moments_equal_one_pass():
    torch.manual_seed(0)
    data = torch.randn(100_000) * 3 + 1
    observer = TensorObserver()
    for chunk in data.split(7_000):
        observer.update(chunk)
    stats = observer.stats()
    reference = data.double().numpy()
    assert stats.count == 100_000
    assert stats.mean == pytest.approx(reference.mean(), abs=1e-5)
    assert stats.std == pytest.approx(reference.std(), rel=1e-5)
    assert (stats.min, stats.max) == (float(data.min()), float(data.max()))


def test_streaming_histogram_equals_one_shot_histogram_after_widening():
    """The first batch is narrow, the last wide: widening by merging bin pairs stays exact."""
    torch.manual_seed(1)
    batches = [torch.rand(1000) * 0.01, torch.randn(1000), torch.randn(1000) * 50]
    observer = TensorObserver()
    for batch in batches:
        observer.update(batch)
    streamed = observer.stats()
    one_shot = observe(torch.cat(batches))
    assert streamed.bin_width == one_shot.bin_width
    assert np.array_equal(streamed.counts, one_shot.counts)
    assert streamed.counts.sum() == 3000


def test_histogram_bins_hold_their_values():
    stats = observe(torch.tensor([0.0, 0.25, -0.25, 1.0]))
    edges = stats.bin_edges
    for value in (0.0, 0.25, -0.25, 1.0):
        index = np.searchsorted(edges, value, side="right") - 1
        assert stats.counts[index] >= 1
    assert stats.counts.sum() == 4


def test_widened_counts_merges_pairs_around_the_centre():
    counts = np.zeros(HISTOGRAM_BINS, np.int64)
    centre = HISTOGRAM_BINS // 2
    counts[centre] = 3      # [0, w)
    counts[centre + 1] = 4  # [w, 2w)
    counts[centre - 1] = 5  # [-w, 0)
    merged = widened_counts(counts)
    assert merged[centre] == 7      # [0, 2w)
    assert merged[centre - 1] == 5  # [-2w, 0)
    assert merged.sum() == 12


def test_exact_zeros_are_counted_for_non_negative_tensors():
    stats = observe(torch.relu(torch.tensor([-1.0, -2.0, 0.0, 3.0, 0.5])))
    assert stats.zeros == 3


def test_all_zero_tensor_is_observed():
    stats = observe(torch.zeros(10))
    assert (stats.min, stats.max, stats.std) == (0.0, 0.0, 0.0)
    assert stats.counts.sum() == 10


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="NaN or Inf"):
        observe(torch.tensor([1.0, float("nan")]))


def test_empty_observer_has_no_stats():
    with pytest.raises(ValueError, match="no values"):
        TensorObserver().stats()


@settings(max_examples=100)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40))
def test_merge_moments_equals_moments_of_the_union(a, b):
    def moments(values):
        array = np.array(values)
        return len(array), array.mean(), ((array - array.mean()) ** 2).sum()

    n, mean, m2 = merge_moments(*moments(a), *moments(b))
    n_all, mean_all, m2_all = moments(a + b)
    assert n == n_all
    assert mean == pytest.approx(mean_all, abs=1e-9)
    assert m2 == pytest.approx(m2_all, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("factor", [2.0**-130, 2.0**-140])  # weights x ~1e-38; denormal float32 values
def test_tiny_and_denormal_tensors_get_the_same_histogram_at_a_scaled_bin_width(factor):
    """Bin widths below 2^-128 have an inf float32 reciprocal; the counts must not notice."""
    torch.manual_seed(0)
    x = torch.randn(10_000)
    tiny = x * factor  # exact: a power of two (denormals drop low bits, so compare with what was stored)
    reference, stats = observe(tiny / factor), observe(tiny)
    assert stats.bin_width == reference.bin_width * factor
    assert np.array_equal(stats.counts, reference.counts) and stats.counts.sum() == 10_000
