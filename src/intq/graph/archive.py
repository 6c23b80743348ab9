"""Reading an untrusted archive: typed access to its JSON fields and its arrays, each checked against
what it must be before use (docs/format.md, rules 1-3). Every broken rule is an Invalid naming the
field or array; model_file.load adds the file's name."""
from __future__ import annotations

import math
import zipfile

import numpy as np

from intq.arith.qparams import IntType, QParams

MAX_CHANNELS = 1 << 16
MAX_ARRAY_VALUES = 1 << 28  # 268M weights in one layer: VGG-16's largest has 103M
NPY_HEADER_BYTES = 4096  # a .npy header is at most a few hundred bytes for these arrays


class Invalid(Exception):
    """A rule broken inside the file; `load` adds the file name."""


class Fields:
    """Typed access to one JSON object of the file; every error names `where` and the field."""

    def __init__(self, value, where: str):
        if not isinstance(value, dict):
            raise Invalid(f"{where}: expected a JSON object, got {type(value).__name__}")
        self.value, self.where = value, where

    def get(self, key: str, kinds: tuple[type, ...], what: str):
        if key not in self.value:
            raise Invalid(f"{self.where}: missing field {key!r}")
        value = self.value[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise Invalid(f"{self.where}: field {key!r} must be {what}, got {show(value)}")
        return value

    def text(self, key: str) -> str:
        return self.get(key, (str,), "a string")

    def flag(self, key: str) -> bool:
        return self.get(key, (bool,), "true or false")

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.get(key, (int,), "an integer")
        if not low <= value <= high:
            raise Invalid(f"{self.where}: field {key!r} must be in [{low}, {high}], got {value}")
        return value

    def integers(self, key: str, count: int, low: int, high: int, optional: bool = False) -> tuple[int, ...] | None:
        if optional and self.value.get(key) is None:
            return None
        values = self.get(key, (list,), f"a list of {count} integers")
        if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise Invalid(f"{self.where}: field {key!r} must be a list of {count} integers, got {show(values)}")
        if not all(low <= v <= high for v in values):
            raise Invalid(f"{self.where}: field {key!r} must hold integers in [{low}, {high}], got {values}")
        return tuple(values)

    def optional_number(self, key: str) -> float | None:
        value = self.value.get(key)
        if value is None:
            return None
        return float(self.get(key, (int, float), "a number or null"))

    def qparams(self, key: str | None = None, value=None) -> QParams:
        fields = Fields(self.value[key] if key else value, f"{self.where} {key or 'input_qparams'}")
        bits = fields.integer("bits", 2, 32)
        signed = fields.flag("signed")
        axis = fields.get("axis", (int, type(None)), "0 or null")
        scale, zero = fields.value.get("scale"), fields.value.get("zero_point")
        if axis is None:
            if not isinstance(scale, (int, float)) or isinstance(scale, bool):
                raise Invalid(f"{fields.where}: field 'scale' must be a number, got {show(scale)}")
            if not isinstance(zero, int) or isinstance(zero, bool):
                raise Invalid(f"{fields.where}: field 'zero_point' must be an integer, got {show(zero)}")
        elif axis != 0 or not number_list(scale, float) or not number_list(zero, int) or len(scale) != len(zero):
            raise Invalid(f"{fields.where}: per-channel parameters need axis 0 and equally long lists of scales "
                           f"and integer zero points")
        elif not 1 <= len(scale) <= MAX_CHANNELS:
            raise Invalid(f"{fields.where}: {len(scale)} channels (at most {MAX_CHANNELS})")
        zero_points = np.asarray(zero, dtype=object)
        if any(abs(int(z)) > 2**40 for z in np.ravel(zero_points)):
            raise Invalid(f"{fields.where}: field 'zero_point' is far outside any integer type")
        try:
            scales = np.asarray(scale, np.float64)
        except OverflowError:
            raise Invalid(f"{fields.where}: field 'scale' is beyond float64") from None
        return QParams(scales, zero_points.astype(np.int64), IntType(bits, signed), axis)


def number_list(values, kind: type) -> bool:
    if not isinstance(values, list):
        return False
    allowed = (int, float) if kind is float else (int,)
    return all(isinstance(v, allowed) and not isinstance(v, bool) for v in values)


def show(value) -> str:
    """A short, printable rendering of a value from the file (never its full text)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked_name(value, where: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 256 or not value.isprintable():
        raise Invalid(f"{where}: an op or tensor name must be 1-256 printable characters, got {show(value)}")
    return value


def member(archive: zipfile.ZipFile, key: str) -> zipfile.ZipInfo | None:
    try:
        return archive.getinfo(f"{key}.npy")
    except KeyError:
        return None


def read_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype, shape: tuple[int, ...] | None):
    """One .npy member, its size checked against the expected dtype and shape before decompressing,
    its dtype and shape checked after (an exact match: no casting, no broadcasting)."""
    key = info.filename[:-4]
    if shape is not None:
        expected = math.prod(shape) * dtype.itemsize
        if not expected <= info.file_size <= expected + NPY_HEADER_BYTES:
            raise Invalid(f"array {key!r}: {info.file_size:,} bytes uncompressed, expected a {dtype} array of "
                           f"shape {shape} ({expected:,} bytes)")
    try:
        with archive.open(info) as handle:
            array = np.lib.format.read_array(handle, allow_pickle=False)
    except ValueError as err:  # a malformed .npy header, or an object array (pickle refused)
        raise Invalid(f"array {key!r}: not a plain .npy array ({show(str(err))[1:-1]})") from None
    if array.dtype != dtype or (shape is not None and array.shape != shape) or (shape is None and array.ndim != 1):
        raise Invalid(f"array {key!r}: expected {dtype} of shape {shape or '(n,)'}, got {array.dtype} of shape "
                       f"{array.shape}")
    return array


class ArchiveArrays:
    """The archive's arrays, each read once and only as the op that owns it expects."""

    def __init__(self, archive: zipfile.ZipFile):
        self.archive, self.claimed = archive, {"__meta__"}
        self.members = {info.filename: info for info in archive.infolist()}

    def read(self, key: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        if math.prod(shape) > MAX_ARRAY_VALUES:
            raise Invalid(f"array {key!r}: {math.prod(shape):,} values (at most {MAX_ARRAY_VALUES:,})")
        info = self.members.get(f"{key}.npy")
        if info is None:
            raise Invalid(f"missing array {key!r}")
        self.claimed.add(key)
        return read_array(self.archive, info, np.dtype(dtype), shape)

    def check_all_claimed(self) -> None:
        """Every member belongs to an op: an unknown array is refused unread (never decompressed)."""
        for name in self.members:
            if not name.endswith(".npy") or name[:-4] not in self.claimed:
                raise Invalid(f"unexpected array {show(name)} (not a field of any op)")
