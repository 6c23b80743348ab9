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

from intq import __version__
from intq.arith.fixed_point import quantize_multiplier
from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing, PreprocessingError
from intq.files import atomic_write
from intq.graph.integer_model import (InputSpec, IntegerModel, IntegerOp, QAdd, QAvgPool, QChannelGather, QConcat,
                                      QConv2d, QFlatten, QLayer, QLinear, QLookup, QMaxPool, QMul, QReLU,
                                      accumulator_bound)
from intq.graph.archive import (MAX_ARRAY_VALUES, MAX_CHANNELS, NPY_HEADER_BYTES, ArchiveArrays, Fields, Invalid,
                                checked_name, member, number_list, read_array, show)
from intq.graph.model_check import MAX_OPS, ModelCheckError, check_model
from intq.arith.packing import field_bits, pack_signed, unpack_signed
from intq.arith.qparams import QParams

FORMAT = "intq.IntegerModel"
FORMAT_VERSION = 3  # 3: the input's preprocessing (mean, std) and the intq version; 2 still loads
READABLE_VERSIONS = (2, 3)
MAX_META_BYTES = 16 << 20  # JSON of a 10,000-op model with per-channel parameters is a few MB
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


def _requantizing_fields(op, arrays: dict) -> dict:
    arrays[f"{op.name}.mantissa"] = op.mantissa.astype(np.int32)
    arrays[f"{op.name}.shift"] = op.shift.astype(np.int8)  # n in [-30, 31] (fixed_point.py)
    return {"relu": op.relu, "relu_max": op.relu_max, "output_qparams": _qparams_meta(op.output_qparams)}


def _layer_fields(op: QLayer, arrays: dict) -> dict:
    meta = _requantizing_fields(op, arrays)
    if op.bias is not None:
        arrays[f"{op.name}.bias"] = op.bias.astype(np.int32)
    meta.update(kind=op.LABEL, geometry=op.geometry, has_bias=op.bias is not None, **_store_weight(op, arrays),
                weight_qparams=_qparams_meta(op.weight_qparams), input_qparams=_qparams_meta(op.input_qparams))
    return meta


def _add_fields(op: QAdd | QConcat | QMul, arrays: dict) -> dict:
    return {**_requantizing_fields(op, arrays), "input_qparams": [_qparams_meta(qp) for qp in op.input_qparams]}


def _avg_pool_fields(op: QAvgPool, arrays: dict) -> dict:
    return {**_requantizing_fields(op, arrays), "input_qparams": [_qparams_meta(op.input_qparams)],
            "kernel_size": op.kernel_size, "stride": op.stride}


def _max_pool_fields(op: QMaxPool) -> dict:
    """ceil_mode is written only when true: a file without it (every file before it existed) means floor."""
    return {"kernel_size": op.kernel_size, "stride": op.stride, "padding": op.padding,
            **({"ceil_mode": True} if op.ceil_mode else {})}


def _lookup_fields(op: QLookup, arrays: dict) -> dict:
    """kind, params and both QParams: the table is derived from them (eq. 29), never written."""
    return {"kind": op.kind, "params": dict(op.params), "input_qparams": _qparams_meta(op.input_qparams),
            "output_qparams": _qparams_meta(op.output_qparams)}


def _gather_fields(op: QChannelGather, arrays: dict) -> dict:
    """The count in the JSON, the indices as the int32 array <name>.indices."""
    arrays[f"{op.name}.indices"] = np.asarray(op.indices, np.int32)
    return {"channels": len(op.indices)}


# How each op class is written: (the file's type tag, its fields; arrays go into `arrays`).
WRITERS = {
    QConv2d: ("QLayer", _layer_fields),
    QLinear: ("QLayer", _layer_fields),
    QAdd: ("QAdd", _add_fields),
    QConcat: ("QConcat", _add_fields),  # mantissa/shift: one per input
    QMul: ("QMul", _add_fields),  # mantissa/shift: (1,)
    QAvgPool: ("QAvgPool", _avg_pool_fields),
    QMaxPool: ("QMaxPool", lambda op, arrays: _max_pool_fields(op)),
    QFlatten: ("QFlatten", lambda op, arrays: {}),
    QReLU: ("QReLU", lambda op, arrays: {"zero_point": op.zero_point}),
    QLookup: ("QLookup", _lookup_fields),
    QChannelGather: ("QChannelGather", _gather_fields),
}


def _layer_meta(op: IntegerOp, arrays: dict) -> dict:
    tag, fields = WRITERS[type(op)]
    return {"name": op.name, "inputs": list(op.inputs), "type": tag, **fields(op, arrays)}


def to_arrays(model: IntegerModel) -> dict[str, np.ndarray]:
    """The model as a flat dict of numpy arrays; `__meta__` holds the JSON structure."""
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "intq_version": __version__,
        "input_name": model.input_name, "output_name": model.output_name, "metadata": model.metadata,
        "input": {"qparams": _qparams_meta(model.input.qparams), "shape": list(model.input.shape),
                  "mean": list(model.input.preprocessing.mean), "std": list(model.input.preprocessing.std)},
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

def _read_meta(archive: zipfile.ZipFile) -> dict:
    info = member(archive, "__meta__")
    if info is None:
        raise Invalid("no __meta__ array: not an intq integer model")
    if info.file_size > MAX_META_BYTES + NPY_HEADER_BYTES:
        raise Invalid(f"__meta__ is {info.file_size:,} bytes uncompressed (at most {MAX_META_BYTES:,})")
    raw = read_array(archive, info, np.dtype(np.uint8), None)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise Invalid(f"__meta__ is not UTF-8 JSON ({err})") from None
    except RecursionError:
        raise Invalid("__meta__ is JSON nested too deeply") from None
    fields = Fields(meta, "__meta__")
    version = meta.get("version")
    if meta.get("format") != FORMAT or type(version) is not int or version not in READABLE_VERSIONS:
        raise Invalid(f"unsupported model format {show(meta.get('format'))} v{show(version)} "
                       f"(this intq reads {FORMAT} v{' and v'.join(map(str, READABLE_VERSIONS))})")
    return fields.value


def _multiplier_arrays(arrays: ArchiveArrays, name: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    return arrays.read(f"{name}.mantissa", np.int32, (count,)), arrays.read(f"{name}.shift", np.int8, (count,)).astype(np.int32)


def _clamp_fields(fields: Fields) -> tuple[QParams, bool, float | None]:
    return fields.qparams("output_qparams"), fields.flag("relu"), fields.optional_number("relu_max")


def _read_layer(fields: Fields, name: str, inputs: tuple[str, ...], arrays: ArchiveArrays) -> QLayer:
    kind = fields.text("kind")
    if kind not in LAYER_KINDS:
        raise Invalid(f"{fields.where}: field 'kind' must be 'conv2d' or 'linear', got {show(kind)}")
    ndim = 4 if LAYER_KINDS[kind] is QConv2d else 2
    shape = fields.integers("weight_shape", ndim, 1, MAX_CHANNELS if ndim == 2 else 1 << 16)
    weight_qp = fields.qparams("weight_qparams")
    bits = weight_qp.dtype.bits
    if not 2 <= bits <= 8:
        raise Invalid(f"{fields.where}: weights of {bits} bits (intq stores 2..8)")
    packed = fields.flag("weight_packed")
    if packed != (field_bits(bits) != 8):
        raise Invalid(f"{fields.where}: {bits}-bit weights are stored {'packed' if field_bits(bits) != 8 else 'unpacked'}")
    count = math.prod(shape)
    if count > MAX_ARRAY_VALUES:
        raise Invalid(f"{fields.where}: {count:,} weights (at most {MAX_ARRAY_VALUES:,})")
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
        g = Fields(fields.get("geometry", (dict,), "an object"), f"{fields.where} geometry")
        geometry = {"stride": list(g.integers("stride", 2, 1, 1 << 16)), "padding": list(g.integers("padding", 2, 0, 1 << 16)),
                    "dilation": list(g.integers("dilation", 2, 1, 1 << 16)), "groups": g.integer("groups", 1, MAX_CHANNELS)}
    input_qp = fields.qparams("input_qparams")
    output_qp, relu, relu_max = _clamp_fields(fields)
    layer = LAYER_KINDS[kind](name, inputs, weight, weight_qp, bias, input_qp, output_qp, mantissa, shift, relu,
                              geometry, 0, relu_max)
    if input_qp.axis is None:  # per-channel input parameters are refused by model_check
        layer.accumulator_bound = accumulator_bound(weight, bias, input_qp)  # derived, never read from the file
    return layer


def _listed_qparams(fields: Fields, count: int) -> list[QParams]:
    qparams = [fields.qparams(value=value) for value in fields.get("input_qparams", (list,), "a list")]
    if len(qparams) != count:
        raise Invalid(f"{fields.where}: takes {count} input_qparams, got {len(qparams)}")
    return qparams


def _joined_reader(op_class, operands: int | None, multipliers: int | None):
    """The reader of an op over several inputs (QAdd, QConcat, QMul): a list of input_qparams and the
    (mantissa, shift) arrays, `operands` and `multipliers` long (None: one per listed input; check_model
    refuses fewer than two inputs), then output_qparams, relu and relu_max."""
    def read(fields: Fields, name: str, inputs: tuple[str, ...], arrays: ArchiveArrays):
        qparams = _listed_qparams(fields, len(inputs) if operands is None else operands)
        mantissa, shift = _multiplier_arrays(arrays, name, len(inputs) if multipliers is None else multipliers)
        output_qp, relu, relu_max = _clamp_fields(fields)
        return op_class(name, inputs, tuple(qparams), output_qp, mantissa, shift, relu, relu_max)
    return read


def _read_avg_pool(fields: Fields, name: str, inputs: tuple[str, ...], arrays: ArchiveArrays) -> QAvgPool:
    (qparams,) = _listed_qparams(fields, 1)
    mantissa, shift = _multiplier_arrays(arrays, name, 1)
    output_qp, relu, relu_max = _clamp_fields(fields)
    return QAvgPool(name, inputs, fields.integers("kernel_size", 2, 1, 1 << 16, optional=True),
                    fields.integers("stride", 2, 1, 1 << 16, optional=True), qparams, output_qp, mantissa, shift,
                    relu, relu_max)


def _read_max_pool(fields: Fields, name: str, inputs: tuple[str, ...], arrays: ArchiveArrays) -> QMaxPool:
    return QMaxPool(name, inputs, fields.integers("kernel_size", 2, 1, 1 << 16), fields.integers("stride", 2, 1, 1 << 16),
                    fields.integers("padding", 2, 0, 1 << 16),
                    fields.flag("ceil_mode") if "ceil_mode" in fields.value else False)


def _read_lookup(fields: Fields, name: str, inputs: tuple[str, ...], arrays: ArchiveArrays) -> QLookup:
    """A lookup's kind, params (an object of numbers) and QParams; check_model refuses an unknown kind,
    parameters out of range and an input wider than 8 bits, and derives the table."""
    params = fields.get("params", (dict,), "an object of numbers")
    if len(params) > 4 or not number_list(list(params.values()), float):
        raise Invalid(f"{fields.where}: field 'params' must be an object of at most 4 numbers, got {show(params)}")
    return QLookup(name, inputs, fields.text("kind"), params, fields.qparams("input_qparams"),
                   fields.qparams("output_qparams"))


def _read_channel_gather(fields: Fields, name: str, inputs: tuple[str, ...], arrays: ArchiveArrays) -> QChannelGather:
    """`channels` indices in [0, MAX_CHANNELS); check_model compares each with its input's channels."""
    indices = arrays.read(f"{name}.indices", np.int32, (fields.integer("channels", 1, MAX_CHANNELS),))
    if not ((indices >= 0) & (indices < MAX_CHANNELS)).all():
        bad = int(indices[(indices < 0) | (indices >= MAX_CHANNELS)][0])
        raise Invalid(f"{fields.where}: array 'indices' holds {bad}, not a channel index in [0, {MAX_CHANNELS})")
    return QChannelGather(name, inputs, tuple(int(i) for i in indices))


# How each type tag of the file is read (WRITERS' counterpart): (fields, name, inputs, arrays) -> op.
READERS = {
    "QLayer": _read_layer,
    "QAdd": _joined_reader(QAdd, 2, 3),  # M_a, M_b, M_y (eq. 17)
    "QConcat": _joined_reader(QConcat, None, None),  # one M_i per input (eq. 30)
    "QMul": _joined_reader(QMul, 2, 1),  # M = s_a s_b / s_y (eq. 34)
    "QAvgPool": _read_avg_pool,
    "QMaxPool": _read_max_pool,
    "QFlatten": lambda fields, name, inputs, arrays: QFlatten(name, inputs),
    "QReLU": lambda fields, name, inputs, arrays: QReLU(name, inputs, fields.integer("zero_point", -(2**31), 2**31 - 1)),
    "QLookup": _read_lookup,
    "QChannelGather": _read_channel_gather,
}


def _read_op(meta, index: int, arrays: ArchiveArrays) -> IntegerOp:
    fields = Fields(meta, f"op #{index}")
    name = checked_name(fields.value.get("name"), f"op #{index}")
    fields.where = f"op #{index} {name!r}"
    inputs = tuple(checked_name(value, fields.where) for value in fields.get("inputs", (list,), "a list of names"))
    kind = fields.text("type")
    if kind not in READERS:
        raise Invalid(f"{fields.where}: unknown op type {show(kind)} (known: {', '.join(READERS)})")
    return READERS[kind](fields, name, inputs, arrays)


def _read_input(meta: Fields) -> InputSpec:
    """Version 3: qparams, shape, mean and std. Version 2 (before the preprocessing was recorded) held the
    study's normalisation on 3 channels, and a (mantissa, shift) for a requantized input, compared here
    with the ones derived from the QParams (eq. 27)."""
    spec = Fields(meta.get("input", (dict,), "an object"), "input")
    qparams = spec.qparams("qparams")
    if meta.value["version"] == 2:
        return _read_v2_input(spec, qparams)
    shape = spec.integers("shape", 3, 1, 1 << 14)
    mean, std = (spec.get(key, (list,), "a list of numbers") for key in ("mean", "std"))
    if not (number_list(mean, float) and number_list(std, float)) or len(mean) != shape[0] or len(std) != shape[0]:
        raise Invalid(f"input: mean and std must be lists of {shape[0]} numbers (one per channel), got "
                      f"{show(mean)} and {show(std)}")
    try:
        return InputSpec(qparams, shape, Preprocessing(tuple(mean), tuple(std)))
    except PreprocessingError as err:
        raise Invalid(f"input: {err}") from None


def _read_v2_input(spec: Fields, qparams: QParams) -> InputSpec:
    shape = spec.integers("shape", 3, 1, 1 << 14, optional=True) or (3, 32, 32)  # files before 0.1.1: the study's size
    try:
        model_input = InputSpec(qparams, shape, STUDY_PREPROCESSING)
    except PreprocessingError as err:
        raise Invalid(f"input: {err}") from None
    if spec.value.get("mantissa") is None:
        if not model_input.folded:
            raise Invalid("input: a folded v2 input has scale 1/255, zero point 0 and type int9 (x = 2p - 255)")
        return model_input
    stored = (spec.integer("mantissa", 0, 2**31 - 1), spec.integer("shift", -64, 64))
    derived = quantize_multiplier(float(STUDY_PREPROCESSING.exact_form(shape[0])[0].scale) / float(qparams.scale))
    if stored != derived:
        raise Invalid(f"input: mantissa and shift {stored} are not the input multiplier {derived} of its scale")
    return model_input


def _metadata(value: dict) -> dict:
    """Provenance (preset, model, seed, ...): at most 64 entries of short names and plain values."""
    if len(value) > 64:
        raise Invalid(f"metadata has {len(value)} entries (at most 64)")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, (str, int, float, bool, type(None))) or isinstance(item, str) and len(item) > 1024:
            raise Invalid(f"metadata entry {show(key)}: a name of up to 64 characters and a number, boolean, null "
                           f"or string of up to 1024 characters, got {show(item)}")
    return value


def _read_model(archive: zipfile.ZipFile) -> IntegerModel:
    meta = Fields(_read_meta(archive), "__meta__")
    layers_meta = meta.get("layers", (list,), "a list of ops")
    if not 1 <= len(layers_meta) <= MAX_OPS:
        raise Invalid(f"{len(layers_meta)} ops (a model has 1 to {MAX_OPS})")
    metadata = _metadata(meta.get("metadata", (dict,), "an object"))
    arrays = ArchiveArrays(archive)
    layers, names = [], set()
    for index, op_meta in enumerate(layers_meta):
        name = op_meta.get("name") if isinstance(op_meta, dict) else None
        if isinstance(name, str) and name in names:  # before it could read the first op's arrays
            raise Invalid(f"op #{index} {name!r}: its name is used twice")
        layers.append(_read_op(op_meta, index, arrays))
        names.add(layers[-1].name)
    arrays.check_all_claimed()
    return IntegerModel(checked_name(meta.value.get("input_name"), "input_name"), _read_input(meta), layers,
                        checked_name(meta.value.get("output_name"), "output_name"), metadata)


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
    except (Invalid, ModelCheckError) as err:
        raise ModelFileError(f"{path}: {err}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise ModelFileError(f"{path}: not a readable .npz archive ({show(str(err))[1:-1]})") from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    return model
