"""What learned rounding reconstructs, and the differentiable float32 twin of the integer model it
reconstructs it in.

A `Unit` is a run of captured nodes read from one tensor and judged on one tensor: one weighted layer
with its fused ReLU (AdaRound, eq. 39), or a block between two points where the graph narrows to one
quantized tensor, e.g. a residual block from one add+ReLU to the next (BRECQ/QDrop, eq. 40).
`run_nodes` executes nodes in float32 with the given weights and, at every quantization point, the
integer model's activation quantization (a straight-through fake quantizer, eq. 40), optionally
dropped at random (QDrop). The points and their QParams are those of the nearest-rounded
IntegerModel: learned rounding changes weight codes only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from intq.arith.qparams import QParams, round_half_away_from_zero
from intq.graph.capture import Graph, Node, apply_op
from intq.graph.convert import fused_relu, observed_tensors
from intq.graph.integer_model import IntegerModel


MIN_BLOCK_LAYERS = 2  # weighted layers per block at least (BRECQ's block: a residual block's two or three)


@dataclass(frozen=True)
class Unit:
    """Nodes run in order on the tensor `input`, judged on the tensor `output`; `layers` are the
    weighted nodes among them, whose rounding is learned together."""

    name: str
    nodes: tuple[Node, ...]
    input: str
    output: str
    layers: tuple[str, ...]


def quantization_points(graph: Graph, model: IntegerModel) -> dict[str, QParams]:
    """{tensor name: the QParams of the integers the integer model holds there}: the input, and each
    requantizing op's and lookup's quantization point (convert.observed_tensors) with its output QParams."""
    ops = {op.name: op for op in model.layers}
    points = {graph.input_name: model.input.qparams}
    for label, tensor in observed_tensors(graph).items():
        if label != "input":
            points[tensor] = ops[label].output_qparams
    return points


def layer_units(graph: Graph) -> list[Unit]:
    """One unit per weighted layer, with the ReLU fused into it (AdaRound judges f(W x + b), eq. 39)."""
    units = []
    for node in graph.weighted():
        relu = fused_relu(graph, node)
        nodes = (node,) if relu is None else (node, relu)
        units.append(Unit(node.name, nodes, node.inputs[0], nodes[-1].name, (node.name,)))
    return units


def block_units(graph: Graph, points: dict[str, QParams], smallest: int = MIN_BLOCK_LAYERS) -> list[Unit]:
    """The graph cut where it narrows to one quantized tensor: after node i, when the only tensor that
    a later node still reads is node i's own and it is a quantization point (or the output). The runs
    of nodes between cuts are joined, in order, until each holds `smallest` weighted layers (a run
    without one, a pool, joins the next; a short last block joins the one before). Example: ResNet-20
    gives its stem with the first residual block, eight residual blocks, the last with pool and fc;
    the study's Net gives conv1+conv2 and fc1+fc2+fc3."""
    last_read = {graph.input_name: -1}
    for index, node in enumerate(graph.nodes):
        for source in node.inputs:
            last_read[source] = index
    weighted = {node.name for node in graph.weighted()}
    runs, start, start_tensor = [], 0, graph.input_name
    for index, node in enumerate(graph.nodes):
        produced = [graph.input_name] + [n.name for n in graph.nodes[: index + 1]]
        live = {name for name in produced if last_read.get(name, -1) > index}
        if node.name != graph.output_name and (live != {node.name} or node.name not in points):
            continue
        nodes = tuple(graph.nodes[start : index + 1])
        layers = tuple(n.name for n in nodes if n.name in weighted)
        if len(layers) >= smallest or node.name == graph.output_name:
            runs.append(Unit(_block_name(layers), nodes, start_tensor, node.name, layers))
            start, start_tensor = index + 1, node.name
    if len(runs) > 1 and len(runs[-1].layers) < smallest:
        last, before = runs.pop(), runs.pop()
        layers = before.layers + last.layers
        runs.append(Unit(_block_name(layers), before.nodes + last.nodes, before.input, last.output, layers))
    return [unit for unit in runs if unit.layers]


def _block_name(layers: tuple[str, ...]) -> str:
    return layers[0] if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """s (clamp(round(x/s) + z, qmin, qmax) - z) (eq. 6) in the forward pass; in the backward pass the
    gradient of clamp(x, s (qmin - z), s (qmax - z)): 1 inside the range, 0 outside (straight-through,
    eq. 40). Per tensor: activations have one scale and zero point."""
    scale, zero = float(qp.scale), int(qp.zero_point)
    clamped = x.clamp(scale * (qp.dtype.qmin - zero), scale * (qp.dtype.qmax - zero))
    rounded = round_half_away_from_zero(clamped.detach() / scale) * scale
    return clamped + (rounded - clamped).detach()


def dropped(x: torch.Tensor, quantized: torch.Tensor, drop: float, generator: torch.Generator | None) -> torch.Tensor:
    """QDrop (eq. 40): each value kept in float `x` with probability `drop`, else `quantized`."""
    if not drop:
        return quantized
    keep = torch.rand(x.shape, generator=generator) < drop
    return torch.where(keep, x, quantized)


def run_nodes(nodes: tuple[Node, ...] | list[Node], values: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
              points: dict[str, QParams] | None, *, unquantized: str | None = None, drop: float = 0.0,
              generator: torch.Generator | None = None, needed: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Run `nodes` in float32 on `values` (the tensors they read, filled in place), weighted nodes with
    `weights[name]` when given, each output at a quantization point of `points` fake-quantized (None:
    the float model) unless it is `unquantized` (a unit's output: judged before its own quantization),
    with QDrop's `drop`. Stops once every tensor of `needed` is computed."""
    for node in nodes:
        op = replace(node.op, weight=weights[node.name]) if node.name in weights else node.op
        value = apply_op(op, *(values[name] for name in node.inputs))
        if points is not None and node.name in points and node.name != unquantized:
            value = dropped(value, fake_quantize(value, points[node.name]), drop, generator)
        values[node.name] = value
        if needed is not None and needed <= values.keys():
            break
    return values


def tensors_at(graph: Graph, images: torch.Tensor, names: set[str], weights: dict[str, torch.Tensor],
               points: dict[str, QParams] | None, batch: int = 256) -> dict[str, torch.Tensor]:
    """{name: the tensor `name` on every image}, from the float model (`points` None) or its fake-quantized
    twin (the input quantized too), `batch` images at a time, stopping each pass once `names` are computed."""
    parts = {name: [] for name in names}
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            if points is not None:
                x = fake_quantize(x, points[graph.input_name])
            values = run_nodes(graph.nodes, {graph.input_name: x}, weights, points, needed=set(names))
            for name in names:
                parts[name].append(values[name])
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
