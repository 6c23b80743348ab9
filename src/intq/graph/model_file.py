"""The integer model file (.npz): writing it, and reading it as the untrusted input it is.

A model file is one compressed `.npz` that `numpy.load(allow_pickle=False)` can read: integer arrays
under `<layer>.<field>` keys (weights int8, or uint8 with 2-4-bit weights packed; biases and
mantissas int32, shifts int8) and everything else, scales and zero points included, as JSON under
`__meta__` (UTF-8 bytes; a float64 scale round-trips exactly through JSON). docs/format.md lists
every field and every rule a file must pass.

Reading is the counterpart of TFLite's flatbuffer verifier and onnx.checker: `load` admits a file
only when every array is exactly the one its op needs (name, dtype, shape; sizes checked before
anything is decompressed), every JSON field has its type and range, and the model passes
model_check.check_model (values, consistency, the recomputed accumulator bound). Anything else is
one ModelFileError naming the file, the op and the rule.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from intq.files import atomic_write
from intq.graph.integer_model import (InputSpec, IntegerModel, IntegerOp, QAdd, QAvgPool, QConv2d, QFlatten, QLayer, QLinear,
                                QMaxPool, QReLU, accumulator_bound)
from intq.graph.model_check import MAX_CHANNELS, MAX_OPS, ModelCheckError, check_model
from intq.arith.packing import field_bits, pack_signed, unpack_signed
from intq.arith.qparams import IntType, QParams

FORMAT = "intq.IntegerModel"
FORMAT_VERSION = 2
MAX_META_BYTES = 16 << 20  # JSON of a 10,000-op model with per-channel parameters is a few MB
MAX_ARRAY_VALUES = 1 << 28  # 268M weights in one layer: VGG-16's largest has 103M
NPY_HEADER_BYTES = 4096  # a .npy header is at most a few hundred bytes for these arrays
OP_TYPES = ("QLayer", "QAdd", "QAvgPool", "QMaxPool", "QFlatten", "QReLU")  # the file's tags ("QLayer" + kind)
LAYER_KINDS = {op.LABEL: op for op in (QConv2d, QLinear)}


class ModelFileError(Exception):
    """An .npz that is not an admissible intq IntegerModel (names the file, the op and the rule)."""


# ---------------------------------------------------------------------------------------- writing

def _qparams_meta(qp: QParams) -> dict:
    """QParams as JSON: float64 scales round-trip exactly through Python's float repr."""
    return {"bits": qp.dtype.bits, "signed": qp.dtype.signed, "axis": qp.axis,
            "scale": np.asarray(qp.scale, np.float64).tolist(), "zero_point": np.asarray(qp.zero_point).tolist()}


def _store_weight(layer: QLayer, arrays: dict) -> dict:
    """int8 weights as they are; 2- to 4-bit weights packed into uint8 (packing.py)."""
    bits = layer.weight_qparams.dtype.bits
    if field_bits(bits) == 8:
        arrays[f"{layer.name}.weight"] = layer.weight.astype(np.int8)
        return {"weight_shape": list(layer.weight.shape), "weight_packed": False}
    arrays[f"{layer.name}.weight"] = pack_signed(layer.weight, bits)
    return {"weight_shape": list(layer.weight.shape), "weight_packed": True}


def _layer_meta(op: IntegerOp, arrays: dict) -> dict:
    meta = {"name": op.name, "inputs": list(op.inputs), "type": "QLayer" if isinstance(op, QLayer) else type(op).__name__}
    if isinstance(op, (QLayer, QAdd, QAvgPool)):
        arrays[f"{op.name}.mantissa"] = op.mantissa.astype(np.int32)
        arrays[f"{op.name}.shift"] = op.shift.astype(np.int8)  # n in [-30, 31] (fixed_point.py)
        meta.update(relu=op.relu, relu_max=op.relu_max, output_qparams=_qparams_meta(op.output_qparams))
    if isinstance(op, QLayer):
        if op.bias is not None:
            arrays[f"{op.name}.bias"] = op.bias.astype(np.int32)
        meta.update(kind=op.LABEL, geometry=op.geometry, has_bias=op.bias is not None, **_store_weight(op, arrays),
                    weight_qparams=_qparams_meta(op.weight_qparams), input_qparams=_qparams_meta(op.input_qparams))
    elif isinstance(op, (QAdd, QAvgPool)):
        inputs = op.input_qparams if isinstance(op, QAdd) else (op.input_qparams,)
        meta.update(input_qparams=[_qparams_meta(qp) for qp in inputs])
        if isinstance(op, QAvgPool):
            meta.update(kernel_size=op.kernel_size, stride=op.stride)
    elif isinstance(op, QMaxPool):
        meta.update(kernel_size=op.kernel_size, stride=op.stride, padding=op.padding)
    elif isinstance(op, QReLU):
        meta.update(zero_point=op.zero_point)
    return meta


def to_arrays(model: IntegerModel) -> dict[str, np.ndarray]:
    """The model as a flat dict of numpy arrays; `__meta__` holds the JSON structure."""
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "input_name": model.input_name, "output_name": model.output_name, "metadata": model.metadata,
        "input": {"qparams": _qparams_meta(model.input.qparams), "mantissa": model.input.mantissa,
                  "shift": model.input.shift, "shape": list(model.input.shape)},
        "layers": [_layer_meta(op, arrays) for op in model.layers],
    }
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8)  # UTF-8
    return arrays


def to_bytes(model: IntegerModel) -> bytes:
    """The model's compressed .npz file contents."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **to_arrays(model))
    return buffer.getvalue()


def save(model: IntegerModel, path: str | Path) -> int:
    """Write the model to `path` (.npz) atomically; returns the file size in bytes."""
    contents = to_bytes(model)
    with atomic_write(path, "wb") as handle:
        handle.write(contents)
    return len(contents)


# ---------------------------------------------------------------------------------------- reading

class _Invalid(Exception):
    """A rule broken inside the file; `load` adds the file name."""


class _Fields:
    """Typed access to one JSON object of the file; every error names `where` and the field."""

    def __init__(self, value, where: str):
        if not isinstance(value, dict):
            raise _Invalid(f"{where}: expected a JSON object, got {type(value).__name__}")
        self.value, self.where = value, where

    def get(self, key: str, kinds: tuple[type, ...], what: str):
        if key not in self.value:
            raise _Invalid(f"{self.where}: missing field {key!r}")
        value = self.value[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise _Invalid(f"{self.where}: field {key!r} must be {what}, got {_show(value)}")
        return value

    def text(self, key: str) -> str:
        return self.get(key, (str,), "a string")

    def flag(self, key: str) -> bool:
        return self.get(key, (bool,), "true or false")

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.get(key, (int,), "an integer")
        if not low <= value <= high:
            raise _Invalid(f"{self.where}: field {key!r} must be in [{low}, {high}], got {value}")
        return value

    def integers(self, key: str, count: int, low: int, high: int, optional: bool = False) -> tuple[int, ...] | None:
        if optional and self.value.get(key) is None:
            return None
        values = self.get(key, (list,), f"a list of {count} integers")
        if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _Invalid(f"{self.where}: field {key!r} must be a list of {count} integers, got {_show(values)}")
        if not all(low <= v <= high for v in values):
            raise _Invalid(f"{self.where}: field {key!r} must hold integers in [{low}, {high}], got {values}")
        return tuple(values)

    def optional_number(self, key: str) -> float | None:
        value = self.value.get(key)
        if value is None:
            return None
        return float(self.get(key, (int, float), "a number or null"))

    def qparams(self, key: str | None = None, value=None) -> QParams:
        fields = _Fields(self.value[key] if key else value, f"{self.where} {key or 'input_qparams'}")
        bits = fields.integer("bits", 2, 32)
        signed = fields.flag("signed")
        axis = fields.get("axis", (int, type(None)), "0 or null")
        scale, zero = fields.value.get("scale"), fields.value.get("zero_point")
        if axis is None:
            if not isinstance(scale, (int, float)) or isinstance(scale, bool):
                raise _Invalid(f"{fields.where}: field 'scale' must be a number, got {_show(scale)}")
            if not isinstance(zero, int) or isinstance(zero, bool):
                raise _Invalid(f"{fields.where}: field 'zero_point' must be an integer, got {_show(zero)}")
        elif axis != 0 or not _number_list(scale, float) or not _number_list(zero, int) or len(scale) != len(zero):
            raise _Invalid(f"{fields.where}: per-channel parameters need axis 0 and equally long lists of scales "
                           f"and integer zero points")
        elif not 1 <= len(scale) <= MAX_CHANNELS:
            raise _Invalid(f"{fields.where}: {len(scale)} channels (at most {MAX_CHANNELS})")
        zero_points = np.asarray(zero, dtype=object)
        if any(abs(int(z)) > 2**40 for z in np.ravel(zero_points)):
            raise _Invalid(f"{fields.where}: field 'zero_point' is far outside any integer type")
        try:
            scales = np.asarray(scale, np.float64)
        except OverflowError:
            raise _Invalid(f"{fields.where}: field 'scale' is beyond float64") from None
        return QParams(scales, zero_points.astype(np.int64), IntType(bits, signed), axis)


def _number_list(values, kind: type) -> bool:
    if not isinstance(values, list):
        return False
    allowed = (int, float) if kind is float else (int,)
    return all(isinstance(v, allowed) and not isinstance(v, bool) for v in values)


def _show(value) -> str:
    """A short, printable rendering of a value from the file (never its full text)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 256 or not value.isprintable():
        raise _Invalid(f"{where}: an op or tensor name must be 1-256 printable characters, got {_show(value)}")
    return value


def _read_meta(archive: zipfile.ZipFile) -> dict:
    info = _member(archive, "__meta__")
    if info is None:
        raise _Invalid("no __meta__ array: not an intq integer model")
    if info.file_size > MAX_META_BYTES + NPY_HEADER_BYTES:
        raise _Invalid(f"__meta__ is {info.file_size:,} bytes uncompressed (at most {MAX_META_BYTES:,})")
    raw = _read_array(archive, info, np.dtype(np.uint8), None)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _Invalid(f"__meta__ is not UTF-8 JSON ({err})") from None
    except RecursionError:
        raise _Invalid("__meta__ is JSON nested too deeply") from None
    fields = _Fields(meta, "__meta__")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise _Invalid(f"unsupported model format {_show(meta.get('format'))} v{_show(meta.get('version'))} "
                       f"(this intq reads {FORMAT} v{FORMAT_VERSION})")
    return fields.value


def _member(archive: zipfile.ZipFile, key: str) -> zipfile.ZipInfo | None:
    try:
        return archive.getinfo(f"{key}.npy")
    except KeyError:
        return None


def _read_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype, shape: tuple[int, ...] | None):
    """One .npy member, its size checked against the expected dtype and shape before decompressing,
    its dtype and shape checked after (an exact match: no casting, no broadcasting)."""
    key = info.filename[:-4]
    if shape is not None:
        expected = math.prod(shape) * dtype.itemsize
        if not expected <= info.file_size <= expected + NPY_HEADER_BYTES:
            raise _Invalid(f"array {key!r}: {info.file_size:,} bytes uncompressed, expected a {dtype} array of "
                           f"shape {shape} ({expected:,} bytes)")
    try:
        with archive.open(info) as handle:
            array = np.lib.format.read_array(handle, allow_pickle=False)
    except ValueError as err:  # a malformed .npy header, or an object array (pickle refused)
        raise _Invalid(f"array {key!r}: not a plain .npy array ({_show(str(err))[1:-1]})") from None
    if array.dtype != dtype or (shape is not None and array.shape != shape) or (shape is None and array.ndim != 1):
        raise _Invalid(f"array {key!r}: expected {dtype} of shape {shape or '(n,)'}, got {array.dtype} of shape "
                       f"{array.shape}")
    return array


class _Arrays:
    """The archive's arrays, each read once and only as the op that owns it expects."""

    def __init__(self, archive: zipfile.ZipFile):
        self.archive, self.claimed = archive, {"__meta__"}
        self.members = {info.filename: info for info in archive.infolist()}

    def read(self, key: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        if math.prod(shape) > MAX_ARRAY_VALUES:
            raise _Invalid(f"array {key!r}: {math.prod(shape):,} values (at most {MAX_ARRAY_VALUES:,})")
        info = self.members.get(f"{key}.npy")
        if info is None:
            raise _Invalid(f"missing array {key!r}")
        self.claimed.add(key)
        return _read_array(self.archive, info, np.dtype(dtype), shape)

    def check_all_claimed(self) -> None:
        """Every member belongs to an op: an unknown array is refused unread (never decompressed)."""
        for name in self.members:
            if not name.endswith(".npy") or name[:-4] not in self.claimed:
                raise _Invalid(f"unexpected array {_show(name)} (not a field of any op)")


def _multiplier_arrays(arrays: _Arrays, name: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    return arrays.read(f"{name}.mantissa", np.int32, (count,)), arrays.read(f"{name}.shift", np.int8, (count,)).astype(np.int32)


def _clamp_fields(fields: _Fields) -> tuple[QParams, bool, float | None]:
    return fields.qparams("output_qparams"), fields.flag("relu"), fields.optional_number("relu_max")


def _read_layer(fields: _Fields, name: str, inputs: tuple[str, ...], arrays: _Arrays) -> QLayer:
    kind = fields.text("kind")
    if kind not in LAYER_KINDS:
        raise _Invalid(f"{fields.where}: field 'kind' must be 'conv2d' or 'linear', got {_show(kind)}")
    ndim = 4 if LAYER_KINDS[kind] is QConv2d else 2
    shape = fields.integers("weight_shape", ndim, 1, MAX_CHANNELS if ndim == 2 else 1 << 16)
    weight_qp = fields.qparams("weight_qparams")
    bits = weight_qp.dtype.bits
    if not 2 <= bits <= 8:
        raise _Invalid(f"{fields.where}: weights of {bits} bits (intq stores 2..8)")
    packed = fields.flag("weight_packed")
    if packed != (field_bits(bits) != 8):
        raise _Invalid(f"{fields.where}: {bits}-bit weights are stored {'packed' if field_bits(bits) != 8 else 'unpacked'}")
    count = math.prod(shape)
    if count > MAX_ARRAY_VALUES:
        raise _Invalid(f"{fields.where}: {count:,} weights (at most {MAX_ARRAY_VALUES:,})")
    if packed:
        per_byte = 8 // field_bits(bits)
        weight = unpack_signed(arrays.read(f"{name}.weight", np.uint8, (-(-count // per_byte),)), bits, shape)
    else:
        weight = arrays.read(f"{name}.weight", np.int8, shape)
    channels = shape[0]
    bias = arrays.read(f"{name}.bias", np.int32, (channels,)) if fields.flag("has_bias") else None
    mantissa, shift = _multiplier_arrays(arrays, name, channels)
    geometry = {}
    if LAYER_KINDS[kind] is QConv2d:
        g = _Fields(fields.get("geometry", (dict,), "an object"), f"{fields.where} geometry")
        geometry = {"stride": list(g.integers("stride", 2, 1, 1 << 16)), "padding": list(g.integers("padding", 2, 0, 1 << 16)),
                    "dilation": list(g.integers("dilation", 2, 1, 1 << 16)), "groups": g.integer("groups", 1, MAX_CHANNELS)}
    input_qp = fields.qparams("input_qparams")
    output_qp, relu, relu_max = _clamp_fields(fields)
    layer = LAYER_KINDS[kind](name, inputs, weight, weight_qp, bias, input_qp, output_qp, mantissa, shift, relu,
                              geometry, 0, relu_max)
    if input_qp.axis is None and input_qp.dtype.bits <= 32:
        layer.accumulator_bound = accumulator_bound(weight, bias, input_qp)  # derived, never read from the file
    return layer


def _read_op(meta, index: int, arrays: _Arrays) -> IntegerOp:
    fields = _Fields(meta, f"op #{index}")
    name = _name(fields.value.get("name"), f"op #{index}")
    fields.where = f"op #{index} {name!r}"
    inputs = tuple(_name(value, fields.where) for value in fields.get("inputs", (list,), "a list of names"))
    kind = fields.text("type")
    if kind not in OP_TYPES:
        raise _Invalid(f"{fields.where}: unknown op type {_show(kind)} (known: {', '.join(OP_TYPES)})")
    if kind == "QLayer":
        return _read_layer(fields, name, inputs, arrays)
    if kind == "QMaxPool":
        return QMaxPool(name, inputs, fields.integers("kernel_size", 2, 1, 1 << 16), fields.integers("stride", 2, 1, 1 << 16),
                        fields.integers("padding", 2, 0, 1 << 16))
    if kind == "QFlatten":
        return QFlatten(name, inputs)
    if kind == "QReLU":
        return QReLU(name, inputs, fields.integer("zero_point", -(2**31), 2**31 - 1))
    listed = fields.get("input_qparams", (list,), "a list")
    qparams = [fields.qparams(value=value) for value in listed]
    if len(qparams) != (2 if kind == "QAdd" else 1):
        raise _Invalid(f"{fields.where}: {kind} takes {2 if kind == 'QAdd' else 1} input_qparams, got {len(qparams)}")
    mantissa, shift = _multiplier_arrays(arrays, name, 3 if kind == "QAdd" else 1)
    output_qp, relu, relu_max = _clamp_fields(fields)
    if kind == "QAdd":
        return QAdd(name, inputs, tuple(qparams), output_qp, mantissa, shift, relu, relu_max)
    return QAvgPool(name, inputs, fields.integers("kernel_size", 2, 1, 1 << 16, optional=True),
                    fields.integers("stride", 2, 1, 1 << 16, optional=True), qparams[0], output_qp, mantissa, shift,
                    relu, relu_max)


def _read_input(meta: _Fields) -> InputSpec:
    spec = _Fields(meta.get("input", (dict,), "an object"), "input")
    qparams = spec.qparams("qparams")
    folded = spec.value.get("mantissa") is None
    mantissa = None if folded else spec.integer("mantissa", 0, 2**31 - 1)
    shift = None if folded else spec.integer("shift", -64, 64)
    shape = spec.integers("shape", 3, 1, 1 << 14, optional=True) or (3, 32, 32)  # files before 0.1.1: the study's size
    return InputSpec(qparams, mantissa, shift, shape)


def _metadata(value: dict) -> dict:
    """Provenance (preset, model, seed, ...): at most 64 entries of short names and plain values."""
    if len(value) > 64:
        raise _Invalid(f"metadata has {len(value)} entries (at most 64)")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, (str, int, float, bool, type(None))) or isinstance(item, str) and len(item) > 1024:
            raise _Invalid(f"metadata entry {_show(key)}: a name of up to 64 characters and a number, boolean, null "
                           f"or string of up to 1024 characters, got {_show(item)}")
    return value


def _read_model(archive: zipfile.ZipFile) -> IntegerModel:
    meta = _Fields(_read_meta(archive), "__meta__")
    layers_meta = meta.get("layers", (list,), "a list of ops")
    if not 1 <= len(layers_meta) <= MAX_OPS:
        raise _Invalid(f"{len(layers_meta)} ops (a model has 1 to {MAX_OPS})")
    metadata = _metadata(meta.get("metadata", (dict,), "an object"))
    arrays = _Arrays(archive)
    layers, names = [], set()
    for index, op_meta in enumerate(layers_meta):
        name = op_meta.get("name") if isinstance(op_meta, dict) else None
        if isinstance(name, str) and name in names:  # before it could read the first op's arrays
            raise _Invalid(f"op #{index} {name!r}: its name is used twice")
        layers.append(_read_op(op_meta, index, arrays))
        names.add(layers[-1].name)
    arrays.check_all_claimed()
    return IntegerModel(_name(meta.value.get("input_name"), "input_name"), _read_input(meta), layers,
                        _name(meta.value.get("output_name"), "output_name"), metadata)


def load(path: str | Path) -> IntegerModel:
    """Read and check a model written by `save`, without pickle; ModelFileError (one line naming the
    file, the op and the rule) for anything that is not an admissible intq integer model."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            model = _read_model(archive)
        check_model(model)
    except (_Invalid, ModelCheckError) as err:
        raise ModelFileError(f"{path}: {err}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise ModelFileError(f"{path}: not a readable .npz archive ({_show(str(err))[1:-1]})") from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    return model
