"""Sub-byte packing of signed integer weights: 2-bit values four to a byte, 3- and 4-bit values
two to a byte (low bits first), 5- to 8-bit values one per byte.

A value q of a b-bit field is stored as its two's-complement bit pattern q & (2^b - 1) and read
back by sign extension: q = p - 2^b if p >= 2^(b-1) else p.
"""
from __future__ import annotations

import numpy as np


def field_bits(bits: int) -> int:
    """Width of the field one b-bit value occupies: 2, 4 or 8 (a divisor of 8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"packable widths are 2..8 bits, got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed b-bit integers (any shape) -> uint8 bytes, 8 // field_bits(b) values per byte.

    Example (4-bit): [-1, 3] -> one byte 0x3F (low nibble 0xF = -1, high nibble 0x3 = 3).
    """
    field = field_bits(bits)
    flat = values.astype(np.int64).ravel()
    if flat.size and (flat.min() < -(1 << (bits - 1)) or flat.max() > (1 << (bits - 1)) - 1):
        raise ValueError(f"values do not fit {bits} signed bits")
    per_byte = 8 // field
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, np.int64)
    padded[: flat.size] = flat & ((1 << field) - 1)
    lanes = padded.reshape(-1, per_byte)  # (bytes, values per byte)
    shifts = np.arange(per_byte, dtype=np.int64) * field
    return (lanes << shifts).sum(axis=1).astype(np.uint8)


def unpack_signed(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of pack_signed: uint8 bytes -> int8 values of `shape`, sign-extended from the field."""
    field = field_bits(bits)
    per_byte = 8 // field
    count = int(np.prod(shape))
    shifts = np.arange(per_byte, dtype=np.int64) * field
    lanes = (packed.astype(np.int64)[:, None] >> shifts) & ((1 << field) - 1)  # (bytes, values per byte)
    flat = lanes.ravel()[:count]
    flat = np.where(flat >= 1 << (field - 1), flat - (1 << field), flat)
    return flat.astype(np.int8).reshape(shape)
