"""Fake-quant float simulation: the float model with quantize-dequantize where integers would be.

Two uses: the weight-only stages (int weights, float activations and biases), and the oracle for
the reference executor (the same IntegerModel computed in float: dequantize, float op, quantize).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from intq.graph.capture import Graph
from intq.graph.config import WeightConfig
from intq.graph.convert import weight_qparams
from intq.executors.reference import pixels_to_input, run_op
from intq.arith.lookup import activation
from intq.graph.integer_model import IntegerModel, QAdd, QAvgPool, QConcat, QConv2d, QLayer, QLinear, QLookup, QMul
from intq.arith.qparams import dequantize, quantize


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
    return _requantized(layer, REAL_LAYERS[type(layer)](layer, real_x, weight, bias))


# The float twin of each weighted layer class, on real input, weight and bias.
REAL_LAYERS = {
    QConv2d: lambda layer, x, w, b: F.conv2d(x, w, b, layer.geometry["stride"], layer.geometry["padding"],
                                             layer.geometry["dilation"], layer.geometry["groups"]),
    QLinear: lambda layer, x, w, b: F.linear(x, w, b),
}


def _requantized(op, real: torch.Tensor) -> torch.Tensor:
    lower, upper = op.bounds()
    return quantize(real, op.output_qparams).clamp(lower, upper)


def _simulate_add(op: QAdd, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _requantized(op, sum(dequantize(x, qp, torch.float64) for x, qp in zip((a, b), op.input_qparams)))


def _simulate_concat(op: QConcat, *xs: torch.Tensor) -> torch.Tensor:
    """quantize(cat(dequantize(q_i))) to the output's QParams, in float64 (eq. 30 without the multipliers)."""
    real = [dequantize(x, qp, torch.float64) for x, qp in zip(xs, op.input_qparams)]
    return _requantized(op, torch.cat(real, dim=1))  # (N, C_i, H, W) -> (N, sum C_i, H, W)


def _simulate_mul(op: QMul, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """quantize(dequantize(q_a) * dequantize(q_b)) to the output's QParams, in float64 (eq. 34 with the exact M)."""
    real_a, real_b = (dequantize(x, qp, torch.float64) for x, qp in zip((a, b), op.input_qparams))
    return _requantized(op, real_a * real_b)  # (N, C, 1, 1) broadcasts over (N, C, H, W)


def _simulate_avg_pool(op: QAvgPool, x: torch.Tensor) -> torch.Tensor:
    real_x = dequantize(x, op.input_qparams, torch.float64)
    if op.kernel_size is None:
        return _requantized(op, real_x.mean(dim=(2, 3), keepdim=True))
    return _requantized(op, F.avg_pool2d(real_x, op.kernel_size, op.stride))


def _simulate_lookup(op: QLookup, x: torch.Tensor) -> torch.Tensor:
    """quantize(f(dequantize(q_x))) through the activation's own float64 function (eq. 29 without the table)."""
    return _requantized(op, activation(op.kind, op.params, dequantize(x, op.input_qparams, torch.float64)))


# The simulation's lowering: the requantizing op classes (the others move integers exactly, and run
# as the reference runs them).
SIMULATED = {QConv2d: simulate_layer, QLinear: simulate_layer, QAdd: _simulate_add, QConcat: _simulate_concat, QMul: _simulate_mul,
             QAvgPool: _simulate_avg_pool,
             QLookup: _simulate_lookup}


def simulate_op(op, *xs: torch.Tensor) -> torch.Tensor:
    """The float64 fake-quant twin of any requantizing op: dequantize, compute in float, quantize."""
    return SIMULATED[type(op)](op, *xs)


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
            if type(op) in SIMULATED:
                simulated = simulate_op(op, *(x.to(torch.int64) for x in xs))
                diff = (simulated - values[op.name].to(torch.int64)).abs()
                rows.append({"layer": op.name, "values": diff.numel(), "differing": int((diff > 0).sum()),
                             "max_lsb": int(diff.max())})
    return rows
