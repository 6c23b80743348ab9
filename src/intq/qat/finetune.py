"""Quantization-aware fine-tuning of a captured graph, and its IntegerModel.

`FakeQuantGraph` runs the captured float graph (BatchNorm folded) with fake quantization where the
integer model has integers: the input on its grid, every weight per channel on the grid of the
config's bits (eq. 6), every bias on the int32 grid s_x s_w (eq. 15), every requantized tensor at its
quantization point (convert.observed_tensors) on its activation grid. It starts from the grids of the
post-training conversion (the `before` IntegerModel) and learns the weights, biases and every step
size (LSQ, qat/fake_quant.py) with the zero points and integer types fixed; the input's grid stays as
the preprocessing or calibration made it.

`integer_model` hands the learned grids to convert: weight grids through WeightConfig.layer_grids,
activation grids as min/max ranges (fake_quant.grid_range) read with MinMax, from which
choose_qparams makes the same QParams again. So the converted model is the fine-tuned one, and the
float64 simulation (executors/simulate.py) is its oracle as for any conversion.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from intq.arith.qparams import QParams, dequantize
from intq.calibrate.observers import TensorStats
from intq.calibrate.ranges import MinMax
from intq.cifar.train import augment
from intq.executors.reference import pixels_to_input
from intq.graph.captured_graph import REQUANTIZING, WEIGHTED, Graph, apply_op, run_float
from intq.graph.config import QConfig, RoundingConfig
from intq.graph.convert import convert, is_lookup, observed_tensors
from intq.graph.integer_model import IntegerModel
from intq.progress import progress
from intq.ptq.reconstruction import learned_integer_model, real_weights
from intq.qat.optimizers import DEFAULT_LR, OPTIMIZERS, make_optimizer
from intq.qat.fake_quant import MIN_STEP, fake_quantize, grid_range, round_ste, step_floor, step_gradient_scale
from intq.threads import intra_op_threads

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr


@dataclass(frozen=True)
class FinetuneOptions:
    """epochs over `images` training images (None: all) in shuffled batches, `optimizer` ("sgd": SGD with
    momentum; "adam": Adam, eq. 46, β1 = momentum) and a cosine learning rate from `lr` for the weights
    and biases (None: the optimizer's DEFAULT_LR, 0.01 for sgd, 0.0001 for adam) and from `step_lr` for
    the step sizes (None: `lr`, as LSQ trains them alike), random shifts and flips when `augment`, on
    `threads` intra-op threads (the result depends on them) from `seed`.
    The loss is cross-entropy with the labels, blended with weight `distill` in [0, 1] with the float
    model's own predictions on the same images (eq. 45; 1: the float model alone is the teacher)."""

    epochs: int = 1
    lr: float | None = None
    batch_size: int = 64
    momentum: float = 0.9
    augment: bool = True
    images: int | None = None
    seed: int = 0
    threads: int = 1
    distill: float = 0.0
    step_lr: float | None = None
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"fine-tuning optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        for name in ("epochs", "batch_size", "threads") + (("images",) if self.images is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fine-tuning {name} must be a whole number of at least 1, got {value!r}")
        rates = ("lr",) + (("step_lr",) if self.step_lr is not None else ())
        for name in (*rates, "momentum"):
            value, rate = getattr(self, name), name in rates
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and (0 < value if rate else 0 <= value < 1)):
                raise ValueError(f"fine-tuning {name} must be a finite number in "
                                 f"{'(0, inf)' if rate else '[0, 1)'}, got {value!r}")
        if isinstance(self.distill, bool) or not isinstance(self.distill, (int, float)) or not 0 <= self.distill <= 1:
            raise ValueError(f"fine-tuning distill must be a number in [0, 1], got {self.distill!r}")


class _Grid(nn.Module):
    """One learned grid: step s (a parameter unless fixed), zero point z and integer type fixed, gradient scale g."""

    def __init__(self, qp: QParams, elements: int, ndim: int, learned: bool) -> None:
        super().__init__()
        shape = qp.broadcast_shape(ndim)
        step = torch.as_tensor(np.asarray(qp.scale), dtype=torch.float32).reshape(shape)
        self.step = nn.Parameter(step) if learned else None
        self.register_buffer("fixed_step", None if learned else step)
        self.register_buffer("floor", step_floor(step) if learned else None)
        self.register_buffer("zero_point", torch.as_tensor(np.asarray(qp.zero_point), dtype=torch.float32).reshape(shape))
        self.qparams, self.g = qp, step_gradient_scale(elements, qp.dtype, qp.zero_point)

    def current_step(self) -> torch.Tensor:
        return self.step if self.step is not None else self.fixed_step

    def hold_floor_(self) -> None:
        """Project a learned step back onto s >= s_min after an update (eq. 44); a fixed step is left alone."""
        if self.step is not None:
            with torch.no_grad():
                torch.maximum(self.step, self.floor, out=self.step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.current_step().to(x.dtype), self.zero_point.to(x.dtype), self.qparams.dtype, self.g)

    def learned_qparams(self) -> QParams:
        """The grid now: the learned scale (float64, at least MIN_STEP) with the original zero point and type."""
        scale = self.current_step().detach().to(torch.float64).clamp_min(MIN_STEP).reshape(self.qparams.scale.shape)
        return replace(self.qparams, scale=scale.numpy().copy())


class FloatGraph(nn.Module):
    """The captured graph in float with its weights and biases as parameters, nothing quantized: the
    float control of fine-tuning (finetune_float), and the learned weights of FakeQuantGraph."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = copy.deepcopy(graph)
        self.weights, self.biases = nn.ParameterDict(), nn.ParameterDict()
        for node in self.graph.weighted():
            key = self._key(node.name)
            self.weights[key] = nn.Parameter(node.op.weight.detach().clone().float())
            if node.op.bias is not None:
                self.biases[key] = nn.Parameter(node.op.bias.detach().clone().float())

    @staticmethod
    def _key(name: str) -> str:
        return "t_" + name.replace(".", "_")

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """What the loop learns: (the weights and biases, the step sizes; none in float)."""
        return [*self.weights.values(), *self.biases.values()], []

    def hold_floors_(self) -> None:
        """Nothing to hold: no step sizes in float."""

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Logits of uint8 `pixels` (N, C, H, W), preprocessed as the graph expects, on the learned weights."""
        x = self.graph.preprocessing.apply(pixels).to(dtype)
        values = {self.graph.input_name: x}
        for node in self.graph.nodes:
            op = node.op
            if isinstance(op, WEIGHTED):
                key = self._key(node.name)
                op = replace(op, weight=self.weights[key].to(dtype),
                             bias=self.biases[key].to(dtype) if key in self.biases else None)
            values[node.name] = apply_op(op, *(values[name] for name in node.inputs))
        return values[self.graph.output_name]

    def learned_graph(self) -> Graph:
        """A copy of the captured graph with the fine-tuned float weights and biases."""
        graph = copy.deepcopy(self.graph)
        for node in graph.weighted():
            key = self._key(node.name)
            node.op.weight = self.weights[key].detach().float().clone()
            node.op.bias = self.biases[key].detach().float().clone() if key in self.biases else None
        return graph


class FakeQuantGraph(FloatGraph):
    """The captured graph with fake quantization on the grids of `start`, the IntegerModel that convert
    made of it: weights and biases are parameters, and every grid's step size but the input's."""

    def __init__(self, graph: Graph, start: IntegerModel) -> None:
        super().__init__(graph)
        self.start = start
        layers = {layer.name: layer for layer in start.layers}
        self.points = {tensor: label for label, tensor in observed_tensors(graph).items()}
        shapes = _example_shapes(graph, start.input.shape)
        self.grids = nn.ModuleDict()  # label -> _Grid; labels are node names and "input"
        for label, tensor in observed_tensors(graph).items():
            qp = start.input.qparams if label == "input" else layers[label].output_qparams
            self.grids[self._key(label)] = _Grid(qp, int(np.prod(shapes[tensor])), len(shapes[tensor]) + 1,
                                                 label != "input")
        self.weight_grids = nn.ModuleDict()
        for node in self.graph.weighted():
            key = self._key(node.name)
            weight, qp = self.weights[key], layers[node.name].weight_qparams
            self.weight_grids[key] = _Grid(qp, weight[0].numel() if qp.axis == 0 else weight.numel(), weight.dim(), True)

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the weights and biases, every learned step size: the activations' but the input's, the weights')."""
        steps = [grid.step for grid in [*self.grids.values(), *self.weight_grids.values()] if grid.step is not None]
        return super().trainable()[0], steps

    def hold_floors_(self) -> None:
        """Every learned step, of activations and weights, projected onto s >= 2^-8 s_0 (eq. 44)."""
        for grid in [*self.grids.values(), *self.weight_grids.values()]:
            grid.hold_floor_()

    def _weighted(self, node, x: torch.Tensor, input_grid: _Grid) -> torch.Tensor:
        """The layer on its fake-quantized weight and bias: w on its grid, b on s_x s_w (eq. 15, scale detached)."""
        key = self._key(node.name)
        grid = self.weight_grids[key]
        weight = grid(self.weights[key].to(x.dtype))
        bias = None
        if key in self.biases:
            step = (input_grid.current_step().reshape(()) * grid.current_step().reshape(-1)).detach().to(x.dtype)
            bias = step * round_ste(self.biases[key].to(x.dtype) / step)
        return apply_op(replace(node.op, weight=weight, bias=bias), x)

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Logits (dequantized) of uint8 `pixels` (N, C, H, W), whose input integers are the integer
        model's (eq. 27), computed in `dtype`."""
        graph = self.graph
        values = {graph.input_name: dequantize(pixels_to_input(pixels, self.start), self.start.input.qparams, dtype)}
        grid_of = {graph.input_name: self.grids[self._key("input")]}
        for node in graph.nodes:
            inputs = [values[name] for name in node.inputs]
            if isinstance(node.op, WEIGHTED):
                value = self._weighted(node, inputs[0], grid_of[node.inputs[0]])
            else:
                value = apply_op(node.op, *inputs)
            if node.name in self.points:
                grid_of[node.name] = self.grids[self._key(self.points[node.name])]
                value = grid_of[node.name](value)
            elif not (isinstance(node.op, REQUANTIZING) or is_lookup(graph, node)):
                grid_of[node.name] = grid_of.get(node.inputs[0])  # moves integers: keeps its input's grid
            values[node.name] = value
        return values[graph.output_name]

    def integer_model(self, stats: dict[str, TensorStats], config: QConfig, metadata: dict | None = None) -> IntegerModel:
        """convert(learned graph) on the learned grids: weight grids as WeightConfig.layer_grids, activation
        grids as the ranges [lo, hi] (grid_range) that MinMax reads and choose_qparams turns back into them."""
        layer_grids = tuple((node.name, self.weight_grids[self._key(node.name)].learned_qparams())
                            for node in self.graph.weighted())
        learned_stats = dict(stats)
        for tensor, label in self.points.items():
            lo, hi = grid_range(self.grids[self._key(label)].learned_qparams(), config.activations.scheme)
            learned_stats[tensor] = replace(stats[tensor], min=float(lo), max=float(hi))
        learned = replace(config, weights=replace(config.weights, layer_grids=layer_grids),
                          activations=replace(config.activations, method=MinMax(), output_method=MinMax()))
        return convert(self.learned_graph(), learned_stats, learned, metadata)


def _example_shapes(graph: Graph, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """One example's shape of every tensor of the graph (the batch dimension dropped), for eq. 43's N."""
    shapes = {}
    with torch.no_grad():
        run_float(graph, torch.zeros((1, *shape)), lambda name, value: shapes.__setitem__(name, tuple(value.shape[1:])))
    return shapes


def _on_chosen_weights(graph: Graph, model: IntegerModel) -> Graph:
    """A copy of `graph` whose weights are those `model` computes with, s (q_w - z_w) (eq. 1): their nearest
    rounding on the same grids gives back q_w, so fine-tuning starts from the learned rounding's choice."""
    chosen = real_weights(model)
    graph = copy.deepcopy(graph)
    for node in graph.weighted():
        node.op.weight = chosen[node.name].to(node.op.weight.dtype).reshape(node.op.weight.shape)
    return graph


@dataclass(frozen=True)
class FineTuned:
    before: IntegerModel  # the post-training conversion the fine-tuning started from
    after: IntegerModel  # the fine-tuned model, converted
    history: list  # per epoch: {epoch, loss}
    fake_quant: FakeQuantGraph  # the fine-tuned fake-quantized graph that `after` was converted from


def finetune(graph: Graph, stats: dict[str, TensorStats], config: QConfig, pixels: torch.Tensor, labels: torch.Tensor,
             options: FinetuneOptions = FinetuneOptions(), metadata: dict | None = None,
             log: Callable[[str], None] = _log.info, rounding_images: torch.Tensor | None = None) -> FineTuned:
    """Convert (the starting point), fine-tune its fake-quantized twin on uint8 `pixels` and `labels`
    (cross-entropy, options), convert again on the learned grids. Seeded: the same inputs, options and
    thread count give the same integers. With a learned `config.rounding`, the starting point is the
    learned rounding on the float preprocessed calibration `rounding_images` (ptq.reconstruction), and the
    fine-tuning starts from the weights it chose, s (q_w - z_w); the result is converted by rounding the
    fine-tuned weights to nearest on their learned grids."""
    teacher = graph  # the float model, whose predictions eq. 45 blends in when options.distill > 0
    if config.rounding.learned:
        if rounding_images is None:
            raise ValueError(f"rounding {config.rounding.method!r} learns from calibration images: pass rounding_images")
        before, _ = learned_integer_model(graph, stats, config, rounding_images, metadata)
        graph = _on_chosen_weights(graph, before)
        config = replace(config, rounding=RoundingConfig())
    else:
        before = convert(graph, stats, config, metadata)
    count = _images_per_epoch(pixels, options)
    with intra_op_threads(options.threads):
        torch.manual_seed(options.seed)
        model = FakeQuantGraph(graph, before)
        history = _train(model, teacher, pixels, labels, count, options, log)
        after = model.integer_model(stats, config, metadata)
    return FineTuned(before, after, history, model)


def padding_pixels(graph: Graph, channels: int) -> torch.Tensor:
    """Per channel, the pixel whose preprocessed value is nearest 0: p = clamp(round(255 mean[c]), 0, 255)
    (eq. 25 solved for x = 0), shape (1, C, 1, 1). Shifted-in borders take it, as training pads with 0."""
    mean = torch.as_tensor(graph.preprocessing.for_channels(channels).mean, dtype=torch.float64)
    return (mean * 255).round().clamp(0, 255).expand(channels).reshape(1, -1, 1, 1).to(torch.float32)


def augment_pixels(pixels: torch.Tensor, generator: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """cifar.train.augment on uint8 pixels, the shifted-in border at `fill` (padding_pixels): still
    uint8 pixels, so the input integers stay the integer model's exact ones."""
    return (augment(pixels.float() - fill, generator) + fill).to(torch.uint8)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      weight: float) -> torch.Tensor:
    """L = (1 - a) CE(logits, labels) + a KL(softmax(t) || softmax(logits)) (eq. 45), a = `weight`,
    both averaged over the batch; the teacher's logits t carry no gradient (None when a = 0)."""
    loss = F.cross_entropy(logits, labels) if weight < 1 else logits.new_zeros(())
    if weight > 0:
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits.detach(), 1), reduction="batchmean",
                      log_target=True)
        loss = (1 - weight) * loss + weight * kl
    return loss


def _images_per_epoch(pixels: torch.Tensor, options: FinetuneOptions) -> int:
    """options.images of `pixels` (all when None or more), checked to fill at least one batch."""
    count = len(pixels) if options.images is None else min(options.images, len(pixels))
    if count < options.batch_size:
        raise ValueError(f"fine-tuning needs at least one batch of {options.batch_size} images, got {count}")
    return count


def finetune_float(graph: Graph, pixels: torch.Tensor, labels: torch.Tensor, options: FinetuneOptions = FinetuneOptions(),
                   log: Callable[[str], None] = _log.info) -> tuple[Graph, list[dict]]:
    """The control for `finetune`: the same loop (options, loss, augmentation, seed, threads) on the float
    graph with nothing quantized, so that a fine-tuned model's accuracy can be told apart from what the
    extra training alone buys. Returns the trained float graph and the per-epoch losses."""
    count = _images_per_epoch(pixels, options)
    with intra_op_threads(options.threads):
        torch.manual_seed(options.seed)
        model = FloatGraph(graph)
        history = _train(model, graph, pixels, labels, count, options, log)
    return model.learned_graph(), history


def _train(model: FloatGraph, teacher: Graph, pixels: torch.Tensor, labels: torch.Tensor, count: int,
           options: FinetuneOptions, log: Callable[[str], None]) -> list[dict]:
    """The loop: options.optimizer at lr(t) = lr / 2 (1 + cos(pi t / T)) over all T steps (the step sizes'
    from step_lr), loss eq. 45 with the float `teacher`'s logits when options.distill > 0; returns the mean
    loss per epoch."""
    weights, step_sizes = model.trainable()
    peaks = (options.lr, options.lr if options.step_lr is None else options.step_lr)
    optimizers = [make_optimizer(options.optimizer, params, peak, options.momentum)
                  for params, peak in zip((weights, step_sizes), peaks)]
    generator = torch.Generator().manual_seed(options.seed)
    fill = padding_pixels(teacher, pixels.shape[1])
    steps = count // options.batch_size
    total, history = options.epochs * steps, []
    for epoch in range(1, options.epochs + 1):
        order, running = torch.randperm(len(pixels), generator=generator)[:count], 0.0
        for step in progress(range(steps), f"fine-tuning epoch {epoch}/{options.epochs}"):
            index = order[step * options.batch_size : (step + 1) * options.batch_size]
            images = pixels[index]
            if options.augment:
                images = augment_pixels(images, generator, fill)
            for optimizer, peak in zip(optimizers, peaks):
                optimizer.lr = peak / 2 * (1 + math.cos(math.pi * ((epoch - 1) * steps + step) / total))
                optimizer.zero_grad()
            teacher_logits = None
            if options.distill > 0:
                with torch.no_grad():
                    teacher_logits = run_float(teacher, teacher.preprocessing.apply(images))
            loss = distillation_loss(model(images), teacher_logits, labels[index], options.distill)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            model.hold_floors_()
            running += float(loss.detach())
        history.append({"epoch": epoch, "loss": running / steps})
        log(f"fine-tuning epoch {epoch}/{options.epochs}: loss {running / steps:.4f}")
    return history
