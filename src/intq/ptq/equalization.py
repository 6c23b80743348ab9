"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction", section 4.1): for two layers W1 -> f -> W2 with f positively homogeneous
(f(x / s) = f(x) / s for s > 0), dividing output channel i of W1 (and its bias) by s_i and multiplying input
channel i of W2 by s_i computes the same function; s_i = sqrt(r1_i r2_i) / r2_i gives both channels the
range sqrt(r1_i r2_i) (docs/math.md eq. 36), so one per-tensor scale (or a depthwise layer's) fits every
channel. Applied to the captured float graph before calibration; the graph is marked `equalized`.

Between W1 and W2 the chain passes ReLU (not ReLU6, clamp(x, 0, 6) / s != clamp(x / s, 0, 6): intq keeps the
float model exact and does not equalize across it), leaky ReLU, max and average pools, identities, and a
flatten into a Linear that reads one feature per channel (after a global pool). Every tensor on the way must
have one reader and must not be the output. A residual add, a concat, a product, an activation that is not
homogeneous (Hardswish, sigmoid, ...) or a channel gather ends the chain. A depthwise (or grouped) conv is
W2 of one pair and W1 of the next (MobileNet's 1x1 -> 3x3 depthwise -> 1x1): the pairs are equalized in
turn, sweep after sweep, until no scale moves by more than TOLERANCE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from intq.graph.captured_graph import (WEIGHTED, Activation, AvgPool2d, Conv2d, Flatten, Graph, Identity, Linear,
                                       MaxPool2d, Node, ReLU, with_users)

_log = logging.getLogger(__name__)

TOLERANCE = 1e-6  # a sweep whose largest |log s_i| is below this ends the iteration
MAX_SWEEPS = 500


@dataclass(frozen=True)
class Pair:
    """Output channels of `first` are divided by s, the same input channels of `second` multiplied by it."""

    first: str
    second: str


def _homogeneous(op) -> bool:
    """f(x / s) = f(x) / s for every s > 0: ReLU, leaky ReLU, pools, identity (and a flatten, checked apart)."""
    if isinstance(op, ReLU):
        return op.upper is None
    if isinstance(op, Activation):
        return op.kind == "leaky_relu"
    return isinstance(op, (MaxPool2d, AvgPool2d, Identity, Flatten))


def output_channels(op: Conv2d | Linear) -> int:
    return op.weight.shape[0]


def input_channels(op: Conv2d | Linear) -> int:
    return op.weight.shape[1] * (op.groups if isinstance(op, Conv2d) else 1)


def _pair_from(graph: Graph, node: Node) -> Pair | None:
    """The pair whose W1 is `node`: the chain of single-reader homogeneous ops up to the next layer, if any."""
    name, flattened = node.name, False
    while name != graph.output_name and len(graph.users[name]) == 1:
        user = graph.node(graph.users[name][0])
        if isinstance(user.op, WEIGHTED):
            reads_channels = (isinstance(user.op, Linear) if flattened or isinstance(node.op, Linear)
                              else isinstance(user.op, Conv2d))
            fits = reads_channels and input_channels(user.op) == output_channels(node.op)
            return Pair(node.name, user.name) if fits else None
        if not _homogeneous(user.op):
            return None
        flattened |= isinstance(user.op, Flatten)
        name = user.name
    return None


def equalization_pairs(graph: Graph) -> list[Pair]:
    """Every (W1, W2) the chain rules of this module allow, in graph order."""
    return [pair for node in graph.nodes if isinstance(node.op, WEIGHTED) and (pair := _pair_from(graph, node))]


def output_ranges(weight: torch.Tensor) -> torch.Tensor:
    """r1_i = max |W1[i, ...]|, the range of output channel i (eq. 36)."""
    return weight.abs().reshape(weight.shape[0], -1).amax(1)


def input_ranges(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """r2_c = max |W2[o, c, ...]| over the outputs o that read input channel c (eq. 36); for a conv of G
    groups, channel c = g C/G + k is column k of group g's rows. Example: a depthwise weight (C, 1, 3, 3):
    r2_c = max |W2[c]|, the same as its output range."""
    out_channels, per_group = weight.shape[:2]
    grouped = weight.abs().reshape(groups, out_channels // groups, per_group, -1)
    return grouped.amax(dim=(1, 3)).reshape(groups * per_group)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s_i = sqrt(r1_i r2_i) / r2_i (eq. 36), so r1_i / s_i = r2_i s_i = sqrt(r1_i r2_i); 1 where either range
    is 0 (a dead channel has nothing to balance). Example: r1 = [4, 1], r2 = [1, 0] -> s = [2, 1]."""
    alive = (r1 > 0) & (r2 > 0)
    return torch.where(alive, torch.sqrt(r1 * r2) / torch.where(alive, r2, 1.0), 1.0)


def scale_outputs(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """(W1[i] / s_i, b1[i] / s_i): W1's output channels divided (eq. 36)."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight / s.reshape(shape), None if bias is None else bias / s


def scale_inputs(weight: torch.Tensor, s: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """W2[o, c] s_c: W2's input channels multiplied (eq. 36), channel c = g C/G + k as in input_ranges."""
    out_channels, per_group = weight.shape[:2]
    grouped = weight.reshape(groups, out_channels // groups, per_group, -1)
    return (grouped * s.reshape(groups, 1, per_group, 1)).reshape(weight.shape)


def equalize(graph: Graph) -> Graph:
    """A copy of `graph` with every equalization pair balanced (eq. 36), iterated to convergence, in
    float64 and rounded once to the weights' dtype; it computes the same function up to that rounding."""
    pairs = equalization_pairs(graph)
    ops = {node.name: node.op for node in graph.nodes if isinstance(node.op, WEIGHTED)}
    weights = {name: op.weight.detach().to(torch.float64) for name, op in ops.items()}
    biases = {name: None if op.bias is None else op.bias.detach().to(torch.float64) for name, op in ops.items()}
    groups = {name: getattr(op, "groups", 1) for name, op in ops.items()}
    sweeps = 0
    for sweeps in range(1, MAX_SWEEPS + 1):
        largest = 0.0
        for pair in pairs:
            first, second = pair.first, pair.second
            s = equalization_scales(output_ranges(weights[first]), input_ranges(weights[second], groups[second]))
            weights[first], biases[first] = scale_outputs(weights[first], biases[first], s)
            weights[second] = scale_inputs(weights[second], s, groups[second])
            largest = max(largest, float(s.log().abs().max()))
        if largest < TOLERANCE:
            break
    _log.info(f"equalization: {len(pairs)} layer pairs, {sweeps} sweeps")
    changed = {pair.first for pair in pairs} | {pair.second for pair in pairs}

    def equalized(node: Node) -> Node:
        if node.name not in changed:
            return node
        op = node.op
        bias = None if biases[node.name] is None else biases[node.name].to(op.bias.dtype)
        return Node(node.name, replace(op, weight=weights[node.name].to(op.weight.dtype), bias=bias), node.inputs)

    return with_users(replace(graph, nodes=[equalized(node) for node in graph.nodes], users={}, equalized=True))

