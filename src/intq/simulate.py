"""Fake-quant float simulation: the float model with quantize-dequantize where integers would be.

Two uses: the weight-only stages (int weights, float activations and biases), and the oracle for
the reference executor (the same IntegerModel computed in float: dequantize, float op, quantize).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from intq.capture import Graph
from intq.config import WeightConfig
from intq.convert import weight_qparams
from intq.executors.reference import pixels_to_input, run_op
from intq.integer_model import IntegerModel, QAdd, QAvgPool, QLayer
from intq.qparams import dequantize, quantize


def fake_quant_weights(graph: Graph, config: WeightConfig) -> Graph:
    """A copy of `graph` whose weights are dequantize(quantize(w)); biases stay float."""
    graph = copy.deepcopy(graph)
    for node in graph.weighted():
        qparams = weight_qparams(node.op.weight, config.for_layer(node.name))
        node.op.weight = dequantize(quantize(node.op.weight, qparams), qparams)
    return graph


def _real_weight_and_bias(layer: QLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = dequantize(torch.as_tensor(layer.weight), layer.weight_qparams, torch.float64)
    if layer.bias is None:
        return weight, None
    bias_scale = float(layer.input_qparams.scale) * torch.as_tensor(layer.weight_qparams.scale, dtype=torch.float64)
    return weight, torch.as_tensor(layer.bias, dtype=torch.float64) * bias_scale


def simulate_layer(layer: QLayer, x: torch.Tensor) -> torch.Tensor:
    """q_y = quantize(op(dequantize(q_x), dequantize(q_w)) + b), ReLU clamped at z_y.

    In float64, so that a difference from the reference executor can only come from a real value
    within ~1e-9 of a rounding tie, where the reference's 31-bit multiplier M0 * 2^-(31+n)
    (relative error <= 2^-31) and the exact M = s_x s_w / s_y may round apart.
    """
    real_x = dequantize(x, layer.input_qparams, torch.float64)
    weight, bias = (None if t is None else t.to(x.device) for t in _real_weight_and_bias(layer))
    if layer.kind == "conv2d":
        g = layer.geometry
        real_y = F.conv2d(real_x, weight, bias, g["stride"], g["padding"], g["dilation"], g["groups"])
    else:
        real_y = F.linear(real_x, weight, bias)
    lower, upper = layer.bounds()
    return quantize(real_y, layer.output_qparams).clamp(lower, upper)


def simulate_op(op, *xs: torch.Tensor) -> torch.Tensor:
    """The float64 fake-quant twin of any requantizing op: dequantize, compute in float, quantize."""
    if isinstance(op, QLayer):
        return simulate_layer(op, xs[0])
    if isinstance(op, QAdd):
        real = sum(dequantize(x, qp, torch.float64) for x, qp in zip(xs, op.input_qparams))
    else:
        real_x = dequantize(xs[0], op.input_qparams, torch.float64)
        if op.kernel_size is None:
            real = real_x.mean(dim=(2, 3), keepdim=True)
        else:
            real = torch.nn.functional.avg_pool2d(real_x, op.kernel_size, op.stride)
    lower, upper = op.bounds()
    return quantize(real, op.output_qparams).clamp(lower, upper)


def layer_agreement(model: IntegerModel, pixels: torch.Tensor) -> list[dict]:
    """Per QLayer: the reference and the float simulation fed the SAME integer input.

    Returns rows {layer, values, differing, max_lsb}: how many output integers differ and by how
    much (see simulate_layer for the only source of differences).
    """
    rows = []
    values = {model.input_name: pixels_to_input(pixels, model)}
    with torch.no_grad():
        for op in model.layers:
            xs = [values[name] for name in op.inputs]
            values[op.name] = run_op(op, *xs)
            if isinstance(op, (QLayer, QAdd, QAvgPool)):
                simulated = simulate_op(op, *(x.to(torch.int64) for x in xs))
                diff = (simulated - values[op.name].to(torch.int64)).abs()
                rows.append({"layer": op.name, "values": diff.numel(), "differing": int((diff > 0).sum()),
                             "max_lsb": int(diff.max())})
    return rows
