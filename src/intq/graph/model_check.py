"""The rules every IntegerModel must satisfy before any executor or code generator touches it.

An integer model read from a file is input from someone else: its fields are claims. check_model
admits a model only when each claim is either derived here (the accumulator bound, each op's input
parameters, the fixed-point multipliers) and found equal, or inside the range that the arithmetic
of the executors is proven for (docs/math.md eq. 8-11, 17, 18; docs/format.md lists every rule):

- structure: unique printable names; each input an earlier op or the model input; 2 inputs for an
  add or a product, two or more for a concatenation, 1 otherwise; the output one of the ops;
- types: weights signed 2..8 bits with zero point 0; activations 2..16 bits, lookup inputs at most 8;
  zero points inside their type; scales finite and positive;
- consistency: an op's input parameters are those of the op that produced the input; every
  (mantissa, shift) is exactly quantize_multiplier of the real multiplier its scales define, so
  mantissas lie in [2^30, 2^31) or are 0 (with shift 0) and 31 + n lies in [1, 62]; a lookup's
  table is computed here from its known kind, its parameters and its QParams (eq. 29), never read;
- shapes: inferred from the input shape op by op (channels, kernels, strides, groups, features);
- overflow: the worst accumulator, recomputed from the weights, the bias and the input type, is at
  most 2^31 - 1 (eq. 11), and equals the one the layer carries (the reference picks its exact float
  dtype from it); a product's worst |(q_a - z_a)(q_b - z_b)|, from both types, is too (eq. 34).

The first broken rule raises ModelCheckError naming the op and the rule.
"""
from __future__ import annotations

import math

import numpy as np

from intq.arith.fixed_point import quantize_multipliers
from intq.arith.lookup import MAX_LOOKUP_INPUT_BITS, lookup_problem
from intq.graph.archive import MAX_CHANNELS
from intq.graph.integer_model import (INT32_LIMIT, IntegerModel, IntegerOp, QAdd, QAvgPool, QChannelGather, QConcat,
                                      QConv2d, QFlatten, QLayer, QLinear, QLookup, QMaxPool, QMul, QReLU,
                                      accumulator_bound, add_multipliers, avg_pool_multiplier, concat_multipliers,
                                      layer_multipliers, mul_multiplier, pool_output_size, product_bound)
from intq.arith.qparams import QParams

MAX_OPS = 10_000
MAX_TENSOR_VALUES = 1 << 28  # one image's tensor between ops
MAX_ADD_OPERAND_BITS = 9  # eq. 17's int64 budget assumes |q - z| <= 2^9


class ModelCheckError(Exception):
    """A broken rule: names the op (or the model input) and the rule."""


def _fail(where: str, rule: str) -> ModelCheckError:
    return ModelCheckError(f"{where}: {rule}")


def check_scale(qp: QParams, where: str) -> None:
    """Scales finite and positive, one per channel or one per tensor."""
    scale = np.asarray(qp.scale, np.float64)
    if scale.size == 0 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise _fail(where, f"scales must be finite and positive, got {_values(scale)}")
    if np.any(scale < 1e-30) or np.any(scale > 1e30):
        raise _fail(where, f"scales must lie in [1e-30, 1e30], got {_values(scale)}")


def check_activation_type(qp: QParams, where: str) -> None:
    """An activation: per tensor, 2..16 bits, its zero point inside the type."""
    check_scale(qp, where)
    bits = qp.dtype.bits
    if qp.axis is not None or np.ndim(qp.scale) != 0:
        raise _fail(where, "activation parameters must be per tensor")
    if not 2 <= bits <= 16:
        raise _fail(where, f"activation type {qp.dtype.name} (intq runs 2..16-bit activations)")
    if not qp.dtype.qmin <= int(qp.zero_point) <= qp.dtype.qmax:
        raise _fail(where, f"zero point {int(qp.zero_point)} outside {qp.dtype.name} [{qp.dtype.qmin}, {qp.dtype.qmax}]")


def check_weight_type(qp: QParams, channels: int, where: str) -> None:
    """Weights: signed 2..8 bits, symmetric (zero point 0: the executors compute sum q_w (q_x - z_x)),
    per tensor or per output channel (axis 0, one scale per channel)."""
    check_scale(qp, where)
    if not qp.dtype.signed or not 2 <= qp.dtype.bits <= 8:
        raise _fail(where, f"weight type {qp.dtype.name} (intq runs signed 2..8-bit weights)")
    if np.any(np.asarray(qp.zero_point) != 0):
        raise _fail(where, "weight zero points must be 0 (symmetric weights)")
    if qp.axis is None and np.ndim(qp.scale) != 0 or qp.axis == 0 and np.shape(qp.scale) != (channels,):
        raise _fail(where, f"per-channel weight parameters need {channels} scales, got {np.size(qp.scale)}")
    if qp.axis not in (None, 0):
        raise _fail(where, f"weight parameters on axis {qp.axis} (0 or per tensor)")


def same_qparams(a: QParams, b: QParams) -> bool:
    return (a.dtype == b.dtype and a.axis == b.axis and np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
            and np.array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point)))


def check_multipliers(mantissa: np.ndarray, shift: np.ndarray, multipliers: np.ndarray, where: str) -> None:
    """(M0, n) must be exactly quantize_multiplier(M) of the real multipliers the scales define (eq. 8):
    M0 in [2^30, 2^31) or 0 with n = 0, 31 + n in [1, 62]."""
    if mantissa.shape != np.shape(multipliers) or shift.shape != np.shape(multipliers):
        raise _fail(where, f"{np.size(multipliers)} multipliers expected, got {mantissa.size} mantissas and "
                    f"{shift.size} shifts")
    try:
        expected_mantissa, expected_shift = quantize_multipliers(multipliers)
    except ValueError as err:
        raise _fail(where, f"its scales give an unusable multiplier ({err})") from None
    if not np.array_equal(mantissa, expected_mantissa) or not np.array_equal(shift, expected_shift):
        channel = int(np.flatnonzero((mantissa != expected_mantissa) | (shift != expected_shift))[0])
        raise _fail(where, f"mantissa/shift of channel {channel} are ({int(mantissa.flat[channel])}, "
                    f"{int(shift.flat[channel])}); its scales give ({int(expected_mantissa.flat[channel])}, "
                    f"{int(expected_shift.flat[channel])})")


def check_clamp(op, where: str) -> None:
    """A fused ReLU6-style upper clamp: finite, non-negative, within int32 steps of the output scale."""
    if op.relu_max is not None:
        if not math.isfinite(op.relu_max) or op.relu_max < 0 or op.relu_max / float(op.output_qparams.scale) > INT32_LIMIT:
            raise _fail(where, f"relu_max must be finite, >= 0 and within int32 steps of the scale, got {op.relu_max}")
    lower, upper = op.bounds()
    if lower > upper:
        raise _fail(where, f"empty output clamp [{lower}, {upper}]")


def _values(array) -> str:
    flat = np.ravel(np.asarray(array))
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in flat[:4].tolist())
    return f"[{shown}{', ...' if flat.size > 4 else ''}]"


def conv_output_shape(layer: QLayer, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """(C, H, W) -> (C_out, H_out, W_out), H_out = floor((H + 2p - d (k - 1) - 1) / s) + 1 (PyTorch's rule)."""
    if len(shape) != 3:
        raise _fail(where, f"a convolution needs a (C, H, W) input, got shape {shape}")
    out_channels, per_group, kh, kw = layer.weight.shape
    groups = layer.geometry["groups"]
    if per_group * groups != shape[0] or out_channels % groups:
        raise _fail(where, f"weights {tuple(layer.weight.shape)} with {groups} groups do not fit {shape[0]} input channels")
    sizes = []
    for size, k, s, p, d in zip(shape[1:], (kh, kw), layer.geometry["stride"], layer.geometry["padding"],
                                layer.geometry["dilation"]):
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    if min(sizes) < 1 or max(layer.geometry["padding"]) > max(kh, kw) * max(layer.geometry["dilation"]):
        raise _fail(where, f"kernel {(kh, kw)}, stride, padding and dilation do not fit a {shape[1:]} input")
    return (out_channels, *sizes)


def window_output_shape(kernel, stride, padding, shape: tuple[int, ...], where: str,
                        ceil_mode: bool = False) -> tuple[int, ...]:
    """Pooling window over (C, H, W): H_out = floor((H + 2p - k) / s) + 1, or eq. 31's ceil_mode size;
    padding at most half the kernel."""
    if len(shape) != 3:
        raise _fail(where, f"a pool needs a (C, H, W) input, got shape {shape}")
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise _fail(where, f"padding {tuple(padding)} exceeds half the kernel {tuple(kernel)}")
    sizes = [pool_output_size(size, k, s, p, ceil_mode) for size, k, s, p in zip(shape[1:], kernel, stride, padding)]
    if min(sizes) < 1 or any(size + 2 * p < k for size, k, p in zip(shape[1:], kernel, padding)):
        raise _fail(where, f"window {tuple(kernel)} does not fit a {shape[1:]} input")
    return (shape[0], *sizes)


def linear_output_shape(layer: QLinear, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """(K,) -> (C_out,): a linear layer reads exactly its number of input features, flattened."""
    if shape != (layer.weight.shape[1],):
        raise _fail(where, f"a linear layer with {layer.weight.shape[1]} input features reads a tensor of shape {shape}")
    return (layer.weight.shape[0],)


def check_layer(layer: QLayer, out_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """A conv or linear whose output shape is `out_shape`: weight type and values, multipliers, the
    recomputed bound (eq. 11)."""
    channels = layer.weight.shape[0]
    check_weight_type(layer.weight_qparams, channels, f"{where} weights")
    dtype = layer.weight_qparams.dtype
    if layer.weight.dtype != np.int8 or layer.weight.size == 0 or layer.weight.min() < dtype.qmin or layer.weight.max() > dtype.qmax:
        raise _fail(where, f"weights must be {dtype.name} values in [{dtype.qmin}, {dtype.qmax}]")
    if layer.bias is not None and (layer.bias.dtype != np.int32 or layer.bias.shape != (channels,)):
        raise _fail(where, f"bias must be {channels} int32 values")
    check_multipliers(layer.mantissa, layer.shift, layer_multipliers(layer.input_qparams, layer.weight_qparams,
                                                                     layer.output_qparams, channels), where)
    bound = accumulator_bound(layer.weight, layer.bias, layer.input_qparams)
    if bound > INT32_LIMIT:
        raise _fail(where, f"worst-case accumulator {bound:,} exceeds int32 ({layer.weight_qparams.dtype.bits}-bit weights, "
                    f"fan-in {layer.weight[0].size}, bias and {layer.input_qparams.dtype.name} inputs; eq. 11)")
    if layer.accumulator_bound != bound:
        raise _fail(where, f"carries accumulator bound {layer.accumulator_bound:,}; its weights give {bound:,}")
    return out_shape


def check_add(op: QAdd, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    if shapes[0] != shapes[1]:
        raise _fail(where, f"operands of shapes {shapes[0]} and {shapes[1]} (an add needs equal shapes)")
    if max(qp.dtype.bits for qp in op.input_qparams) > MAX_ADD_OPERAND_BITS:
        raise _fail(where, f"operands wider than {MAX_ADD_OPERAND_BITS} bits (eq. 17's budget)")
    check_multipliers(op.mantissa, op.shift, add_multipliers(op.input_qparams, op.output_qparams), where)
    return shapes[0]


def check_concat(op: QConcat, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    """Inputs (C_i, H, W) of one H and W; output (sum C_i, H, W); M_i = s_i / s_y recomputed (eq. 30)."""
    if len(op.input_qparams) != len(op.inputs):
        raise _fail(where, f"{len(op.input_qparams)} input parameters for {len(op.inputs)} inputs")
    if any(len(shape) != 3 for shape in shapes) or len({shape[1:] for shape in shapes}) != 1:
        raise _fail(where, f"inputs of shapes {', '.join(map(str, shapes))} (a concatenation along channels "
                    f"needs (C, H, W) inputs of one H and W)")
    check_multipliers(op.mantissa, op.shift, concat_multipliers(op.input_qparams, op.output_qparams), where)
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def mul_output_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of a * b for the broadcasts intq runs: equal shapes, or (C, 1, 1) against (C, H, W)
    in either order (a squeeze-excite gate); None for any other pair."""
    if a == b:
        return a
    if len(a) == 3 and len(b) == 3 and a[0] == b[0] and (a[1:] == (1, 1) or b[1:] == (1, 1)):
        return a if b[1:] == (1, 1) else b
    return None


def check_mul(op: QMul, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    """Operands of equal shapes or a (C, 1, 1) gate against (C, H, W); the worst product, derived from
    both types and zero points, at most 2^31 - 1 (eq. 34); M = s_a s_b / s_y recomputed."""
    shape = mul_output_shape(*shapes)
    if shape is None:
        raise _fail(where, f"operands of shapes {shapes[0]} and {shapes[1]} (a product needs equal shapes, or "
                    f"(C, 1, 1) against (C, H, W))")
    bound = product_bound(op.input_qparams)
    if bound > INT32_LIMIT:
        names = " and ".join(f"{qp.dtype.name} (zero point {int(qp.zero_point)})" for qp in op.input_qparams)
        raise _fail(where, f"worst-case product {bound:,} of {names} operands exceeds int32 (eq. 34's budget)")
    check_multipliers(op.mantissa, op.shift, mul_multiplier(op.input_qparams, op.output_qparams), where)
    return shape


def check_avg_pool(op: QAvgPool, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    if op.kernel_size is None:
        if len(shape) != 3:
            raise _fail(where, f"a global average pool needs a (C, H, W) input, got shape {shape}")
        window, out_shape = shape[1] * shape[2], (shape[0], 1, 1)
    else:
        if op.stride is None:
            raise _fail(where, "an average pool with a kernel needs a stride")
        out_shape = window_output_shape(op.kernel_size, op.stride, (0, 0), shape, where)
        window = op.kernel_size[0] * op.kernel_size[1]
    check_multipliers(op.mantissa, op.shift, avg_pool_multiplier(op.input_qparams, op.output_qparams, window), where)
    return out_shape


def check_lookup(op: QLookup, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    """A lookup-table activation (eq. 29): a known kind with its parameters in range, an input of at
    most 8 bits; its table is recomputed from them (never read), one code of the output type per input code."""
    problem = lookup_problem(op.kind, op.params)
    if problem is not None:
        raise _fail(where, problem)
    if op.input_qparams.dtype.bits > MAX_LOOKUP_INPUT_BITS:
        raise _fail(where, f"lookup tables take inputs of at most {MAX_LOOKUP_INPUT_BITS} bits, got "
                    f"{op.input_qparams.dtype.name}")
    table, out = op.table, op.output_qparams.dtype
    if table.shape != (1 << op.input_qparams.dtype.bits,) or table.min() < out.qmin or table.max() > out.qmax:
        raise _fail(where, f"its table is not one {out.name} code per input code")
    return shapes[0]


def check_structure(model: IntegerModel) -> None:
    """Unique printable names, inputs that are earlier ops (or the model input), the right arity."""
    if not 1 <= len(model.layers) <= MAX_OPS:
        raise _fail("model", f"{len(model.layers)} ops (1 to {MAX_OPS})")
    known = {model.input_name}
    for index, op in enumerate(model.layers):
        where = f"op #{index} {op.name!r}"
        if op.name in known:
            raise _fail(where, "its name is used twice")
        if op.ARITY is None and len(op.inputs) < 2:
            raise _fail(where, f"takes two or more inputs, lists {len(op.inputs)}")
        if op.ARITY is not None and len(op.inputs) != op.ARITY:
            raise _fail(where, f"takes {op.ARITY} input(s), lists {len(op.inputs)}")
        for name in op.inputs:
            if name not in known:
                raise _fail(where, f"input {name!r} is neither the model input nor an earlier op")
        known.add(op.name)
    if model.output_name not in known or model.output_name == model.input_name:
        raise _fail("model", f"output {model.output_name!r} is not one of its ops")
    if not model.quantized_layers():
        raise _fail("model", "has no conv or linear layer")


def check_input(model: IntegerModel) -> tuple[int, ...]:
    """The pixel input: an image shape, one mean and std per channel, and per-tensor QParams of 2..16
    bits; its integers are derived from them (the table of eq. 27), so nothing else needs checking."""
    spec, where = model.input, "model input"
    if len(spec.shape) != 3:
        raise _fail(where, f"shape {tuple(spec.shape)} is not an image's (C, H, W)")
    channels, height, width = spec.shape
    if not (1 <= channels <= MAX_CHANNELS and height >= 1 and width >= 1 and channels * height * width <= MAX_TENSOR_VALUES):
        raise _fail(where, f"shape {tuple(spec.shape)}")
    if spec.preprocessing.channels not in (None, channels):
        raise _fail(where, f"preprocessing names {spec.preprocessing.channels} channels, the input has {channels}")
    check_activation_type(spec.qparams, where)
    return tuple(spec.shape)


def check_channel_gather(op: QChannelGather, shapes: list, input_qparams: list[QParams], where: str) -> tuple[int, ...]:
    """A gather reads a (C, H, W) input; 1..MAX_CHANNELS indices, each a channel in [0, C) (eq. 33)."""
    if len(shapes[0]) != 3:
        raise _fail(where, f"gathers channels of a (C, H, W) input, got {tuple(shapes[0])}")
    channels = shapes[0][0]
    if not 1 <= len(op.indices) <= MAX_CHANNELS:
        raise _fail(where, f"{len(op.indices)} indices (1 to {MAX_CHANNELS})")
    outside = [int(i) for i in op.indices if not 0 <= int(i) < channels]
    if outside:
        raise _fail(where, f"index {outside[0]} is not a channel of its input ({channels} channels)")
    return (len(op.indices), *shapes[0][1:])


def check_relu(op: QReLU, shapes: list, input_qparams: list[QParams], where: str) -> tuple[int, ...]:
    """An unfused ReLU clamps at its input's zero point."""
    if op.zero_point != int(input_qparams[0].zero_point):
        raise _fail(where, f"clamps at {op.zero_point}, but its input's zero point is {int(input_qparams[0].zero_point)}")
    return shapes[0]


def _requantizing(check):
    """A requantizing op's check: its output type and clamp first, then `check`."""
    def checked(op, shapes: list, input_qparams: list[QParams], where: str) -> tuple[int, ...]:
        check_activation_type(op.output_qparams, f"{where} output parameters")
        check_clamp(op, where)
        return check(op, shapes, where)
    return checked


# Each op class's own rules, (op, input shapes, input QParams, where) -> its output shape (one image).
CHECKS = {
    QConv2d: _requantizing(lambda op, shapes, where: check_layer(op, conv_output_shape(op, shapes[0], where), where)),
    QLinear: _requantizing(lambda op, shapes, where: check_layer(op, linear_output_shape(op, shapes[0], where), where)),
    QAdd: _requantizing(check_add),
    QConcat: _requantizing(check_concat),
    QMul: _requantizing(check_mul),
    QAvgPool: _requantizing(lambda op, shapes, where: check_avg_pool(op, shapes[0], where)),
    QMaxPool: lambda op, shapes, qps, where: window_output_shape(op.kernel_size, op.stride, op.padding, shapes[0], where,
                                                                 op.ceil_mode),
    QFlatten: lambda op, shapes, qps, where: (math.prod(shapes[0]),),
    QReLU: check_relu,
    QLookup: _requantizing(check_lookup),
    QChannelGather: check_channel_gather,
}


def check_op(op: IntegerOp, shapes: list[tuple[int, ...]], input_qparams: list[QParams], where: str) -> tuple[int, ...]:
    """One op's own rules (CHECKS); returns its output shape (one image)."""
    if type(op) not in CHECKS:
        raise _fail(where, f"unknown op type {type(op).__name__}")
    return CHECKS[type(op)](op, shapes, input_qparams, where)


def check_model(model: IntegerModel) -> dict[str, tuple[int, ...]]:
    """Every rule above, op by op; returns each tensor's shape for one image ({name: shape})."""
    check_structure(model)
    shapes = {model.input_name: check_input(model)}
    qparams = {model.input_name: model.input.qparams}
    for index, op in enumerate(model.layers):
        where = f"op #{index} {op.name!r}"
        for name, declared in zip(op.inputs, op.declared_input_params()):
            check_activation_type(declared, f"{where} input parameters")
            if not same_qparams(declared, qparams[name]):
                raise _fail(where, f"its input parameters differ from those of {name!r}, which produces its input")
        shapes[op.name] = check_op(op, [shapes[name] for name in op.inputs], [qparams[name] for name in op.inputs], where)
        if int(np.prod(shapes[op.name])) > MAX_TENSOR_VALUES:
            raise _fail(where, f"output of {int(np.prod(shapes[op.name])):,} values per image")
        qparams[op.name] = op.output_params([qparams[name] for name in op.inputs])
    return shapes
