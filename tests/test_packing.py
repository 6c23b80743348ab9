"""Sub-byte weight packing round-trips every value of every width."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from intq.arith.packing import field_bits, pack_signed, unpack_signed


def test_worked_example_4_bit():
    assert pack_signed(np.array([-1, 3]), 4).tolist() == [0x3F]


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_value_round_trips(bits):
    values = np.arange(-(1 << (bits - 1)), 1 << (bits - 1)).reshape(-1, 1)
    packed = pack_signed(values, bits)
    assert packed.dtype == np.uint8
    assert packed.size == -(-values.size * field_bits(bits) // 8)
    assert np.array_equal(unpack_signed(packed, bits, values.shape), values)


@given(st.integers(2, 8), st.lists(st.integers(-128, 127), min_size=1, max_size=50))
def test_random_tensors_round_trip(bits, raw):
    values = np.clip(np.array(raw), -(1 << (bits - 1)), (1 << (bits - 1)) - 1).reshape(1, -1)
    assert np.array_equal(unpack_signed(pack_signed(values, bits), bits, values.shape), values)


def test_values_out_of_range_are_refused():
    with pytest.raises(ValueError, match="4 signed bits"):
        pack_signed(np.array([8]), 4)
