"""The `onnx` executor: an IntegerModel exported to standard ONNX (QLinearConv, MaxPool, Clip, with
ONNX Runtime's com.microsoft QLinearAdd, QLinearConcat, QLinearMul) and run in ONNX Runtime; `onnx_exact`:
the same model with every conv, linear, add, concat and product as an exact integer subgraph, bit for bit the reference's integers.

Input: uint8 pixels (N, C, H, W) of the calibrated size. Output: the model's output integers (uint8-encoded 8-bit values
are decoded in Python, see onnx_runtime.OnnxModel). Activations travel as uint8 (encoding.py). Weights are
stored as uint8 w + 128 with zero point 128: ONNX Runtime's u8 x u8 kernels widen to int16 before
multiplying, so its int32 accumulators are exact on every x86 CPU (its u8 x s8 kernels, like
fbgemm's, saturate pair sums at int16 without VNNI). Requantization is the engine's float
multiplier (scales are float32 in ONNX), so an output can differ from the reference by 1 LSB near
a rounding tie. Ops an engine kernel cannot express with intq's types (encoding.py) are exported as
exact integer subgraphs: a float Conv/MatMul on integer values (exact below 2^24), then the
fixed-point requantizer of eq. 9 in int64:
    y = sign(acc M0) * ((|acc M0| + 2^(s-1)) div 2^s),  s = 31 + n,
which is round half away from zero of acc M0 / 2^s, the same integers as rounding_right_shift.
A lookup-table activation (eq. 29) is a Gather of its derived table in both graphs, exact.
"""
from __future__ import annotations

import numpy as np
import torch

from intq.extras import require
from intq.executors.encoding import EngineError, encoded_zero_point, engine_runs_layer, narrower_bounds, uint8_offset
from intq.executors.reference import FLOAT32_EXACT, add_table, run_integer
from intq.arith.fixed_point import float64_requantizer
from intq.graph.integer_model import (IntegerModel, QAdd, QAvgPool, QChannelGather, QConcat, QConv2d, QFlatten,
                                      QLayer, QLinear, QLookup, QMaxPool, QMul, QReLU)
from intq.arith.qparams import QParams
from intq.executors.onnx_graph import (_centred, _clip, _encoded, _encoded_table, _fixed_point_product, _Graph, _int64_cast,
                                       _requantized, _scale)

OPSET = 17
MS_DOMAIN = "com.microsoft"


def _conv_attributes(layer: QConv2d) -> dict:
    g = layer.geometry
    return {"strides": list(g["stride"]), "pads": list(g["padding"]) * 2, "dilations": list(g["dilation"]),
            "group": g["groups"]}


# How each weighted layer class is expressed in ONNX: (integer node, float node, the weight as those
# nodes take it, their attributes, the shape that broadcasts per-channel constants over the products).
PRODUCT_NODES = {
    QConv2d: ("ConvInteger", "Conv", lambda weight: weight, _conv_attributes, (1, -1, 1, 1)),
    QLinear: ("MatMulInteger", "MatMul", lambda weight: weight.T.copy(), lambda layer: {}, (1, -1)),
}


def _exact_products(graph: _Graph, layer: QLayer, value: str, encoded: bool) -> str:
    """sum_k q_w (q_x - z_x), exactly, as int32 or as float32 integers. From a uint8-encoded input: ConvInteger/MatMulInteger
    with uint8 weights w + 128 (exact int32, the zero points subtracted by the kernel, padding with
    z_x). From the raw folded input: a float Conv/MatMul of integer values, exact because every
    partial sum is an integer below the proven bound <= 2^24."""
    from onnx import TensorProto

    integer_node, float_node, as_node_weight, attributes, _ = PRODUCT_NODES[type(layer)]
    prefix = layer.name
    if encoded:
        weight = as_node_weight((np.asarray(layer.weight, np.int16) + 128).astype(np.uint8))
        zeros = [graph.const(f"{prefix}/x_zero_point", np.uint8(encoded_zero_point(layer.input_qparams))),
                 graph.const(f"{prefix}/w_zero_point", np.uint8(128))]
        return graph.node(integer_node, [value, graph.const(f"{prefix}/weight", weight), *zeros], f"{prefix}/products",
                          **attributes(layer))
    if layer.accumulator_bound > FLOAT32_EXACT:
        raise EngineError(f"accumulator bound {layer.accumulator_bound} on a raw input is above 2^24, where "
                          "ONNX Runtime's float32 Conv is no longer exact")
    centred = graph.node("Cast", [_centred(graph, value, encoded, layer.input_qparams, prefix)], f"{prefix}/float",
                         to=TensorProto.FLOAT)
    weight = as_node_weight(np.asarray(layer.weight, np.float32))
    return graph.node(float_node, [centred, graph.const(f"{prefix}/weight", weight)], f"{prefix}/products", **attributes(layer))


def _exact_layer(graph: _Graph, layer: QLayer, value: str, encoded: bool) -> tuple[str, bool]:
    """The exact products, then clamp(floor(c + p M)) in float64 where eq. 24 proves it exact, else
    acc = products + q_b in int64 and the integer requantizer (eq. 10, 21)."""
    from onnx import TensorProto

    shape, prefix = PRODUCT_NODES[type(layer)][4], layer.name
    products = _exact_products(graph, layer, value, encoded)
    lower, upper = layer.bounds()
    out = layer.output_qparams
    constants = float64_requantizer(layer.mantissa, layer.shift, layer.bias, int(out.zero_point), lower, upper,
                                    int(layer.accumulator_bound))
    if constants is not None:
        multiplier, offset = (graph.const(f"{prefix}/{name}", array.reshape(shape)) for name, array in zip(("M", "c"), constants))
        as_double = graph.node("Cast", [products], f"{prefix}/double", to=TensorProto.DOUBLE)
        shifted = graph.node("Add", [graph.node("Mul", [as_double, multiplier], f"{prefix}/scaled"), offset], f"{prefix}/shifted")
        clamped = graph.node("Clip", [graph.node("Floor", [shifted], f"{prefix}/floor"), graph.const(f"{prefix}/lower", np.float64(lower)),
                                      graph.const(f"{prefix}/upper", np.float64(upper))], f"{prefix}/clamped")
        return _encoded(graph, clamped, out, prefix, np.float64)
    acc = _int64_cast(graph, products)
    if layer.bias is not None:
        acc = graph.node("Add", [acc, graph.const(f"{prefix}/bias", layer.bias.astype(np.int64).reshape(shape))], f"{prefix}/acc")
    return _requantized(graph, acc, layer.mantissa, layer.shift, out, layer.bounds(), shape, prefix)


def _engine_conv(graph: _Graph, layer: QLayer, value: str, weight: np.ndarray, geometry: dict) -> str:
    """QLinearConv with uint8 weights w + 128 (zero point 128, per output channel) and the int32 bias."""
    prefix, g, channels = layer.name, geometry, weight.shape[0]
    weight_scale = np.broadcast_to(np.asarray(layer.weight_qparams.scale, np.float32), (channels,)).copy()
    inputs = [value, *_scale(graph, f"{prefix}/x", layer.input_qparams),
              graph.const(f"{prefix}/weight", (weight + 128).astype(np.uint8)), graph.const(f"{prefix}/w_scale", weight_scale),
              graph.const(f"{prefix}/w_zero_point", np.full(channels, 128, np.uint8)),
              *_scale(graph, f"{prefix}/y", layer.output_qparams)]
    if layer.bias is not None:
        inputs.append(graph.const(f"{prefix}/bias", layer.bias.astype(np.int32)))
    y = graph.node("QLinearConv", inputs, f"{prefix}/qlinear", strides=list(g["stride"]), pads=list(g["padding"]) * 2,
                   dilations=list(g["dilation"]), group=g["groups"])
    return _clip(graph, y, narrower_bounds(*layer.bounds(), layer.output_qparams, relu_fused=False), prefix)


def _engine_linear(graph: _Graph, layer: QLinear, value: str) -> str:
    """A Linear as a 1x1 QLinearConv on (N, K, 1, 1), flattened back to (N, C)."""
    image = graph.node("Reshape", [value, graph.const(f"{layer.name}/as_image", np.array([0, -1, 1, 1], np.int64))],
                       f"{layer.name}/image")
    weight = np.asarray(layer.weight, np.int16).reshape(*layer.weight.shape, 1, 1)  # (C, K) -> (C, K, 1, 1)
    identity = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}
    clipped = _engine_conv(graph, layer, image, weight, identity)
    return graph.node("Flatten", [clipped], f"{layer.name}/flat", axis=1)


# The weighted layer classes on ONNX Runtime's QLinearConv.
ENGINE_LAYERS = {
    QConv2d: lambda graph, layer, value: _engine_conv(graph, layer, value, np.asarray(layer.weight, np.int16), layer.geometry),
    QLinear: _engine_linear,
}


def _avg_pool(graph: _Graph, op: QAvgPool, value: str, encoded: bool, channels: int) -> tuple[str, bool]:
    """Exact window sums of (q - z) (ReduceSum, or a float depthwise Conv of ones: sums of at most
    a few thousand 8-bit values are exact), then the exact requantizer (eq. 18)."""
    from onnx import TensorProto

    centred = _centred(graph, value, encoded, op.input_qparams, op.name)
    if op.kernel_size is None:
        acc = graph.node("ReduceSum", [centred, graph.const(f"{op.name}/axes", np.array([2, 3], np.int64))],
                         f"{op.name}/sum", keepdims=1)
    else:
        as_float = graph.node("Cast", [centred], f"{op.name}/float", to=TensorProto.FLOAT)
        ones = np.ones((channels, 1, *op.kernel_size), np.float32)
        sums = graph.node("Conv", [as_float, graph.const(f"{op.name}/ones", ones)], f"{op.name}/sums",
                          strides=list(op.stride), group=channels)
        acc = _int64_cast(graph, sums)
    return _requantized(graph, acc, op.mantissa[:1], op.shift[:1], op.output_qparams, op.bounds(), (), op.name)


def _exact_add(graph: _Graph, op: QAdd, operands: list[tuple[str, bool]]) -> tuple[str, bool]:
    """eq. 17 exactly: two uint8-encoded operands index the table of every pair of codes
    (reference.add_table; the encoded code q + o is q - qmin), else in int64 each operand
    round(M_i (q_i - z_i)) and their sum requantized."""
    from onnx import TensorProto

    if all(encoded for _, encoded in operands):
        (a, _), (b, _) = operands
        codes_b = op.input_qparams[1].dtype.qmax - op.input_qparams[1].dtype.qmin + 1
        a32, b32 = (graph.node("Cast", [v], f"{op.name}/{name}/int32", to=TensorProto.INT32) for name, v in (("a", a), ("b", b)))
        row = graph.node("Mul", [a32, graph.const(f"{op.name}/codes_b", np.int32(codes_b))], f"{op.name}/row")
        index = graph.node("Add", [row, b32], f"{op.name}/index")
        values, encoded = _encoded_table(add_table(op).numpy(), op.output_qparams)
        return graph.node("Gather", [graph.const(f"{op.name}/table", values), index], op.name), encoded
    terms = []
    for index, ((value, encoded), qparams) in enumerate(zip(operands, op.input_qparams)):
        prefix = f"{op.name}/{'ab'[index]}"
        centred = _centred(graph, value, encoded, qparams, prefix)
        terms.append(_fixed_point_product(graph, centred, op.mantissa[index : index + 1], op.shift[index : index + 1], (), prefix))
    total = graph.node("Add", terms, f"{op.name}/sum")
    return _requantized(graph, total, op.mantissa[2:], op.shift[2:], op.output_qparams, op.bounds(), (), op.name)


def _input(graph: _Graph, model: IntegerModel) -> tuple[str, bool]:
    """The first layer's input (eq. 27): the model input's per-channel table gathered at c * 256 + p,
    uint8-encoded (q + o) when the input is 8 bits or narrower, else raw int64 (e.g. the folded 2p - 255)."""
    spec = model.input
    index = graph.node("Add", [_int64_cast(graph, "pixels"),
                               graph.const("input/channel_offsets",
                                           (np.arange(spec.channels, dtype=np.int64) * 256).reshape(1, -1, 1, 1))],
                       "input/index")
    values, encoded = _encoded_table(spec.table.reshape(-1), spec.qparams)  # (C, 256) -> (C * 256,)
    return graph.node("Gather", [graph.const("input/table", values), index], "input/q"), encoded


def value_shapes(model: IntegerModel, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Shape of every value for one image, from one reference run on one example image."""
    shapes: dict[str, tuple[int, ...]] = {}
    run_integer(model, example[:1], lambda name, q: shapes.__setitem__(name, tuple(q.shape[1:])))
    return shapes


def _layer(graph: _Graph, op: QLayer, model: IntegerModel, operands: list, qparams: dict, shapes: dict, exact: bool):
    (value, encoded), = operands
    if encoded and engine_runs_layer(op, model) and not exact:
        return ENGINE_LAYERS[type(op)](graph, op, value), True
    return _exact_layer(graph, op, value, encoded)


def _encoded_input(op, operands: list, qparams: dict) -> str:
    """The uint8-encoded input an engine kernel needs; EngineError for a wider value."""
    (value, encoded), *_ = operands
    if not encoded:
        raise EngineError(f"{type(op).__name__} on a {qparams[op.inputs[0]].dtype.name} value (wider than 8 bits)")
    return value


def _add(graph: _Graph, op: QAdd, model: IntegerModel, operands: list, qparams: dict, shapes: dict, exact: bool):
    if exact:
        return _exact_add(graph, op, operands)
    if not all(encoded for _, encoded in operands):
        raise EngineError("residual add of a value wider than 8 bits")
    (value, _), (other, _) = operands
    inputs = [value, *_scale(graph, f"{op.name}/a", op.input_qparams[0]),
              other, *_scale(graph, f"{op.name}/b", op.input_qparams[1]), *_scale(graph, f"{op.name}/y", op.output_qparams)]
    y = graph.node("QLinearAdd", inputs, f"{op.name}/qlinear", domain=MS_DOMAIN)
    return _clip(graph, y, narrower_bounds(*op.bounds(), op.output_qparams, relu_fused=False), op.name), True


def _concat(graph: _Graph, op: QConcat, model, operands: list, qparams: dict, shapes: dict, exact: bool):
    """The engine graph: com.microsoft QLinearConcat (ONNX Runtime's float requantization) when every
    value is uint8-encoded; otherwise, and in the exact graph, eq. 30 exactly: each input
    clamp(z_y + round(M_i (q_i - z_i))) in int64, all on the output's QParams (so encoded alike), then
    one Concat on channels."""
    if not exact and op.output_qparams.dtype.bits <= 8 and all(encoded for _, encoded in operands):
        inputs = _scale(graph, f"{op.name}/y", op.output_qparams)
        for index, ((value, _), input_qp) in enumerate(zip(operands, op.input_qparams)):
            inputs += [value, *_scale(graph, f"{op.name}/{index}", input_qp)]
        y = graph.node("QLinearConcat", inputs, f"{op.name}/qlinear", domain=MS_DOMAIN, axis=1)
        return _clip(graph, y, narrower_bounds(*op.bounds(), op.output_qparams, relu_fused=False), op.name), True
    parts = []
    for index, ((value, encoded), input_qp) in enumerate(zip(operands, op.input_qparams)):
        prefix = f"{op.name}/{index}"
        centred = _centred(graph, value, encoded, input_qp, prefix)
        parts.append(_requantized(graph, centred, op.mantissa[index : index + 1], op.shift[index : index + 1],
                                  op.output_qparams, op.bounds(), (), prefix))
    return graph.node("Concat", [name for name, _ in parts], op.name, axis=1), parts[0][1]


def _mul(graph: _Graph, op: QMul, model, operands: list, qparams: dict, shapes: dict, exact: bool):
    """The engine graph: com.microsoft QLinearMul (ONNX Runtime's float requantization, broadcasting a
    (N, C, 1, 1) gate) when every value is uint8-encoded; otherwise, and in the exact graph, eq. 34
    exactly: (q_a - z_a)(q_b - z_b) in int64 (Mul broadcasts), then clamp(z_y + round(M product))."""
    if not exact and op.output_qparams.dtype.bits <= 8 and all(encoded for _, encoded in operands):
        (a, _), (b, _) = operands
        inputs = [a, *_scale(graph, f"{op.name}/a", op.input_qparams[0]), b, *_scale(graph, f"{op.name}/b", op.input_qparams[1]),
                  *_scale(graph, f"{op.name}/y", op.output_qparams)]
        y = graph.node("QLinearMul", inputs, f"{op.name}/qlinear", domain=MS_DOMAIN)
        return _clip(graph, y, narrower_bounds(*op.bounds(), op.output_qparams, relu_fused=False), op.name), True
    centred = [_centred(graph, value, encoded, qp, f"{op.name}/{'ab'[index]}")
               for index, ((value, encoded), qp) in enumerate(zip(operands, op.input_qparams))]
    product = graph.node("Mul", centred, f"{op.name}/ab")
    return _requantized(graph, product, op.mantissa, op.shift, op.output_qparams, op.bounds(), (), op.name)


def _max_pool(graph: _Graph, op: QMaxPool, model, operands: list, qparams: dict, shapes: dict, exact: bool):
    return graph.node("MaxPool", [_encoded_input(op, operands, qparams)], op.name, kernel_shape=list(op.kernel_size),
                      strides=list(op.stride), pads=list(op.padding) * 2, ceil_mode=int(op.ceil_mode)), True


def _relu(graph: _Graph, op: QReLU, model, operands: list, qparams: dict, shapes: dict, exact: bool):
    zero = encoded_zero_point(qparams[op.inputs[0]])
    return _clip(graph, _encoded_input(op, operands, qparams), (zero, 255), op.name), True


def _lookup(graph: _Graph, op: QLookup, model, operands: list, qparams: dict, shapes: dict, exact: bool):
    """eq. 29 in both graphs, exactly: the encoded input code q + o = q - qmin indexes the op's derived
    table (Gather), whose values travel encoded like any output."""
    from onnx import TensorProto

    index = graph.node("Cast", [_encoded_input(op, operands, qparams)], f"{op.name}/index", to=TensorProto.INT32)
    values, encoded = _encoded_table(op.table, op.output_qparams)
    return graph.node("Gather", [graph.const(f"{op.name}/table", values), index], op.name), encoded


def _channel_gather(graph: _Graph, op: QChannelGather, model, operands: list, qparams: dict, shapes: dict, exact: bool):
    """eq. 33 in both graphs: Gather on axis 1 with int64 indices moves uint8 and int64 values alike."""
    value, encoded = operands[0]
    indices = graph.const(f"{op.name}/indices", np.asarray(op.indices, np.int64))
    return graph.node("Gather", [value, indices], op.name, axis=1), encoded


# The ONNX lowering: per op class, (graph, op, model, operands [(tensor, uint8-encoded?)], value qparams,
# shapes, exact) -> (output tensor, uint8-encoded?).
LOWERING = {
    QConv2d: _layer,
    QLinear: _layer,
    QAdd: _add,
    QConcat: _concat,
    QMul: _mul,
    QAvgPool: lambda graph, op, model, operands, qparams, shapes, exact: _avg_pool(graph, op, *operands[0],
                                                                                   shapes[op.inputs[0]][0]),
    QMaxPool: _max_pool,
    QFlatten: lambda graph, op, model, operands, qparams, shapes, exact: (
        graph.node("Flatten", [operands[0][0]], op.name, axis=1), operands[0][1]),
    QReLU: _relu,
    QLookup: _lookup,
    QChannelGather: _channel_gather,
}


def _op(graph: _Graph, op, model: IntegerModel, values: dict, qparams: dict, shapes: dict, exact: bool) -> tuple[str, bool]:
    """One intq op as ONNX nodes (LOWERING); `values` maps names to (ONNX tensor, uint8-encoded?)."""
    return LOWERING[type(op)](graph, op, model, [values[name] for name in op.inputs], qparams, shapes, exact)


def _serialised(graph: _Graph, inputs: list, output: str, encoded: bool, output_shape: tuple[int, ...],
                out_qparams: QParams) -> bytes:
    """The graph as a checked, serialised ModelProto with output `output` (metadata: its uint8 offset)."""
    import onnx
    from onnx import TensorProto, helper

    graph.node("Identity", [output], "output")
    out_type = TensorProto.UINT8 if encoded else TensorProto.INT64
    onnx_graph = helper.make_graph(graph.nodes, "intq", inputs, [helper.make_tensor_value_info("output", out_type, ["N", *output_shape])],
                                   graph.initializers)
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="intq")
    offset = uint8_offset(out_qparams) if encoded else 0
    helper.set_model_props(proto, {"output_offset": str(offset), "output_dtype": out_qparams.dtype.name})
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(model: IntegerModel, example: torch.Tensor | None = None, exact: bool = False) -> bytes:
    """The model as a serialised ONNX ModelProto for images of the shape it was calibrated at
    (`example`, uint8 pixels, if given, must have that shape).

    exact=False: QLinearConv / QLinearAdd (the engine's float requantization, deployable as is);
    exact=True: every conv, linear and add as the exact integer subgraph (ConvInteger/MatMulInteger
    and int64 fixed-point arithmetic), bit-exact with the reference executor, and slower.

    Graph input `pixels` uint8 (N, C, H, W); output `output`: uint8 encoded (q + o) for an 8-bit
    output type, int64 otherwise (metadata `output_offset` holds o)."""
    require("onnx", "exporting ONNX")
    from onnx import TensorProto, helper

    if example is None:
        example = torch.zeros((1, *model.input.shape), dtype=torch.uint8)
    if tuple(example.shape[1:]) != tuple(model.input.shape):
        raise EngineError(f"onnx: the model takes images of shape {tuple(model.input.shape)} (C, H, W), the size it "
                          f"was calibrated at; the example has {tuple(example.shape[1:])}")
    graph, qparams, shapes = _Graph(), model.value_qparams(), value_shapes(model, example)
    values = {model.input_name: _input(graph, model)}
    for op in model.layers:
        values[op.name] = _named_op(graph, op, model, values, qparams, shapes, exact)
    output, encoded = values[model.output_name]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", *example.shape[1:]])
    return _serialised(graph, [pixels], output, encoded, shapes[model.output_name], qparams[model.output_name])


def _named_op(graph: _Graph, op, model: IntegerModel, values: dict, qparams: dict, shapes: dict, exact: bool) -> tuple[str, bool]:
    try:
        return _op(graph, op, model, values, qparams, shapes, exact)
    except EngineError as err:
        raise EngineError(f"onnx: layer {op.name}: {err}") from None


def export_op_onnx(op, model: IntegerModel, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """One op of the `onnx` executor alone, as a serialised ModelProto whose inputs are its operands
    (`in/<name>`: uint8-encoded for types of <= 8 bits, int64 otherwise), for checking each op on
    the reference's own inputs; `shapes` maps values to their per-image shapes."""
    require("onnx", "checking ONNX ops")
    from onnx import TensorProto, helper

    graph, qparams, values, inputs = _Graph(), model.value_qparams(), {}, []
    for name in dict.fromkeys(op.inputs):  # an add may read one value twice
        encoded = qparams[name].dtype.bits <= 8
        values[name] = (f"in/{name}", encoded)
        inputs.append(helper.make_tensor_value_info(f"in/{name}", TensorProto.UINT8 if encoded else TensorProto.INT64,
                                                    ["N", *shapes[name]]))
    output, encoded = _named_op(graph, op, model, values, qparams, shapes, exact=False)
    return _serialised(graph, inputs, output, encoded, shapes[op.name], qparams[op.name])
