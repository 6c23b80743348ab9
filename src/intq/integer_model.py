"""The IntegerModel: everything integer-only inference needs, as plain arrays and JSON.

Saved as one compressed `.npz` that `numpy.load(allow_pickle=False)` reads: integer arrays under
`<layer>.<field>` keys (weights int8, or uint8 with 2-4-bit weights packed; biases and
mantissas int32, shifts int8) and the rest, scales and zero points included, as a JSON string under
`__meta__` (UTF-8 bytes; a float64 scale round-trips exactly through JSON; few archive members
keep the file small).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from intq.files import atomic_write
from intq.packing import field_bits, pack_signed, unpack_signed
from intq.qparams import IntType, QParams

FORMAT_VERSION = 2


@dataclass(eq=False)
class InputSpec:
    """How uint8 pixels p become the integers the first layer reads.

    The study's normalisation (p/255 - 0.5)/0.5 is exactly x = (2p - 255) / 255, so the integer
    x = 2p - 255 with scale 1/255 is lossless (docs/math.md eq. 14). With `mantissa` None the first
    layer reads x itself ("pixels": normalisation folded into the first layer); otherwise x is
    requantized to `qparams` with (mantissa, shift) like any layer output ("quantized").
    """

    qparams: QParams
    mantissa: int | None = None
    shift: int | None = None

    @property
    def folded(self) -> bool:
        return self.mantissa is None


class Clamped:
    """The integer clamp of an op with `output_qparams`, `relu` and `relu_max` (eq. 10)."""

    def bounds(self) -> tuple[int, int]:
        return output_bounds(self.output_qparams, self.relu, self.relu_max)


@dataclass(eq=False)
class QLayer(Clamped):
    """Conv2d or Linear: acc = sum q_w (q_x - z_x) + q_b; q_y = clamp(z_y + round(M acc)) (eq. 10)."""

    name: str
    kind: str  # "conv2d" | "linear": the serialised tag, not a behaviour switch inside the math
    inputs: tuple[str, ...]
    weight: np.ndarray
    weight_qparams: QParams
    bias: np.ndarray | None
    input_qparams: QParams
    output_qparams: QParams
    mantissa: np.ndarray
    shift: np.ndarray
    relu: bool
    geometry: dict = field(default_factory=dict)  # stride, padding, dilation, groups
    accumulator_bound: int = 0  # worst-case |acc| (eq. 11), proven < 2^31 at conversion
    relu_max: float | None = None  # ReLU6-style upper clamp in real units


def output_bounds(qparams: QParams, relu: bool, relu_max: float | None = None) -> tuple[int, int]:
    """Integer clamp of a requantized output (eq. 10): [qmin, qmax]; a fused ReLU raises the lower
    bound to z (real 0); a ReLU6-style clamp lowers the upper bound to z + round(max / s)."""
    zero, lower, upper = int(qparams.zero_point), qparams.dtype.qmin, qparams.dtype.qmax
    if relu:
        lower = max(zero, lower)
    if relu_max is not None:
        upper = min(upper, zero + int(np.floor(relu_max / float(qparams.scale) + 0.5)))
    return lower, upper


@dataclass(eq=False)
class QAdd(Clamped):
    """y = a + b: each operand rescaled to a common fine scale s_i = max(s_a, s_b) / 2^20 with its
    own fixed-point multiplier, summed exactly, then requantized to (s_y, z_y) (eq. 17)."""

    name: str
    inputs: tuple[str, ...]
    input_qparams: tuple[QParams, QParams]
    output_qparams: QParams
    mantissa: np.ndarray  # (3,): operand a, operand b, output
    shift: np.ndarray
    relu: bool = False
    relu_max: float | None = None


@dataclass(eq=False)
class QAvgPool(Clamped):
    """Average pool: acc = sum over the window of (q - z_x), q_y = z_y + round(acc s_x / (N s_y)) (eq. 18);
    kernel_size None pools the whole feature map."""

    name: str
    inputs: tuple[str, ...]
    kernel_size: tuple[int, int] | None
    stride: tuple[int, int] | None
    input_qparams: QParams
    output_qparams: QParams
    mantissa: np.ndarray  # (1,)
    shift: np.ndarray
    relu: bool = False
    relu_max: float | None = None


@dataclass(eq=False)
class QMaxPool:
    name: str
    inputs: tuple[str, ...]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(eq=False)
class QFlatten:
    name: str
    inputs: tuple[str, ...]


@dataclass(eq=False)
class QReLU:
    """A ReLU that could not be fused: clamp(q, z, qmax) on its input's own qparams."""

    name: str
    inputs: tuple[str, ...]
    zero_point: int


IntegerOp = QLayer | QMaxPool | QFlatten | QReLU | QAdd | QAvgPool


@dataclass(eq=False)
class IntegerModel:
    input_name: str
    input: InputSpec
    layers: list[IntegerOp]
    output_name: str
    metadata: dict = field(default_factory=dict)

    def layer(self, name: str) -> IntegerOp:
        return next(op for op in self.layers if op.name == name)

    def quantized_layers(self) -> list[QLayer]:
        return [op for op in self.layers if isinstance(op, QLayer)]

    def output_qparams(self) -> QParams:
        """QParams of the model output (the last QLayer's output)."""
        return self.quantized_layers()[-1].output_qparams


def _qparams_meta(qp: QParams) -> dict:
    """QParams as JSON: float64 scales round-trip exactly through Python's float repr."""
    return {"bits": qp.dtype.bits, "signed": qp.dtype.signed, "axis": qp.axis,
            "scale": np.asarray(qp.scale, np.float64).tolist(), "zero_point": np.asarray(qp.zero_point).tolist()}


def _qparams_from(meta: dict) -> QParams:
    return QParams(np.asarray(meta["scale"], np.float64), np.asarray(meta["zero_point"], np.int64),
                   IntType(meta["bits"], meta["signed"]), meta["axis"])


def _store_weight(layer: "QLayer", arrays: dict) -> dict:
    """int8 weights as they are; 2- to 4-bit weights packed into uint8 (packing.py)."""
    bits = layer.weight_qparams.dtype.bits
    if field_bits(bits) == 8:
        arrays[f"{layer.name}.weight"] = layer.weight.astype(np.int8)
        return {"weight_shape": list(layer.weight.shape), "weight_packed": False}
    arrays[f"{layer.name}.weight"] = pack_signed(layer.weight, bits)
    return {"weight_shape": list(layer.weight.shape), "weight_packed": True}


def _load_weight(meta: dict, arrays) -> np.ndarray:
    stored = arrays[f"{meta['name']}.weight"]
    if not meta["weight_packed"]:
        return stored
    return unpack_signed(stored, meta["weight_qparams"]["bits"], tuple(meta["weight_shape"]))


def _layer_meta(op: IntegerOp, arrays: dict) -> dict:
    meta = {"name": op.name, "inputs": list(op.inputs), "type": type(op).__name__}
    if isinstance(op, QLayer):
        arrays[f"{op.name}.mantissa"] = op.mantissa.astype(np.int32)
        arrays[f"{op.name}.shift"] = op.shift.astype(np.int8)  # n in [-30, 31] (fixed_point.py)
        if op.bias is not None:
            arrays[f"{op.name}.bias"] = op.bias.astype(np.int32)
        meta.update(kind=op.kind, relu=op.relu, relu_max=op.relu_max, geometry=op.geometry, has_bias=op.bias is not None,
                    accumulator_bound=int(op.accumulator_bound), **_store_weight(op, arrays),
                    weight_qparams=_qparams_meta(op.weight_qparams),
                    input_qparams=_qparams_meta(op.input_qparams),
                    output_qparams=_qparams_meta(op.output_qparams))
    elif isinstance(op, (QAdd, QAvgPool)):
        arrays[f"{op.name}.mantissa"] = op.mantissa.astype(np.int32)
        arrays[f"{op.name}.shift"] = op.shift.astype(np.int8)
        inputs = op.input_qparams if isinstance(op, QAdd) else (op.input_qparams,)
        meta.update(relu=op.relu, relu_max=op.relu_max, output_qparams=_qparams_meta(op.output_qparams),
                    input_qparams=[_qparams_meta(qp) for qp in inputs])
        if isinstance(op, QAvgPool):
            meta.update(kernel_size=op.kernel_size, stride=op.stride)
    elif isinstance(op, QMaxPool):
        meta.update(kernel_size=op.kernel_size, stride=op.stride, padding=op.padding)
    elif isinstance(op, QReLU):
        meta.update(zero_point=op.zero_point)
    return meta


def _layer_from(meta: dict, arrays) -> IntegerOp:
    name, inputs = meta["name"], tuple(meta["inputs"])
    if meta["type"] == "QMaxPool":
        return QMaxPool(name, inputs, tuple(meta["kernel_size"]), tuple(meta["stride"]), tuple(meta["padding"]))
    if meta["type"] == "QFlatten":
        return QFlatten(name, inputs)
    if meta["type"] == "QReLU":
        return QReLU(name, inputs, meta["zero_point"])
    if meta["type"] in ("QAdd", "QAvgPool"):
        qparams = [_qparams_from(qp) for qp in meta["input_qparams"]]
        common = (_qparams_from(meta["output_qparams"]), arrays[f"{name}.mantissa"],
                  arrays[f"{name}.shift"].astype(np.int32), meta["relu"], meta["relu_max"])
        if meta["type"] == "QAdd":
            return QAdd(name, inputs, tuple(qparams), *common)
        kernel, stride = meta["kernel_size"], meta["stride"]
        return QAvgPool(name, inputs, tuple(kernel) if kernel else None, tuple(stride) if stride else None,
                        qparams[0], *common)
    return QLayer(
        name, meta["kind"], inputs, _load_weight(meta, arrays), _qparams_from(meta["weight_qparams"]),
        arrays[f"{name}.bias"] if meta["has_bias"] else None,
        _qparams_from(meta["input_qparams"]), _qparams_from(meta["output_qparams"]),
        arrays[f"{name}.mantissa"], arrays[f"{name}.shift"].astype(np.int32), meta["relu"], meta["geometry"],
        meta["accumulator_bound"], meta.get("relu_max"))


def to_arrays(model: IntegerModel) -> dict[str, np.ndarray]:
    """The model as a flat dict of numpy arrays; `__meta__` holds the JSON structure."""
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "format": "intq.IntegerModel", "version": FORMAT_VERSION,
        "input_name": model.input_name, "output_name": model.output_name, "metadata": model.metadata,
        "input": {"qparams": _qparams_meta(model.input.qparams),
                  "mantissa": model.input.mantissa, "shift": model.input.shift},
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


class ModelFileError(Exception):
    """An .npz that is not a readable intq IntegerModel (names the file)."""


def load(path: str | Path) -> IntegerModel:
    """Read a model written by `save`, without pickle."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        meta = json.loads(arrays["__meta__"].tobytes().decode())
    except (OSError, ValueError, KeyError) as err:
        raise ModelFileError(f"{path}: not an intq integer model ({err})") from None
    if meta.get("format") != "intq.IntegerModel" or meta.get("version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: unsupported model format {meta.get('format')} v{meta.get('version')}")
    spec = meta["input"]
    input_spec = InputSpec(_qparams_from(spec["qparams"]), spec["mantissa"], spec["shift"])
    layers = [_layer_from(m, arrays) for m in meta["layers"]]
    return IntegerModel(meta["input_name"], input_spec, layers, meta["output_name"], meta["metadata"])
