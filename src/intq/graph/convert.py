"""Captured float graph + activation statistics + QConfig -> IntegerModel.

Every weighted layer gets int weights, an int32 bias, its input's and output's QParams, one
fixed-point multiplier per output channel, and a proof that its accumulator fits int32.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import numpy as np
import torch

from intq.graph.capture import (Activation, Add, ChannelGather, Concat, Conv2d, Flatten, Graph, Identity, MaxPool2d,
                                Mul, Node, REQUANTIZING, ReLU, WEIGHTED, run_float)
from intq.graph.bias_correction import corrected_bias, input_windows, layer_window
from intq.graph.config import ActivationConfig, QConfig, WeightConfig
from intq.arith.fixed_point import quantize_multipliers
from intq.arith.lookup import MAX_LOOKUP_INPUT_BITS, nonnegative
from intq.arith.preprocessing import Preprocessing, PreprocessingError
from intq.graph.integer_model import (INT32_LIMIT, InputSpec, IntegerModel, QAdd, QAvgPool, QChannelGather, QConcat, QConv2d,
                                QFlatten, QLayer, QLinear, QLookup, QMaxPool, QMul, QReLU, accumulator_bound, add_multipliers,
                                concat_multipliers, mul_multiplier,
                                avg_pool_multiplier, layer_multipliers)
from intq.graph.model_check import ModelCheckError, check_model
from intq.calibrate.observers import TensorObserver, TensorStats, observe
from intq.calibrate.window_means import WindowMeanObserver
from intq.arith.qparams import IntType, QParams, Scheme, choose_qparams, dequantize, quantize, round_half_away_from_zero



class ConversionError(Exception):
    """A layer that cannot become integers (names the layer)."""


def fused_relu(graph: Graph, node: Node) -> Node | None:
    """The ReLU node that is the only user of `node`, if any: it becomes the requantizer's clamp."""
    users = graph.users[node.name]
    if len(users) == 1 and isinstance(graph.node(users[0]).op, ReLU):
        return graph.node(users[0])
    return None


def is_lookup(graph: Graph, node: Node) -> bool:
    """True when the node becomes a lookup table (eq. 29): an Activation, or a clamped ReLU (ReLU6)
    that its producer cannot take as its requantizer's clamp (it follows a max pool, say)."""
    if isinstance(node.op, Activation):
        return True
    if not isinstance(node.op, ReLU) or node.op.upper is None:
        return False
    producer = next((n for n in graph.nodes if n.name == node.inputs[0]), None)  # None: the model input
    return producer is None or not (isinstance(producer.op, REQUANTIZING) and fused_relu(graph, producer) is node)


def quant_point(graph: Graph, name: str) -> str:
    """Where a layer's output is observed: after the ops that commute with quantization.

    Max-pool, flatten, identity and a channel gather commute with a monotone per-tensor quantizer, so the
    range is read after them, on the values the next layer actually consumes (what the study's hooks profiled).
    """
    while len(graph.users.get(name, [])) == 1:
        user = graph.node(graph.users[name][0])
        if not isinstance(user.op, (MaxPool2d, Flatten, Identity, ChannelGather)):
            break
        name = user.name
    return name


def observed_tensors(graph: Graph) -> dict[str, str]:
    """{label: tensor name}: "input", then each requantizing op's and lookup's quantization point, in order."""
    names = {"input": graph.input_name}
    for node in graph.nodes:
        if isinstance(node.op, REQUANTIZING):
            relu = fused_relu(graph, node)
            names[node.name] = quant_point(graph, relu.name if relu else node.name)
        elif is_lookup(graph, node):
            names[node.name] = quant_point(graph, node.name)
    return names


def calibration_batch(batch: object, index: int, preprocessing: Preprocessing) -> torch.Tensor:
    """The float batch the model reads: uint8 pixels (N, C, H, W) preprocessed here, or float32 images
    checked against `preprocessing` (Preprocessing.check_batch: whole pixels in 0..255 under it), so
    data normalised otherwise than declared is refused before any statistics are gathered.
    `index` counts batches from 1 and is named in the ConversionError."""
    where = f"calibration batch {index}"
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.dtype not in (torch.uint8, torch.float32):
        got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ConversionError(f"{where}: expected uint8 pixels or float32 images of shape (N, C, H, W), got {got}")
    try:
        if batch.dtype == torch.uint8:
            return preprocessing.apply(batch)
        if batch.numel():
            preprocessing.check_batch(batch, where)
    except PreprocessingError as err:
        raise ConversionError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
    return batch


def collect_statistics(graph: Graph, batches: Iterable[torch.Tensor]) -> dict[str, TensorStats]:
    """One streaming pass of the float graph over `batches`, observing the input and every layer's
    quantization point: the statistics `convert` needs. Each weighted layer's input also gets the mean of
    the layer's windows (TensorStats.window_means, eq. 37), for bias correction.

    A batch is uint8 pixels (preprocessed with the graph's preprocessing) or float32 images that
    must be what that preprocessing makes of pixels (calibration_batch); a batch that is neither, no
    images at all, or a layer producing NaN/Inf raise ConversionError."""
    windows = input_windows(graph)
    observers = {name: TensorObserver() for name in [*observed_tensors(graph).values(), *windows]}
    window_observers = {name: WindowMeanObserver(layer_windows) for name, layer_windows in windows.items()}
    index = 0

    def visit(name: str, value: torch.Tensor) -> None:
        if name not in observers:
            return
        try:
            observers[name].update(value)
            if name in window_observers:
                window_observers[name].update(value)
        except ValueError as err:  # NaN or Inf from a layer: name it rather than fail deep inside
            raise ConversionError(f"calibration batch {index}: tensor {name!r}: {err}") from None

    with torch.no_grad():
        for index, batch in enumerate(batches, 1):
            batch = calibration_batch(batch, index, graph.preprocessing)
            if batch.numel() == 0:
                continue  # nothing to observe (and a 0-image batch cannot be flattened)
            try:
                run_float(graph, batch, visit)
            except RuntimeError as err:  # e.g. 1 channel into a 3-channel conv: torch's message, one line
                reason = " ".join(str(err).split())[:300]
                raise ConversionError(f"calibration batch {index}: the model cannot run on a batch of shape "
                                      f"{tuple(batch.shape)} ({reason})") from None
    if observers[graph.input_name].count == 0:
        raise ConversionError("calibration saw no images (every batch was empty, or there were none)")
    return {name: replace(observer.stats(), window_means=window_observers[name].means())
            if name in window_observers else observer.stats() for name, observer in observers.items()}


def weight_qparams(weight: torch.Tensor, config: WeightConfig) -> QParams:
    """QParams of a weight tensor: per output channel (axis 0) or per tensor, signed; a learned grid
    (config.grid, set by fine-tuning) when it fits the weight and the bit width."""
    dtype = IntType(config.bits, True)
    if config.grid is not None:
        return learned_weight_grid(weight, config.grid, dtype)
    restricted = config.scheme is Scheme.SYMMETRIC
    if not config.per_channel:
        lo, hi = config.method.range(observe(weight), dtype, config.scheme)
        return choose_qparams(lo, hi, dtype, config.scheme, restricted=restricted)
    ranges = [config.method.range(observe(channel), dtype, config.scheme) for channel in weight]
    lo, hi = np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])
    return choose_qparams(lo, hi, dtype, config.scheme, restricted=restricted, axis=0)


def learned_weight_grid(weight: torch.Tensor, grid: QParams, dtype: IntType) -> QParams:
    """`grid` if it is a weight grid of `dtype` for `weight`: per tensor, or one scale per output channel
    on axis 0, each finite and > 0; ConversionError otherwise."""
    channels = weight.shape[0]
    shape_ok = grid.axis is None and grid.scale.shape == () or grid.axis == 0 and grid.scale.shape == (channels,)
    if grid.dtype != dtype or not shape_ok or grid.zero_point.shape != grid.scale.shape:
        raise ConversionError(f"learned weight grid {grid.dtype.name} with {grid.scale.shape} scales does not fit a "
                              f"{dtype.name} weight of {channels} output channels")
    if not np.all(np.isfinite(grid.scale) & (grid.scale > 0)):
        raise ConversionError("learned weight grid has a scale that is not a finite number > 0")
    return grid


def activation_qparams(stats: TensorStats, config: ActivationConfig, *, after_relu: bool, is_output: bool,
                       name: str | None = None) -> QParams:
    """QParams of an activation, the output of node `name`: unsigned after a ReLU when configured, else
    signed; its width config.layer_bits' for that node, else the logits' or the activations'."""
    unsigned = after_relu and config.unsigned_after_relu
    bits = dict(config.layer_bits).get(name) or (config.output_bits if is_output and config.output_bits else config.bits)
    dtype = IntType(bits, not unsigned)
    method = config.output_method if is_output and config.output_method else config.method
    lo, hi = method.range(stats, dtype, config.scheme)
    return choose_qparams(lo, hi, dtype, config.scheme)


def input_spec(stats: TensorStats, config: QConfig, preprocessing: Preprocessing) -> InputSpec:
    """The first layer's input (eqs. 26-28). With `config.fold_input`: the exact integers of the
    preprocessing when it has an exact form (the study's x = 2p - 255), else the fine input (a quarter
    pixel step); otherwise the input requantized to the activation QParams of its calibrated range."""
    shape = tuple(stats.shape)  # one image: (C, H, W)
    if len(shape) != 3:
        raise ConversionError(f"the model input has shape {shape} per example; intq takes images (C, H, W)")
    try:
        preprocessing = preprocessing.for_channels(shape[0])
    except PreprocessingError as err:
        raise ConversionError(f"model input: {err}") from None
    if config.fold_input:
        exact = preprocessing.exact_form(shape[0])
        qparams = exact[0] if exact is not None else preprocessing.fine_qparams(shape[0])
        if qparams is not None:
            return InputSpec(qparams, shape, preprocessing)
    qparams = activation_qparams(stats, config.activations, after_relu=False, is_output=False)
    return InputSpec(qparams, shape, preprocessing)


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


def _storage(q: torch.Tensor, dtype: IntType) -> np.ndarray:
    return q.numpy().astype(np.int8 if dtype.signed and dtype.bits <= 8 else np.uint8 if dtype.bits <= 8 else np.int32)


def grid_neighbours(weight: torch.Tensor, qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) = clamp(floor(w/s) + z), clamp(ceil(w/s) + z) to [qmin, qmax], int64, computed in
    float64: the two codes a rounding of w may choose (eq. 38); nearest rounding (eq. 6) picks one."""
    shape = qp.broadcast_shape(weight.dim())
    scale = torch.as_tensor(qp.scale, dtype=torch.float64).reshape(shape)
    zero = torch.as_tensor(qp.zero_point, dtype=torch.int64).reshape(shape)
    ratio = weight.to(torch.float64) / scale
    bounds = qp.dtype.qmin, qp.dtype.qmax
    return ((torch.floor(ratio).to(torch.int64) + zero).clamp(*bounds),
            (torch.ceil(ratio).to(torch.int64) + zero).clamp(*bounds))


def chosen_rounding(codes: torch.Tensor, weight: torch.Tensor, qp: QParams, name: str) -> torch.Tensor:
    """Learned integer weights `codes`, checked: the weight's shape, and each code the floor or the
    ceiling of w/s on the range method's grid (grid_neighbours), never further; ConversionError naming
    the layer otherwise."""
    codes = torch.as_tensor(codes)
    if tuple(codes.shape) != tuple(weight.shape) or codes.is_floating_point():
        raise ConversionError(f"layer {name!r}: learned rounding gave {codes.dtype} {tuple(codes.shape)}, the weight is "
                              f"{tuple(weight.shape)} integers")
    down, up = grid_neighbours(weight, qp)
    codes = codes.to(torch.int64)
    outside = int(((codes != down) & (codes != up)).sum())
    if outside:
        raise ConversionError(f"layer {name!r}: {outside} learned weight codes are neither floor nor ceil of w/s")
    return codes


def convert_layer(node: Node, input_qp: QParams, output_qp: QParams, relu: bool, config: QConfig,
                  input_stats: TensorStats | None = None, rounded: torch.Tensor | None = None) -> QLayer:
    """One Conv2d/Linear -> QLayer: integer weights and bias, multipliers, overflow proof. The weight
    codes are round(w/s) (eq. 6), or `rounded`, a learned choice of floor or ceil of w/s (eq. 38). With
    `config.bias_correction`, the float bias is corrected first (eq. 37) for those codes' error, from
    `input_stats`' window mean."""
    _check_weight(node)
    op = node.op
    weight = op.weight.detach().cpu()  # conversion is offline; the IntegerModel holds numpy arrays
    weights_config = config.weights.for_layer(node.name)
    weight_qp = weight_qparams(weight, weights_config)
    weight_int = quantize(weight, weight_qp) if rounded is None else chosen_rounding(rounded, weight, weight_qp, node.name)
    weight_q = _storage(weight_int, weight_qp.dtype)
    bias = None if op.bias is None else op.bias.detach().cpu()
    if config.bias_correction:
        window_mean = input_stats.window_means.get(layer_window(op)) if input_stats is not None else None
        if window_mean is None:
            raise ConversionError(f"layer {node.name!r}: bias correction needs the mean of the layer's input windows "
                                  f"(eq. 37), which these statistics lack: gather them with collect_statistics")
        bias = corrected_bias(bias, weight, dequantize(weight_int, weight_qp, torch.float64), window_mean,
                              getattr(op, "groups", 1))
    bias_q = quantized_bias(bias, input_qp, weight_qp, node.name)
    channels = op.weight.shape[0]
    mantissa, shift = quantize_multipliers(layer_multipliers(input_qp, weight_qp, output_qp, channels))
    bound = accumulator_bound(weight_q, bias_q, input_qp)
    if bound > INT32_LIMIT:  # refused here, at the layer, before the layers after it are converted
        raise ConversionError(f"layer {node.name!r}: worst-case accumulator {bound} exceeds int32 "
                              f"({weights_config.bits}-bit weights, fan-in {op.weight[0].numel()})")
    if isinstance(op, Conv2d):
        geometry = {"stride": list(op.stride), "padding": list(op.padding), "dilation": list(op.dilation), "groups": op.groups}
        return QConv2d(node.name, node.inputs, weight_q, weight_qp, bias_q, input_qp, output_qp, mantissa, shift, relu,
                       geometry, bound)
    return QLinear(node.name, node.inputs, weight_q, weight_qp, bias_q, input_qp, output_qp, mantissa, shift, relu,
                   {}, bound)


def requantized_output(graph: Graph, node: Node, stats: dict[str, TensorStats], config: QConfig):
    """(output QParams, fused ReLU node or None) of a requantizing op, from its quantization point."""
    relu = fused_relu(graph, node)
    point = quant_point(graph, relu.name if relu else node.name)
    output_qp = activation_qparams(stats[point], config.activations, after_relu=relu is not None,
                                   is_output=point == graph.output_name, name=node.name)
    return output_qp, relu


# The joins: captured op -> (integer op, its real multipliers from the input and output QParams):
# the add's two operands to a common grid and the sum to the output (eq. 17), each concatenated input
# to the output's own QParams (eq. 30), the product's M = s_a s_b / s_y (eq. 34).
JOINED = {Add: (QAdd, add_multipliers), Concat: (QConcat, concat_multipliers), Mul: (QMul, mul_multiplier)}


def convert_requantizing(node: Node, inputs_qp: list[QParams], output_qp: QParams, relu: Node | None,
                         config: QConfig, input_stats: TensorStats | None, rounded: torch.Tensor | None = None):
    """Conv/Linear -> QLayer (its weight codes `rounded` when learned), Add -> QAdd, Concat -> QConcat,
    Mul -> QMul, AvgPool2d -> QAvgPool, with a fused ReLU (or ReLU6)."""
    relu_max = relu.op.upper if relu else None
    if isinstance(node.op, WEIGHTED):
        layer = convert_layer(node, inputs_qp[0], output_qp, relu is not None, config, input_stats, rounded)
        layer.relu_max = relu_max
        return layer
    if type(node.op) in JOINED:
        op_class, multipliers = JOINED[type(node.op)]
        mantissa, shift = quantize_multipliers(multipliers(inputs_qp, output_qp))
        return op_class(node.name, node.inputs, tuple(inputs_qp), output_qp, mantissa, shift, relu is not None, relu_max)
    window = int(np.prod(node.op.kernel_size if node.op.kernel_size else input_stats.shape[1:]))
    mantissa, shift = quantize_multipliers(avg_pool_multiplier(inputs_qp[0], output_qp, window))
    stride = node.op.stride if node.op.kernel_size else None
    return QAvgPool(node.name, node.inputs, node.op.kernel_size, stride, inputs_qp[0], output_qp, mantissa, shift,
                    relu is not None, relu_max)


def _transparent_op(node: Node, sources: tuple[str, ...], qparams: QParams):
    """Max-pool, flatten, a channel gather and an unfused ReLU act on the integers directly, keeping their qparams."""
    if isinstance(node.op, ChannelGather):
        return QChannelGather(node.name, sources, node.op.indices)
    if isinstance(node.op, MaxPool2d):
        return QMaxPool(node.name, sources, node.op.kernel_size, node.op.stride, node.op.padding, node.op.ceil_mode)
    if isinstance(node.op, Flatten):
        return QFlatten(node.name, sources)
    return QReLU(node.name, sources, int(qparams.zero_point))


def convert_lookup(graph: Graph, node: Node, sources: tuple[str, ...], input_qp: QParams,
                   stats: dict[str, TensorStats], config: QConfig) -> QLookup:
    """An activation (or an unfusable ReLU6, hardtanh(0, max)) -> QLookup: its input QParams are its
    producer's, its output a new quantization point with the config's activation QParams (eq. 29)."""
    if isinstance(node.op, ReLU):
        kind, params = "hardtanh", {"min": 0.0, "max": node.op.upper}
    else:
        kind, params = node.op.kind, dict(node.op.params)
    if input_qp.dtype.bits > MAX_LOOKUP_INPUT_BITS:
        raise ConversionError(f"{node.name!r}: lookup tables take inputs of at most {MAX_LOOKUP_INPUT_BITS} bits; "
                              f"its input {sources[0]!r} is {input_qp.dtype.name}")
    point = quant_point(graph, node.name)
    output_qp = activation_qparams(stats[point], config.activations, after_relu=nonnegative(kind, params),
                                   is_output=point == graph.output_name, name=node.name)
    return QLookup(node.name, sources, kind, params, input_qp, output_qp)


def check_layer_names(graph: Graph, config: QConfig) -> None:
    """Every layer named in a per-layer weight width must be a weighted layer of the graph, every node
    named in a per-node activation width one whose output is requantized (or a lookup's)."""
    for kind, named, known in (
            ("bits", config.weights.layer_bits, [node.name for node in graph.weighted()]),
            ("activation bits", config.activations.layer_bits, [node.name for node in graph.nodes if isinstance(
                node.op, REQUANTIZING) or is_lookup(graph, node)])):
        unknown = [name for name, _ in named if name not in known]
        if unknown:
            raise ConversionError(f"per-layer {kind} name unknown layers {', '.join(unknown)}; layers: {', '.join(known)}")


def check_equalization(graph: Graph, config: QConfig) -> None:
    """Equalization (ptq/equalization.py) changes the float graph before its statistics are gathered, so
    convert cannot apply it: the graph must have been equalized exactly when the config asks for it."""
    if config.equalization != graph.equalized:
        done = "was equalized" if graph.equalized else "was not equalized"
        raise ConversionError(f"config {config.name!r} has equalization={config.equalization} but the graph {done}: "
                              f"equalize the captured graph before collect_statistics exactly when the config asks "
                              f"for it (intq.quantize and the commands do)")


def convert(graph: Graph, stats: dict[str, TensorStats], config: QConfig, metadata: dict | None = None,
            rounded: dict[str, torch.Tensor] | None = None) -> IntegerModel:
    """Build the IntegerModel; `stats` holds the observed tensors named by `observed_tensors`.
    `rounded`: {weighted layer: its learned weight codes} (ptq.reconstruction), required by a config
    whose rounding is learned, since learning needs calibration images that convert does not see."""
    check_layer_names(graph, config)
    check_equalization(graph, config)
    if config.rounding.learned and rounded is None:
        raise ConversionError(f"rounding {config.rounding.method!r} learns from calibration images: quantize with "
                              "intq.quantize or workflows.pipeline.quantize_model (convert alone rounds to nearest)")
    rounded = rounded or {}
    spec = input_spec(stats[graph.input_name], config, graph.preprocessing)
    qparams_of = {graph.input_name: spec.qparams}
    alias = {graph.input_name: graph.input_name}
    layers, fused = [], set()
    for node in graph.nodes:
        if node.name in fused:
            continue
        sources = tuple(alias[name] for name in node.inputs)
        alias[node.name] = node.name
        if isinstance(node.op, REQUANTIZING):
            output_qp, relu = requantized_output(graph, node, stats, config)
            inputs_qp = [qparams_of[source] for source in sources]
            op = convert_requantizing(node, inputs_qp, output_qp, relu, config, stats.get(node.inputs[0]),
                                      rounded.get(node.name))
            op.inputs = sources
            layers.append(op)
            if relu:
                fused.add(relu.name)
                alias[relu.name] = node.name
            qparams_of[node.name] = output_qp
        elif is_lookup(graph, node):
            layers.append(convert_lookup(graph, node, sources, qparams_of[sources[0]], stats, config))
            qparams_of[node.name] = layers[-1].output_qparams
        elif isinstance(node.op, (MaxPool2d, Flatten, ReLU, ChannelGather)):
            layers.append(_transparent_op(node, sources, qparams_of[sources[0]]))
            qparams_of[node.name] = qparams_of[sources[0]]
        else:
            alias[node.name] = sources[0]
    switches = {name: True for name in ("equalization", "bias_correction") if getattr(config, name)}
    metadata = {"preset": config.name, **switches, **(metadata or {})}
    model = IntegerModel(graph.input_name, spec, layers, alias[graph.output_name], metadata)
    try:
        check_model(model)  # what a model file must pass, the converter's output passes too
    except ModelCheckError as err:
        raise ConversionError(f"the converted model breaks a rule of integer models: {err}") from None
    return model
