"""Executors of an IntegerModel. `reference` is the exact-integer ground truth."""
