"""Captured float graph + activation statistics + QConfig -> IntegerModel.

Every weighted layer gets int weights, an int32 bias, its input's and output's QParams, one
fixed-point multiplier per output channel, and a proof that its accumulator fits int32.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from intq.capture import WEIGHTED, Conv2d, Flatten, Graph, Identity, MaxPool2d, Node, ReLU, run_float
from intq.config import ActivationConfig, QConfig, WeightConfig
from intq.fixed_point import quantize_multiplier, quantize_multipliers
from intq.integer_model import InputSpec, IntegerModel, QFlatten, QLayer, QMaxPool, QReLU
from intq.observers import TensorObserver, TensorStats, observe
from intq.qparams import IntType, QParams, Scheme, choose_qparams, quantize, round_half_away_from_zero

INT32_LIMIT = 2**31 - 1
PIXEL_INPUT = QParams(np.array(1.0 / 255.0), np.array(0, np.int64), IntType(9, True))  # x = 2p - 255


class ConversionError(Exception):
    """A layer that cannot become integers (names the layer)."""


def fused_relu(graph: Graph, node: Node) -> Node | None:
    """The ReLU node that is the only user of `node`, if any: it becomes the requantizer's clamp."""
    users = graph.users[node.name]
    if len(users) == 1 and isinstance(graph.node(users[0]).op, ReLU):
        return graph.node(users[0])
    return None


def quant_point(graph: Graph, name: str) -> str:
    """Where a layer's output is observed: after the ops that commute with quantization.

    Max-pool, flatten and identity commute with a monotone quantizer, so the range is read after
    them, on the values the next layer actually consumes (what the study's hooks profiled).
    """
    while len(graph.users.get(name, [])) == 1:
        user = graph.node(graph.users[name][0])
        if not isinstance(user.op, (MaxPool2d, Flatten, Identity)):
            break
        name = user.name
    return name


def observed_tensors(graph: Graph) -> dict[str, str]:
    """{label: tensor name}: "input", then each weighted layer's quantization point, in order."""
    names = {"input": graph.input_name}
    for node in graph.weighted():
        relu = fused_relu(graph, node)
        names[node.name] = quant_point(graph, relu.name if relu else node.name)
    return names


def collect_statistics(graph: Graph, batches: Iterable[torch.Tensor]) -> dict[str, TensorStats]:
    """One streaming pass of the float graph over `batches` (normalised float images), observing
    the input and every layer's quantization point: the statistics `convert` needs."""
    observers = {name: TensorObserver() for name in observed_tensors(graph).values()}

    def visit(name: str, value: torch.Tensor) -> None:
        if name in observers:
            observers[name].update(value)

    with torch.no_grad():
        for batch in batches:
            run_float(graph, batch, visit)
    return {name: observer.stats() for name, observer in observers.items()}


def weight_qparams(weight: torch.Tensor, config: WeightConfig) -> QParams:
    """QParams of a weight tensor: per output channel (axis 0) or per tensor, signed."""
    dtype = IntType(config.bits, True)
    restricted = config.scheme is Scheme.SYMMETRIC
    if not config.per_channel:
        lo, hi = config.method.range(observe(weight), dtype, config.scheme)
        return choose_qparams(lo, hi, dtype, config.scheme, restricted=restricted)
    ranges = [config.method.range(observe(channel), dtype, config.scheme) for channel in weight]
    lo, hi = np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])
    return choose_qparams(lo, hi, dtype, config.scheme, restricted=restricted, axis=0)


def activation_qparams(stats: TensorStats, config: ActivationConfig, *, after_relu: bool, is_output: bool) -> QParams:
    """QParams of an activation: unsigned after a ReLU when configured, else signed."""
    unsigned = after_relu and config.unsigned_after_relu
    bits = config.output_bits if is_output and config.output_bits else config.bits
    dtype = IntType(bits, not unsigned)
    method = config.output_method if is_output and config.output_method else config.method
    lo, hi = method.range(stats, dtype, config.scheme)
    return choose_qparams(lo, hi, dtype, config.scheme)


def input_spec(stats: TensorStats, config: QConfig) -> InputSpec:
    """Folded: the first layer reads x = 2p - 255 (scale 1/255). Else requantize x to int (eq. 14)."""
    if config.fold_input:
        return InputSpec(PIXEL_INPUT)
    qparams = activation_qparams(stats, config.activations, after_relu=False, is_output=False)
    mantissa, shift = quantize_multiplier(float(PIXEL_INPUT.scale) / float(qparams.scale))
    return InputSpec(qparams, mantissa, shift)


def _check_weight(node: Node) -> None:
    weight = node.op.weight
    if weight.numel() > 1 and bool((weight == weight.reshape(-1)[0]).all()):
        raise ConversionError(f"layer {node.name!r}: weight tensor is constant (all {weight.numel()} values "
                              f"= {float(weight.reshape(-1)[0]):g}); a trained layer never is, check the checkpoint")


def quantized_bias(bias: torch.Tensor | None, input_qp: QParams, weight_qp: QParams, name: str) -> np.ndarray | None:
    """q_b[c] = round(b[c] / (s_x * s_w[c])), int32, zero point 0 (eq. 15)."""
    if bias is None:
        return None
    scale = torch.as_tensor(float(input_qp.scale) * np.broadcast_to(weight_qp.scale, bias.shape))
    q = round_half_away_from_zero(bias.to(torch.float64) / scale)
    if q.abs().max() > INT32_LIMIT:
        raise ConversionError(f"layer {name!r}: bias does not fit int32 at scale s_x*s_w (|q_b| = {q.abs().max():.3g})")
    return q.numpy().astype(np.int32)


def accumulator_bound(weight_q: np.ndarray, bias_q: np.ndarray | None, input_qp: QParams) -> int:
    """Worst |acc| = max_c (sum_k |q_w[c,k]| * max|q_x - z_x| + |q_b[c]|) (eq. 11)."""
    zero = int(input_qp.zero_point)
    x_max = max(zero - input_qp.dtype.qmin, input_qp.dtype.qmax - zero)
    per_channel = np.abs(weight_q.astype(np.int64)).reshape(weight_q.shape[0], -1).sum(axis=1) * x_max  # (C, K) -> (C,)
    if bias_q is not None:
        per_channel = per_channel + np.abs(bias_q.astype(np.int64))
    return int(per_channel.max())


def _storage(q: torch.Tensor, dtype: IntType) -> np.ndarray:
    return q.numpy().astype(np.int8 if dtype.signed and dtype.bits <= 8 else np.uint8 if dtype.bits <= 8 else np.int32)


def convert_layer(node: Node, input_qp: QParams, output_qp: QParams, relu: bool, config: QConfig) -> QLayer:
    """One Conv2d/Linear -> QLayer: integer weights and bias, multipliers, overflow proof."""
    _check_weight(node)
    op = node.op
    weight = op.weight.detach().cpu()  # conversion is offline; the IntegerModel holds numpy arrays
    weights_config = config.weights.for_layer(node.name)
    weight_qp = weight_qparams(weight, weights_config)
    weight_q = _storage(quantize(weight, weight_qp), weight_qp.dtype)
    bias = None if op.bias is None else op.bias.detach().cpu()
    bias_q = quantized_bias(bias, input_qp, weight_qp, node.name)
    channels = op.weight.shape[0]
    multipliers = float(input_qp.scale) * np.broadcast_to(weight_qp.scale, (channels,)) / float(output_qp.scale)
    mantissa, shift = quantize_multipliers(multipliers)
    bound = accumulator_bound(weight_q, bias_q, input_qp)
    if bound > INT32_LIMIT:
        raise ConversionError(f"layer {node.name!r}: worst-case accumulator {bound} exceeds int32 "
                              f"({weights_config.bits}-bit weights, fan-in {op.weight[0].numel()})")
    geometry = {}
    if isinstance(op, Conv2d):
        geometry = {"stride": list(op.stride), "padding": list(op.padding), "dilation": list(op.dilation), "groups": op.groups}
    kind = "conv2d" if isinstance(op, Conv2d) else "linear"
    return QLayer(node.name, kind, node.inputs, weight_q, weight_qp, bias_q, input_qp, output_qp,
                  mantissa, shift, relu, geometry, bound)


def check_layer_names(graph: Graph, config: QConfig) -> None:
    """Every layer named in a per-layer bit width must be a weighted layer of the graph."""
    known = [node.name for node in graph.weighted()]
    unknown = [name for name, _ in config.weights.layer_bits if name not in known]
    if unknown:
        raise ConversionError(f"per-layer bits name unknown layers {', '.join(unknown)}; layers: {', '.join(known)}")


def convert(graph: Graph, stats: dict[str, TensorStats], config: QConfig, metadata: dict | None = None) -> IntegerModel:
    """Build the IntegerModel; `stats` holds the observed tensors named by `observed_tensors`."""
    check_layer_names(graph, config)
    spec = input_spec(stats[graph.input_name], config)
    qparams_of = {graph.input_name: spec.qparams}
    alias = {graph.input_name: graph.input_name}
    layers, fused = [], set()
    for node in graph.nodes:
        if node.name in fused:
            continue
        source = alias[node.inputs[0]]
        alias[node.name] = node.name
        if isinstance(node.op, WEIGHTED):
            relu = fused_relu(graph, node)
            point = quant_point(graph, relu.name if relu else node.name)
            output_qp = activation_qparams(stats[point], config.activations, after_relu=relu is not None,
                                           is_output=point == graph.output_name)
            layer = convert_layer(node, qparams_of[source], output_qp, relu is not None, config)
            layer.inputs = (source,)
            layers.append(layer)
            if relu:
                fused.add(relu.name)
                alias[relu.name] = node.name
            qparams_of[node.name] = output_qp
        elif isinstance(node.op, MaxPool2d):
            layers.append(QMaxPool(node.name, (source,), node.op.kernel_size, node.op.stride, node.op.padding))
            qparams_of[node.name] = qparams_of[source]
        elif isinstance(node.op, Flatten):
            layers.append(QFlatten(node.name, (source,)))
            qparams_of[node.name] = qparams_of[source]
        elif isinstance(node.op, ReLU):
            layers.append(QReLU(node.name, (source,), int(qparams_of[source].zero_point)))
            qparams_of[node.name] = qparams_of[source]
        else:
            alias[node.name] = source
    metadata = {"preset": config.name, **(metadata or {})}
    return IntegerModel(graph.input_name, spec, layers, alias[graph.output_name], metadata)
