"""Learned rounding: AdaRound layer by layer, or BRECQ/QDrop block by block (docs/math.md eqs. 38-40).

    model = learned_integer_model(graph, stats, config, images)    # config.rounding.method "adaround" | "brecq"

The nearest-rounded IntegerModel fixes every scale and zero point (the range methods' grids); then,
unit by unit in graph order (units.py), the rounding logits of the unit's layers are fitted with Adam
so that the unit, fed the fake-quantized model's own input to it (the units before it already
rounded), reproduces the float model's output on the calibration images; each weight then takes the
floor or the ceiling of w/s that its logit chose, and `convert` builds an ordinary IntegerModel from
those codes. Float32 on the CPU with ROUNDING_THREADS threads and a seeded generator: the same images,
config and seed give the same integers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from intq.arith.qparams import dequantize
from intq.graph.capture import Graph
from intq.graph.config import QConfig, RoundingConfig
from intq.graph.convert import convert
from intq.graph.integer_model import IntegerModel, QLayer
from intq.calibrate.observers import TensorStats
from intq.progress import progress
from intq.threads import intra_op_threads
from intq.ptq.adaround import LayerRounding, annealed_beta, rounding_regularizer
from intq.ptq.units import Unit, block_units, layer_units, quantization_points, run_nodes, tensors_at

_log = logging.getLogger(__name__)

ROUNDING_THREADS = 1  # fixed (float sums may differ between counts); 2 threads ran 50x slower on a shared 2-core machine
LEARNING_RATE = 1e-2  # Adam on the rounding logits; 1e-3 (the papers', at 10-20k iterations) lost 2.7 points at 2,000 (Net W2A8)


@dataclass(frozen=True)
class UnitResult:
    """One unit's reconstruction error (eq. 39's first term, mean over the images) with nearest
    rounding and with the learned choice, and its seconds. Where learning did not lower the error, the
    unit keeps nearest rounding's codes."""

    unit: str
    layers: tuple[str, ...]
    nearest_error: float
    learned_error: float
    seconds: float


@dataclass(frozen=True)
class LearnedRounding:
    codes: dict[str, torch.Tensor]  # weighted layer -> its integer weight codes (int64)
    units: list[UnitResult]
    seconds: float


def reconstruction_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||f(W~ x~) - f(W x)||^2 summed over channels (dim 1), averaged over images and positions (eq. 39)."""
    return (output - target).pow(2).sum(1).mean()


def real_weights(model: IntegerModel) -> dict[str, torch.Tensor]:
    """{weighted layer: s (q_w - z_w)} in float32, the weights the integer model computes with."""
    return {op.name: dequantize(torch.as_tensor(op.weight), op.weight_qparams) for op in model.layers
            if isinstance(op, QLayer)}


def learn_rounding(graph: Graph, nearest: IntegerModel, rounding: RoundingConfig, images: torch.Tensor) -> LearnedRounding:
    """The learned weight codes of every weighted layer of `graph`, given its nearest-rounded IntegerModel
    (the grids and activation QParams) and float preprocessed calibration `images` (the first
    `rounding.images` of them are used)."""
    started = time.perf_counter()
    images = images[: rounding.images].to(torch.float32)
    points = quantization_points(graph, nearest)
    qparams = {op.name: op.weight_qparams for op in nearest.layers if isinstance(op, QLayer)}
    weights = real_weights(nearest)  # each unit's layers are replaced by their learned rounding
    units = block_units(graph, points) if rounding.method == "brecq" else layer_units(graph)
    generator = torch.Generator().manual_seed(rounding.seed)
    codes = {op.name: torch.as_tensor(op.weight).to(torch.int64) for op in nearest.layers if isinstance(op, QLayer)}
    results = []
    with intra_op_threads(ROUNDING_THREADS):
        for index, unit in enumerate(units, 1):
            label = f"{rounding.method} {unit.name} ({index}/{len(units)})"
            roundings = {name: LayerRounding.of(graph.node(name).op.weight, qparams[name]) for name in unit.layers}
            results.append(learn_unit(graph, unit, images, weights, points, roundings, rounding, generator, label))
            if results[-1].learned_error < results[-1].nearest_error:  # else nearest's codes stay
                for name, layer in roundings.items():
                    codes[name] = layer.codes()
                    weights[name] = layer.real(layer.hard_up()).detach()
            _log.info(f"{label}: reconstruction error {results[-1].nearest_error:.4g} (nearest) -> "
                      f"{results[-1].learned_error:.4g} (learned) in {results[-1].seconds:.1f} s")
    return LearnedRounding(codes, results, time.perf_counter() - started)


def learn_unit(graph: Graph, unit: Unit, images: torch.Tensor, weights: dict[str, torch.Tensor], points,
               roundings: dict[str, LayerRounding], rounding: RoundingConfig, generator: torch.Generator,
               label: str) -> UnitResult:
    """Fit the `roundings` of the unit's layers (fit) on its data in the model with `weights` (the units
    before it learned, the rest nearest); the unit's error with nearest's weights and with the learned
    choice, measured on every image without dropping."""
    started = time.perf_counter()
    data = unit_data(graph, unit, images, weights, points)
    inner = points if rounding.method == "brecq" else None  # BRECQ/QDrop: activation quantization in the loop
    nearest_error = unit_error(unit, data, {name: weights[name] for name in unit.layers}, inner)
    if nearest_error == 0:  # nearest rounding reproduces the unit: nothing to learn
        return UnitResult(unit.name, unit.layers, 0.0, 0.0, time.perf_counter() - started)
    fit(unit, data, roundings, inner, rounding, generator, label, nearest_error)
    learned = {name: layer.real(layer.hard_up()).detach() for name, layer in roundings.items()}
    return UnitResult(unit.name, unit.layers, nearest_error, unit_error(unit, data, learned, inner),
                      time.perf_counter() - started)


@dataclass(frozen=True)
class UnitData:
    """A unit's input in the fake-quantized model (`quantized`) and in the float model (`real`), and
    its float output (`target`), on every calibration image."""

    quantized: torch.Tensor
    real: torch.Tensor
    target: torch.Tensor


def unit_data(graph: Graph, unit: Unit, images: torch.Tensor, weights: dict[str, torch.Tensor], points) -> UnitData:
    real = tensors_at(graph, images, {unit.input, unit.output}, {}, None)
    quantized = tensors_at(graph, images, {unit.input}, weights, points)
    return UnitData(quantized[unit.input], real[unit.input], real[unit.output])


def run_unit(unit: Unit, x: torch.Tensor, weights: dict[str, torch.Tensor], points, drop: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The unit's output on input `x`, its own quantization left out (eq. 39-40)."""
    values = run_nodes(unit.nodes, {unit.input: x}, weights, points, unquantized=unit.output, drop=drop,
                       generator=generator)
    return values[unit.output]


def unit_error(unit: Unit, data: UnitData, weights: dict[str, torch.Tensor], points, batch: int = 256) -> float:
    """The reconstruction error (eq. 39) of the unit with `weights` on all its images, no dropping."""
    total, count = 0.0, len(data.quantized)
    with torch.no_grad():
        for start in range(0, count, batch):
            output = run_unit(unit, data.quantized[start : start + batch], weights, points)
            total += float(reconstruction_error(output, data.target[start : start + batch])) * len(output)
    return total / count


def fit(unit: Unit, data: UnitData, roundings: dict[str, LayerRounding], points, rounding: RoundingConfig,
        generator: torch.Generator, label: str, nearest_error: float) -> None:
    """`rounding.iterations` Adam steps on the logits of the unit's layers: batches of
    `rounding.batch_size` images drawn with `generator`; the loss is eq. 39's reconstruction error
    relative to nearest rounding's (`nearest_error`), plus lambda times the mean of its regularizer
    over the weights that may move, after the warm-up; with `points` (BRECQ), activations are
    fake-quantized in the unit and both they and its input are dropped to float with probability
    `rounding.drop` (eq. 40)."""
    optimizer = torch.optim.Adam([layer.logits for layer in roundings.values()], lr=LEARNING_RATE)
    drop = rounding.drop if points is not None else 0.0
    count = len(data.quantized)
    free = sum(int(layer.free.sum()) for layer in roundings.values())
    for iteration in progress(range(rounding.iterations), label):
        index = torch.randint(count, (min(rounding.batch_size, count),), generator=generator)
        x = data.quantized[index]
        if drop:
            x = torch.where(torch.rand(x.shape, generator=generator) < drop, data.real[index], x)
        weights = {name: layer.real(layer.soft()) for name, layer in roundings.items()}
        output = run_unit(unit, x, weights, points, drop, generator)
        loss = reconstruction_error(output, data.target[index]) / nearest_error
        beta = annealed_beta(iteration, rounding.iterations)
        if beta is not None and rounding.regularization:
            penalty = sum(rounding_regularizer(layer.soft(), beta) for layer in roundings.values())
            loss = loss + rounding.regularization * penalty / free
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def learned_integer_model(graph: Graph, stats: dict[str, TensorStats], config: QConfig, images: torch.Tensor,
                          metadata: dict | None = None) -> tuple[IntegerModel, LearnedRounding | None]:
    """(the IntegerModel under `config`, the learning's record or None): with nearest rounding, `convert`;
    with learned rounding, the nearest model's grids, then learn_rounding on the float preprocessed
    `images`, then `convert` with the learned codes (an ordinary IntegerModel, its metadata naming
    the rounding, iterations, seed and images)."""
    if not config.rounding.learned:
        return convert(graph, stats, config, metadata), None
    nearest = convert(graph, stats, replace(config, rounding=RoundingConfig()), metadata)
    learned = learn_rounding(graph, nearest, config.rounding, images)
    rounding = config.rounding
    record = {"rounding": rounding.method, "rounding_iterations": rounding.iterations, "rounding_seed": rounding.seed,
              "rounding_images": min(rounding.images, len(images))}
    return convert(graph, stats, config, {**(metadata or {}), **record}, learned.codes), learned
