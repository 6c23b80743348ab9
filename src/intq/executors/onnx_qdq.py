"""The `onnx_qdq` executor: an IntegerModel exported as a QDQ ONNX graph -- float ops (Conv, Gemm, Add,
Concat, Mul, MaxPool, AveragePool, Sigmoid, ...) between QuantizeLinear/DequantizeLinear pairs that
carry intq's own scales and zero points -- the format TensorRT, OpenVINO, ONNX Runtime's accelerator
back-ends and its own quantization tooling consume; ONNX Runtime's CPU graph optimiser fuses the
node units (DQ -> Conv -> Q) into its QLinear kernels.

Input `input`: float32 (N, C, H, W), already preprocessed x = (p/255 - mean)/std with the model's
declared mean and std (eq. 25; written in the graph's doc_string and metadata), quantized first to
the input's QParams. Output `logits`: float32, the output integers dequantized, s_y (q_y - z_y).

Each intq value becomes Q(x; s, z) then DQ in its container type: int8/uint8 for types of at most 8
bits, int16/uint16 (opset 21) for 9..16 bits (the study's int9 input, the fine int11 input), with a
float Clip before Q where the op's clamp (eq. 10: ReLU, ReLU6, a type narrower than its container)
is narrower than the container. Weights: DQ of the integer weights (per output channel on axis 0);
biases: DQ of the int32 biases at scale s_x s_w[c], zero point 0 (eq. 15). docs/math.md eq. 35. Not bit-exact: each op
requantizes in float32 with QuantizeLinear's round half to even, where intq rounds the fixed-point
product half away from zero (eq. 9), so an output can differ from the reference by 1 LSB per op.
"""
from __future__ import annotations

import numpy as np
import torch

from intq.extras import require
from intq.arith.qparams import IntType, QParams
from intq.executors.encoding import EngineError
from intq.executors.onnx_export import value_shapes
from intq.executors.onnx_graph import _Graph
from intq.graph.integer_model import (IntegerModel, QAdd, QAvgPool, QChannelGather, QConcat, QConv2d, QFlatten,
                                      QLinear, QLookup, QMaxPool, QMul, QReLU, Requantizing)

OPSET = 21  # QuantizeLinear/DequantizeLinear with int16/uint16
MAX_CONTAINER_BITS = 16


def container(dtype: IntType) -> IntType:
    """The QDQ integer type that holds `dtype`: 8 bits up to 8, 16 bits up to 16, same signedness."""
    if dtype.bits > MAX_CONTAINER_BITS:
        raise EngineError(f"a {dtype.name} value is wider than QuantizeLinear's 16-bit types")
    return IntType(8 if dtype.bits <= 8 else 16, dtype.signed)


def _numpy_type(dtype: IntType):
    return np.dtype(f"{'int' if dtype.signed else 'uint'}{dtype.bits}").type


def _scale_zero(graph: _Graph, name: str, qparams: QParams, scale=None) -> list[str]:
    """[scale float32, zero point in the container type] of `qparams` (or `scale` instead of its own)."""
    scale = np.asarray(qparams.scale if scale is None else scale, np.float32)
    zero = np.broadcast_to(np.asarray(qparams.zero_point), scale.shape).astype(_numpy_type(container(qparams.dtype)))
    return [graph.const(f"{name}/scale", scale), graph.const(f"{name}/zero_point", zero)]


def _axis(qparams: QParams, axis: int | None) -> dict:
    return {} if np.asarray(qparams.scale).ndim == 0 else {"axis": axis if axis is not None else qparams.axis}


def clamp_node(qparams: QParams, bounds: tuple[int, int] | None) -> str | None:
    """The float node written before QuantizeLinear to clamp to `bounds` (eq. 10): None where the
    container's own range is the clamp, "Relu" where the clamp is [z, container max], else "Clip"."""
    box = container(qparams.dtype)
    if bounds is None or (bounds[0] <= box.qmin and bounds[1] >= box.qmax):
        return None
    return "Relu" if bounds[0] == int(qparams.zero_point) and bounds[1] == box.qmax else "Clip"


def quantized(graph: _Graph, value: str, qparams: QParams, bounds: tuple[int, int] | None, name: str) -> str:
    """DQ(Q(clamp(x))): x quantized to `qparams` in its container, q = clamp(round(x/s) + z), the clamp
    to `bounds` (integers, eq. 10) written as a float Relu/Clip before Q where narrower than the container."""
    clamp = clamp_node(qparams, bounds)
    if clamp == "Relu":
        value = graph.node("Relu", [value], f"{name}/relu")
    elif clamp == "Clip":
        scale, zero = float(qparams.scale), int(qparams.zero_point)
        low, high = (np.float32(scale * (bound - zero)) for bound in bounds)
        value = graph.node("Clip", [value, graph.const(f"{name}/clip_min", low), graph.const(f"{name}/clip_max", high)],
                           f"{name}/clip")
    params = _scale_zero(graph, f"{name}/q", qparams)
    q = graph.node("QuantizeLinear", [value, *params], f"{name}/quantized", **_axis(qparams, None))
    return graph.node("DequantizeLinear", [q, *params], f"{name}/dequantized", **_axis(qparams, None))


FUSED_OPS = (QConv2d, QLinear, QAdd)  # the node units ONNX Runtime's CPU optimiser fuses: QLinearConv, QGemm, QLinearAdd


def float_node_units(model: IntegerModel) -> list[str]:
    """The convolutions, linears and adds whose node unit ONNX Runtime's CPU optimiser cannot fuse into
    its 8-bit QLinear kernels, so that they run as float ops: an input or output in a 16-bit container
    (the int9 or int11 input, int16 logits), or a clamp node left before the output's QuantizeLinear --
    a Clip (a range narrower than the 8-bit container: the x86 preset's 7-bit activations) or a Relu
    whose zero point is not the container's minimum (ORT folds only that one into QuantizeLinear).
    With uint8 activations ORT fuses every other one (tests/test_onnx_qdq.py); with int8 activations it
    may leave more unfused (ONNX Runtime 1.32: a conv whose int8 input also feeds an unfused op)."""
    qparams, names = model.value_qparams(), []
    for op in (op for op in model.layers if isinstance(op, FUSED_OPS)):
        output = qparams[op.name]
        clamp = clamp_node(output, op.bounds())
        wide = any(container(qparams[name].dtype).bits > 8 for name in (*op.inputs, op.name))
        if wide or clamp == "Clip" or (clamp == "Relu" and int(output.zero_point) != container(output.dtype).qmin):
            names.append(op.name)
    return names


def fusion_note(model: IntegerModel) -> str:
    """One line: which of the model's convolutions, linears and adds ONNX Runtime runs as float ops
    (float_node_units) and how many it fuses into its 8-bit QLinear kernels."""
    names, total = float_node_units(model), sum(isinstance(op, FUSED_OPS) for op in model.layers)
    if not names:
        return f"ONNX Runtime fuses all {total} convolutions, linears and adds into its 8-bit QLinear kernels"
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (f"note: {len(names)} of {total} convolutions, linears and adds ({shown}) read or write a 16-bit value or "
            f"clamp narrower than their 8-bit container: ONNX Runtime runs them as float ops, the rest in its 8-bit "
            f"QLinear kernels")


def _weights(graph: _Graph, layer, weight: np.ndarray) -> tuple[str, str | None]:
    """DQ of the integer weights (per output channel, axis 0) and of the int32 bias at scale s_x s_w
    (zero point 0, eq. 15), so the float op computes s_x s_w acc (eq. 7, 35)."""
    wq = layer.weight_qparams
    stored = graph.const(f"{layer.name}/weight_q", weight.astype(_numpy_type(container(wq.dtype))))
    w = graph.node("DequantizeLinear", [stored, *_scale_zero(graph, f"{layer.name}/w", wq)], f"{layer.name}/weight",
                   **_axis(wq, 0))
    if layer.bias is None:
        return w, None
    bias_scale = np.broadcast_to(float(layer.input_qparams.scale) * np.asarray(wq.scale, np.float64), (weight.shape[0],))
    bias = graph.node("DequantizeLinear", [graph.const(f"{layer.name}/bias_q", layer.bias.astype(np.int32)),
                                           graph.const(f"{layer.name}/b/scale", bias_scale.astype(np.float32)),
                                           graph.const(f"{layer.name}/b/zero_point", np.zeros(weight.shape[0], np.int32))],
                      f"{layer.name}/bias", axis=0)
    return w, bias


def _conv(graph: _Graph, op: QConv2d, inputs: list[str]) -> str:
    g = op.geometry
    w, bias = _weights(graph, op, np.asarray(op.weight))
    return graph.node("Conv", [inputs[0], w, *([bias] if bias else [])], f"{op.name}/conv", strides=list(g["stride"]),
                      pads=list(g["padding"]) * 2, dilations=list(g["dilation"]), group=g["groups"])


def _linear(graph: _Graph, op: QLinear, inputs: list[str]) -> str:
    w, bias = _weights(graph, op, np.asarray(op.weight))
    return graph.node("Gemm", [inputs[0], w, *([bias] if bias else [])], f"{op.name}/gemm", transB=1)


def _avg_pool(graph: _Graph, op: QAvgPool, inputs: list[str]) -> str:
    if op.kernel_size is None:
        return graph.node("GlobalAveragePool", inputs, f"{op.name}/pool")
    return graph.node("AveragePool", inputs, f"{op.name}/pool", kernel_shape=list(op.kernel_size), strides=list(op.stride))


def _max_pool(graph: _Graph, op: QMaxPool, inputs: list[str]) -> str:
    return graph.node("MaxPool", inputs, f"{op.name}/pool", kernel_shape=list(op.kernel_size), strides=list(op.stride),
                      pads=list(op.padding) * 2, ceil_mode=int(op.ceil_mode))


def _lookup(graph: _Graph, op: QLookup, inputs: list[str]) -> str:
    """The activation f of eq. 29 as its float ONNX op (ONNX_ACTIVATIONS)."""
    if op.kind not in ONNX_ACTIVATIONS:
        raise EngineError(f"no float ONNX op for the activation {op.kind!r}")
    return ONNX_ACTIVATIONS[op.kind](graph, inputs[0], op.params, f"{op.name}/{op.kind}")


def _silu(graph: _Graph, x: str, params: dict, name: str) -> str:
    return graph.node("Mul", [x, graph.node("Sigmoid", [x], f"{name}/sigmoid")], name)


# f of a lookup (arith/lookup.py ACTIVATIONS) as float ONNX nodes: (graph, x, params, name) -> output.
ONNX_ACTIVATIONS = {
    "sigmoid": lambda graph, x, params, name: graph.node("Sigmoid", [x], name),
    "hardsigmoid": lambda graph, x, params, name: graph.node("HardSigmoid", [x], name, alpha=1 / 6, beta=0.5),
    "hardswish": lambda graph, x, params, name: graph.node("HardSwish", [x], name),
    "silu": _silu,
    "tanh": lambda graph, x, params, name: graph.node("Tanh", [x], name),
    "gelu": lambda graph, x, params, name: graph.node("Gelu", [x], name, approximate="none"),
    "gelu_tanh": lambda graph, x, params, name: graph.node("Gelu", [x], name, approximate="tanh"),
    "leaky_relu": lambda graph, x, params, name: graph.node("LeakyRelu", [x], name, alpha=float(params["negative_slope"])),
    "hardtanh": lambda graph, x, params, name: graph.node(
        "Clip", [x, graph.const(f"{name}/min", np.float32(params["min"])), graph.const(f"{name}/max", np.float32(params["max"]))], name),
}

# The QDQ lowering: per op class, (graph, op, dequantized float inputs) -> the float output, which
# `_op` then quantizes to the op's output QParams (and clamp) and dequantizes for its readers.
LOWERING = {
    QConv2d: _conv,
    QLinear: _linear,
    QAdd: lambda graph, op, inputs: graph.node("Add", inputs, f"{op.name}/add"),
    QConcat: lambda graph, op, inputs: graph.node("Concat", inputs, f"{op.name}/concat", axis=1),
    QMul: lambda graph, op, inputs: graph.node("Mul", inputs, f"{op.name}/mul"),
    QAvgPool: _avg_pool,
    QMaxPool: _max_pool,
    QFlatten: lambda graph, op, inputs: graph.node("Flatten", inputs, f"{op.name}/flatten", axis=1),
    QReLU: lambda graph, op, inputs: graph.node("Relu", inputs, f"{op.name}/relu"),
    QLookup: _lookup,
    QChannelGather: lambda graph, op, inputs: graph.node(
        "Gather", [inputs[0], graph.const(f"{op.name}/indices", np.asarray(op.indices, np.int64))], f"{op.name}/gather", axis=1),
}


def _op(graph: _Graph, op, values: dict, qparams: dict) -> str:
    """One op: its float node(s) on the dequantized inputs, then Q/DQ to its output QParams."""
    try:
        output = LOWERING[type(op)](graph, op, [values[name] for name in op.inputs])
        bounds = op.bounds() if isinstance(op, Requantizing) else None  # a transparent op keeps its input's codes
        return quantized(graph, output, qparams[op.name], bounds, op.name)
    except EngineError as err:
        raise EngineError(f"onnx_qdq: layer {op.name}: {err}") from None


def input_note(model: IntegerModel) -> str:
    """What the graph's input is, for its doc_string and metadata."""
    channels, height, width = model.input.shape
    return (f"input `input` float32 (N, {channels}, {height}, {width}), preprocessed "
            f"{model.input.preprocessing.describe()} (p the uint8 pixel); output `logits` float32, dequantized")


def export_qdq(model: IntegerModel, example: torch.Tensor | None = None) -> bytes:
    """The model as a serialised QDQ ONNX ModelProto (opset 21) for float inputs of the shape it was
    calibrated at; EngineError naming the layer for a value wider than 16 bits or an activation
    without a float ONNX op."""
    onnx = require("onnx", "exporting ONNX")
    from onnx import TensorProto, helper

    if example is None:
        example = torch.zeros((1, *model.input.shape), dtype=torch.uint8)
    graph, qparams, shapes = _Graph(), model.value_qparams(), value_shapes(model, example)
    input_qp = model.input.qparams
    try:
        values = {model.input_name: quantized(graph, "input", input_qp, (input_qp.dtype.qmin, input_qp.dtype.qmax), "input")}
    except EngineError as err:
        raise EngineError(f"onnx_qdq: the model input: {err}") from None
    for op in model.layers:
        values[op.name] = _op(graph, op, values, qparams)
    graph.node("Identity", [values[model.output_name]], "logits")
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *model.input.shape])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *shapes[model.output_name]])]
    onnx_graph = helper.make_graph(graph.nodes, "intq_qdq", inputs, outputs, graph.initializers, doc_string=input_note(model))
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="intq",
                              doc_string=input_note(model))
    spec = model.input.preprocessing.for_channels(model.input.channels)
    helper.set_model_props(proto, {"input": input_note(model), "mean": repr(list(spec.mean)), "std": repr(list(spec.std))})
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


class QdqModel:
    """Callable: uint8 pixels -> the model's output integers, through the QDQ graph in ONNX Runtime:
    pixels preprocessed in float32 (Preprocessing.apply), the float logits back to integers
    q = z + round(y / s) (exact: y = s (q - z) in float32 with |q - z| < 2^16)."""

    def __init__(self, model: IntegerModel, threads: int | None = None, optimized_path: str | None = None) -> None:
        onnxruntime = require("onnxruntime", "running ONNX Runtime")
        from intq.executors.onnx_runtime import session_options

        options = session_options(threads)
        if optimized_path:
            options.optimized_model_filepath = optimized_path
        self.contents = export_qdq(model)
        self.session = onnxruntime.InferenceSession(self.contents, options, providers=["CPUExecutionProvider"])
        self.preprocessing, self.out = model.input.preprocessing, model.value_qparams()[model.output_name]

    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        (output,) = self.session.run(["logits"], {"input": self.preprocessing.apply(pixels).contiguous().numpy()})
        return output

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        steps = np.rint(self.logits(pixels).astype(np.float64) / np.asarray(self.out.scale, np.float64))
        return torch.from_numpy(steps.astype(np.int64) + np.asarray(self.out.zero_point, np.int64))
