"""The ONNX graph under construction and the integer arithmetic onnx_export writes into it: int64
casts, centring q - z, the fixed-point requantizer of eq. 9-10, the uint8 encoding (encoding.py) and
the engine's scale/zero-point constants and clamps."""
from __future__ import annotations

import numpy as np

from intq.arith.fixed_point import MANTISSA_BITS, MAX_RIGHT_SHIFT
from intq.arith.qparams import QParams
from intq.executors.encoding import encoded_zero_point, uint8_offset


class _Graph:
    """Nodes and initializers under construction; names are unique per intq op."""

    def __init__(self) -> None:
        self.nodes, self.initializers, self.outputs = [], [], set()

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attributes) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attributes))
        self.outputs.add(output)
        return output


def _int64_cast(graph: _Graph, name: str) -> str:
    """`name` as int64, cast once however many ops read it."""
    from onnx import TensorProto

    cast = f"{name}/int64"
    return cast if cast in graph.outputs else graph.node("Cast", [name], cast, to=TensorProto.INT64)


def _centred(graph: _Graph, value: str, encoded: bool, qparams: QParams, prefix: str) -> str:
    """q - z as int64, from a uint8-encoded value (minus z + o) or a raw int64 one (minus z)."""
    zero = encoded_zero_point(qparams) if encoded else int(qparams.zero_point)
    source = _int64_cast(graph, value) if encoded else value
    return graph.node("Sub", [source, graph.const(f"{prefix}/z", np.int64(zero))], f"{prefix}/centred")


def _fixed_point_product(graph: _Graph, acc: str, mantissa, shift, shape: tuple[int, ...], prefix: str) -> str:
    """round(acc M0 / 2^(31 + n)) in int64, half away from zero (eq. 9)."""
    mantissa = np.asarray(mantissa, np.int64).reshape(shape)
    total = np.clip(np.asarray(shift, np.int64).reshape(shape) + MANTISSA_BITS, 1, MAX_RIGHT_SHIFT)
    product = graph.node("Mul", [acc, graph.const(f"{prefix}/M0", mantissa)], f"{prefix}/product")
    magnitude = graph.node("Add", [graph.node("Abs", [product], f"{prefix}/abs"),
                                   graph.const(f"{prefix}/half", np.left_shift(np.int64(1), total - 1))], f"{prefix}/biased")
    quotient = graph.node("Div", [magnitude, graph.const(f"{prefix}/divisor", np.left_shift(np.int64(1), total))],
                          f"{prefix}/quotient")
    return graph.node("Mul", [graph.node("Sign", [product], f"{prefix}/sign"), quotient], f"{prefix}/rounded")


def _requantized(graph: _Graph, acc: str, mantissa, shift, qparams: QParams, bounds: tuple[int, int],
                 shape: tuple[int, ...], prefix: str) -> tuple[str, bool]:
    """clamp(z + round(acc M0 / 2^(31 + n)), lower, upper) in int64 (eq. 9-10), then uint8-encoded
    for a type of <= 8 bits or left int64; returns (name, encoded)."""
    rounded = _fixed_point_product(graph, acc, mantissa, shift, shape, prefix)
    shifted = graph.node("Add", [rounded, graph.const(f"{prefix}/zy", np.int64(qparams.zero_point))], f"{prefix}/shifted")
    clamped = graph.node("Clip", [shifted, graph.const(f"{prefix}/lower", np.int64(bounds[0])),
                                  graph.const(f"{prefix}/upper", np.int64(bounds[1]))], f"{prefix}/clamped")
    return _encoded(graph, clamped, qparams, prefix)


def _encoded(graph: _Graph, clamped: str, qparams: QParams, prefix: str, dtype=np.int64) -> tuple[str, bool]:
    """Clamped integers held in `dtype` (int64 or float64) as uint8 q + o for a type of <= 8 bits,
    else as int64; returns (name, encoded)."""
    from onnx import TensorProto

    if qparams.dtype.bits > 8:
        if dtype == np.int64:
            return clamped, False
        return graph.node("Cast", [clamped], f"{prefix}/int64", to=TensorProto.INT64), False
    offset = graph.const(f"{prefix}/offset", np.array(uint8_offset(qparams), dtype))
    return graph.node("Cast", [graph.node("Add", [clamped, offset], f"{prefix}/encoded")], f"{prefix}/uint8", to=TensorProto.UINT8), True


def _encoded_table(table: np.ndarray, qparams: QParams) -> tuple[np.ndarray, bool]:
    """A table of integers of type `qparams` as a Gather reads it: uint8 q + o for a type of <= 8 bits
    (encoding.py), else int64; returns (values, encoded)."""
    if qparams.dtype.bits <= 8:
        return (np.asarray(table, np.int64) + uint8_offset(qparams)).astype(np.uint8), True
    return np.asarray(table, np.int64), False


def _scale(graph: _Graph, name: str, qparams: QParams) -> list[str]:
    """[scale (float32), zero point (uint8)] of a uint8-encoded value."""
    return [graph.const(f"{name}/scale", np.float32(qparams.scale)),
            graph.const(f"{name}/zero_point", np.uint8(encoded_zero_point(qparams)))]


def _clip(graph: _Graph, value: str, bounds: tuple[int, int] | None, prefix: str) -> str:
    if bounds is None:
        return value
    return graph.node("Clip", [value, graph.const(f"{prefix}/clip_lower", np.uint8(bounds[0])),
                               graph.const(f"{prefix}/clip_upper", np.uint8(bounds[1]))], f"{prefix}/clipped")
