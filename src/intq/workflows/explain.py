"""`intq explain`: how one output integer of one layer comes about, recomputed with Python integers.

The derivation is independent of the executors (exact Python ints, eq. 7-10 of docs/math.md) and is
checked against the reference executor's value for the same element.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

from intq.ptq.equalization import equalize
from intq.graph.capture import Graph, capture, run_float
from intq.graph.convert import fused_relu
from intq.executors.reference import run_integer
from intq.graph.integer_model import IntegerModel, QConv2d, QLayer, QLinear
from intq.cifar.models import MODELS
from intq.workflows.pipeline import weights_path
from intq.cifar.train import Recipe, load_weights


class ExplainError(Exception):
    """A layer or index that does not exist in the model (names it)."""


@dataclass
class Explanation:
    layer: str
    index: tuple[int, ...]
    terms: list[tuple[int, int]]  # (q_w, q_x - z_x) for every input of the window
    acc_without_bias: int
    bias: int
    acc: int
    mantissa: int
    shift: int
    product: int
    rounded: int
    zero_point: int
    lower: int
    upper: int
    final: int
    reference: int
    scale: float
    float_value: float | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def dequantized(self) -> float:
        return self.scale * (self.final - self.zero_point)


def _window(layer: QLayer, x: torch.Tensor, index: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, inputs - z_x) that meet in output element `index`, flattened; x is (C, H, W) or (K,)."""
    return WINDOWS[type(layer)](layer, x, index)


def _linear_window(layer: QLinear, x: torch.Tensor, index: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    (channel,) = index
    return torch.as_tensor(layer.weight).to(torch.int64)[channel], x.to(torch.int64) - int(layer.input_qparams.zero_point)


def _conv_window(layer: QConv2d, x: torch.Tensor, index: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    zero = int(layer.input_qparams.zero_point)
    weight = torch.as_tensor(layer.weight).to(torch.int64)
    channel, row, col = index
    g = layer.geometry
    (sh, sw), (ph, pw), (dh, dw) = g["stride"], g["padding"], g["dilation"]
    per_group = weight.shape[0] // g["groups"]
    group = channel // per_group
    centred = x.to(torch.int64) - zero
    centred = torch.nn.functional.pad(centred, (pw, pw, ph, ph))  # padding is real 0: q - z = 0
    kh, kw = weight.shape[2:]
    in_channels = weight.shape[1]
    patch = centred[group * in_channels:(group + 1) * in_channels,
                    row * sh: row * sh + dh * (kh - 1) + 1: dh, col * sw: col * sw + dw * (kw - 1) + 1: dw]
    return weight[channel].reshape(-1), patch.reshape(-1)  # (C_in/g, kh, kw) -> (K,)


# Which inputs and weights meet in one output element, per weighted layer class.
WINDOWS = {QConv2d: _conv_window, QLinear: _linear_window}


def _round_half_away(value: Fraction) -> int:
    magnitude = (abs(value.numerator) * 2 + value.denominator) // (2 * value.denominator)
    return magnitude if value >= 0 else -magnitude


def explain(model: IntegerModel, pixels: torch.Tensor, layer_name: str, index: tuple[int, ...],
            graph: Graph | None = None) -> Explanation:
    """Derive output `index` of `layer_name` for one uint8 image (C, H, W) with Python integers."""
    layer = next((op for op in model.quantized_layers() if op.name == layer_name), None)
    if layer is None:
        names = ", ".join(op.name for op in model.quantized_layers())
        other = next((op for op in model.layers if op.name == layer_name), None)
        kind = f" ({layer_name!r} is a {type(other).__name__}: explain derives conv and linear outputs)" if other else ""
        raise ExplainError(f"no conv/linear layer {layer_name!r} in the model{kind}; layers: {names}")
    values = {}
    run_integer(model, pixels[None], visit=lambda name, value: values.__setitem__(name, value[0]))
    output = values[layer.name]
    if len(index) != output.dim() or any(not 0 <= i < n for i, n in zip(index, output.shape)):
        raise ExplainError(f"index {','.join(map(str, index))} is outside {layer.name}'s output of shape "
                           f"{'x'.join(map(str, output.shape))}")
    weights, inputs = _window(layer, values[layer.inputs[0]], index)
    terms = list(zip(weights.tolist(), inputs.tolist()))
    channel = index[0]
    acc_without_bias = sum(w * x for w, x in terms)
    bias = int(layer.bias[channel]) if layer.bias is not None else 0
    acc = acc_without_bias + bias
    mantissa, shift = int(layer.mantissa[channel]), int(layer.shift[channel])
    product = acc * mantissa
    rounded = _round_half_away(Fraction(product, 2 ** (31 + shift)))
    out = layer.output_qparams
    zero = int(out.zero_point)
    lower, upper = layer.bounds()
    final = min(max(zero + rounded, lower), upper)
    result = Explanation(layer.name, index, terms, acc_without_bias, bias, acc, mantissa, shift, product, rounded,
                         zero, lower, upper, final, int(output[index]), float(out.scale))
    if graph is not None:
        result.float_value = _float_value(graph, layer.name, pixels, index)
    result.lines = describe(result, layer)
    return result


def _float_value(graph: Graph, name: str, pixels: torch.Tensor, index: tuple[int, ...]) -> float:
    relu = fused_relu(graph, graph.node(name))
    values = {}
    with torch.no_grad():
        run_float(graph, graph.preprocessing.apply(pixels[None]), lambda n, v: values.__setitem__(n, v[0]))
    return float(values[relu.name if relu else name][index])


def describe(e: Explanation, layer: QLayer) -> list[str]:
    """The derivation as text, one step per line."""
    where = ",".join(map(str, e.index))
    products = [w * x for w, x in e.terms]
    shown = ", ".join(f"{w}*({x})" for w, x in e.terms[:6]) + (", ..." if len(e.terms) > 6 else "")
    total_shift = 31 + e.shift
    lines = [
        f"{e.layer}[{where}]  ({layer.LABEL}, input {layer.input_qparams.dtype.name} zero point "
        f"{int(layer.input_qparams.zero_point)}, weights {layer.weight_qparams.dtype.name})",
        f"inputs and weights: {len(e.terms)} pairs q_w * (q_x - z_x): {shown}",
        f"  products: min {min(products)}, max {max(products)}, {sum(p != 0 for p in products)} non-zero",
        f"sum of products          = {e.acc_without_bias}",
        f"+ bias q_b (int32)       = {e.bias}",
        f"acc (int32)              = {e.acc}   (proven |acc| <= {layer.accumulator_bound})",
        f"multiplier M0 * 2^-(31+n) = {e.mantissa} * 2^-{total_shift} = {e.mantissa / 2 ** total_shift:.9g}",
        f"acc * M0 (int64)         = {e.product}",
        f"rounding shift >> {total_shift:<7} = {e.product / 2 ** total_shift:.4f} -> {e.rounded} (half away from zero)",
        f"+ zero point z_y         = {e.zero_point + e.rounded}",
        f"clamp to [{e.lower}, {e.upper}]{' (ReLU: lower = z_y)' if layer.relu else ''} = {e.final}",
        f"reference executor       = {e.reference}   ({'agrees' if e.reference == e.final else 'DISAGREES'})",
        f"dequantized s_y (q - z)  = {e.scale:.6g} * ({e.final} - {e.zero_point}) = {e.dequantized:.6g}",
    ]
    if e.float_value is not None:
        lines.append(f"float model              = {e.float_value:.6g}   (error {e.dequantized - e.float_value:+.3g})")
    return lines


def cached_float_graph(model: IntegerModel, data, cache_dir) -> Graph | None:
    """The float model the integer model came from, when its trained weights are in the cache (equalized,
    eq. 36, when the integer model was: its layers then carry the equalized channels' values)."""
    name, seed = model.metadata.get("model"), model.metadata.get("seed")
    if name not in MODELS or seed is None:
        return None
    float_model = MODELS[name]()
    if load_weights(float_model, weights_path(name, Recipe(), seed, data.train_images, data.train_labels, cache_dir)) is None:
        return None
    graph = capture(float_model.eval(), data.test_images[:2], model.input.preprocessing)
    return equalize(graph) if model.metadata.get("equalization") is True else graph
