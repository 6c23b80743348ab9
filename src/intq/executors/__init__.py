"""Executors of an IntegerModel. `reference` is the exact-integer ground truth; `c_export` writes the
same integers as a portable C99 model (checked bit for bit by golden vectors and `intq verify`)."""
