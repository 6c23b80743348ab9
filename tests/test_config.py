"""Quantization configurations: the type names every range method the command line offers."""
from typing import get_args

from intq.calibrate.ranges import RANGE_METHODS
from intq.graph.config import RangeMethod


def test_range_method_type_names_every_range_method():
    assert set(get_args(RangeMethod)) == set(RANGE_METHODS.values())
