"""`intq sensitivity`: which layer loses the accuracy at a low weight bit width, and a greedy
mixed-precision search that meets an accuracy target with the fewest weight bits.

Everything is integer-only (reference executor, per-channel weights, uint8 post-ReLU activations).
"Only layer L at b bits" keeps the other layers at 8 bits, "all but L" keeps L at 8 bits: 8-bit is
the integer model's stand-in for float. Choices are made on validation images (training images
not used for calibration); the test set only reports the result.

Under --bias-correction and --equalization every model the search evaluates has them (one
calibration of the equalized graph; bias correction costs a conversion's time). A learned rounding
(--rounding adaround|brecq) would cost minutes per candidate, and the search evaluates about
layers x rungs x layers of them, so the search runs with nearest rounding and the rounding is learned
once, on the precision mix it chose; that mix is saved and its validation and test accuracy
reported beside the nearest-rounded mix's. Learned rounding keeps nearest rounding's codes wherever it
does not lower a unit's reconstruction error (ptq.reconstruction), so the mix is expected to keep or
gain accuracy (the report shows both); layers the search kept at more bits than learned rounding
would need are the price of not learning per candidate.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from intq.graph import model_file
from intq.graph.capture import Graph
from intq.executors.reference import run_integer
from intq.files import check_writable, staged_output, write_json
from intq.graph.integer_model import IntegerModel
from intq.workflows.checkpoints import float_accuracy as float_model_accuracy
from intq.workflows.pipeline import Calibrated, calibrated
from intq.workflows.subject import InputOptions, load_data, load_float_model
from intq.workflows.sweep import SweepCell, cell_config
from intq.cifar.train import accuracy, predict

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr

BIT_LADDER = (8, 6, 4, 3, 2)
VALIDATION_IMAGES = 5000


@dataclass(frozen=True)
class SensitivityOptions:
    model: str
    data_dir: str | None
    out_dir: Path
    cache_dir: Path
    seed: int = 0
    bits: int = 2
    abits: int = 8
    method: str = "mse"
    max_drop: float = 1.0  # the greedy search keeps validation accuracy within this of 8-bit
    calib_samples: int = 10_000
    arch: str = "Net"  # the architecture of `model` when it is a checkpoint file
    weights: Path | None = None  # a user model's weights (model = FILE.py:factory or module:attr)
    inputs: InputOptions = InputOptions()  # --size, --channels, --mean/--std
    rounding: str = "nearest"  # learned (adaround, brecq): learned once, on the chosen mix
    rounding_iters: int | None = None  # learned rounding's steps per layer or block (None: RoundingConfig's)
    bias_correction: bool = False  # in every evaluated model
    equalization: bool = False  # in every evaluated model (the calibration is of the equalized graph)


class Evaluator:
    """Integer-only accuracy of one model under per-layer weight bits, on a fixed image set; every model
    with `bias_correction` and, when `calibration` is of the equalized graph, `equalization`."""

    def __init__(self, calibration: Calibrated, method: str, abits: int, pixels: torch.Tensor, labels: torch.Tensor,
                 bias_correction: bool = False, equalization: bool = False):
        self.calibration, self.graph = calibration, calibration.graph
        self.cell = SweepCell(method, "per-channel", 8, abits, bias_correction=bias_correction,
                              equalization=equalization)
        self.pixels, self.labels = pixels, labels
        self.layers = [node.name for node in self.graph.weighted()]

    def model(self, layer_bits: dict[str, int]) -> IntegerModel:
        """The nearest-rounded model under `layer_bits` (the search's)."""
        return self.calibration.integer_model(cell_config(self.cell, tuple(layer_bits.items())))

    def learned_model(self, layer_bits: dict[str, int], rounding: str, iterations: int | None, seed: int,
                      calibration_pixels: torch.Tensor) -> tuple[IntegerModel, float]:
        """(the model under `layer_bits` with the learned `rounding`, learned on the first uint8
        `calibration_pixels` as `intq quantize --rounding` learns; its seconds)."""
        cell = SweepCell(self.cell.method, "per-channel", 8, self.cell.abits, rounding, self.cell.bias_correction,
                         self.cell.equalization)
        start = time.perf_counter()
        model, _ = self.calibration.rounded_model(cell_config(cell, tuple(layer_bits.items()), iterations, seed),
                                                  calibration_pixels)
        return model, time.perf_counter() - start

    def accuracy(self, layer_bits: dict[str, int], pixels: torch.Tensor | None = None, labels=None) -> float:
        return self.measure(self.model(layer_bits), pixels, labels)

    def measure(self, model: IntegerModel, pixels: torch.Tensor | None = None, labels=None) -> float:
        """Top-1 of `model` on `pixels` and `labels` (default: the validation images)."""
        pixels = self.pixels if pixels is None else pixels
        return accuracy(predict(lambda p: run_integer(model, p), pixels), self.labels if labels is None else labels)


def weight_bits_total(graph: Graph, layer_bits: dict[str, int]) -> int:
    """sum over layers of (weights x bits): the ideal size of the weights in bits."""
    return sum(node.op.weight.numel() * layer_bits[node.name] for node in graph.weighted())


def sensitivity_rows(evaluator: Evaluator, bits: int) -> list[dict]:
    """Per layer: accuracy with only it at `bits`, and with all but it at `bits` (others 8-bit)."""
    rows = []
    for layer in evaluator.layers:
        only = {name: bits if name == layer else 8 for name in evaluator.layers}
        all_but = {name: 8 if name == layer else bits for name in evaluator.layers}
        rows.append({"layer": layer, "only_this_layer": evaluator.accuracy(only),
                     "all_but_this_layer": evaluator.accuracy(all_but)})
    return sorted(rows, key=lambda row: row["only_this_layer"])


def greedy_mixed_precision(evaluator: Evaluator, floor: float, log=_log.info) -> tuple[dict[str, int], float]:
    """Lower one layer one rung of BIT_LADDER at a time, always the move that keeps the most
    validation accuracy (ties: the most bits saved), while accuracy stays >= floor."""
    layer_bits = {name: BIT_LADDER[0] for name in evaluator.layers}
    current = evaluator.accuracy(layer_bits)
    while True:
        moves = []
        for layer, bits in layer_bits.items():
            if bits == BIT_LADDER[-1]:
                continue
            trial = {**layer_bits, layer: BIT_LADDER[BIT_LADDER.index(bits) + 1]}
            saved = weight_bits_total(evaluator.graph, layer_bits) - weight_bits_total(evaluator.graph, trial)
            moves.append((evaluator.accuracy(trial), saved, trial))
        feasible = [move for move in moves if move[0] >= floor]
        if not feasible:
            return layer_bits, current
        current, _, layer_bits = max(feasible, key=lambda move: (move[0], move[1]))
        log(f"  {', '.join(f'{k}={v}' for k, v in layer_bits.items())}: validation {current:.2f}%")


def split_indices(count: int, calibration: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint seeded subsets of the training images: (calibration, validation)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    validation = min(VALIDATION_IMAGES, count // 2)
    return order[: min(calibration, count - validation)], order[count - validation :]


def run_sensitivity(options: SensitivityOptions, log=_log.info, render: Callable[[dict, Path], None] | None = None) -> dict:
    """Sensitivity table, greedy mixed precision, and the chosen model, written to options.out_dir
    with sensitivity.json; the report through `render(results, folder)` (None: no report)."""
    start = time.perf_counter()
    out_dir = check_writable(options.out_dir, folder=True)
    data = load_data(options.data_dir, options.cache_dir, options.inputs, download=True, progress=log)
    name, model = load_float_model(options.model, data, options.cache_dir, seed=options.seed, arch=options.arch,
                                   weights=options.weights)
    calibration, validation = split_indices(len(data.train_images), options.calib_samples, options.seed)
    evaluator = Evaluator(calibrated(model, data.train_images[calibration], example=data.train_images,
                                     preprocessing=options.inputs.declared, equalization=options.equalization),
                          options.method, options.abits, data.train_images[validation], data.train_labels[validation],
                          options.bias_correction, options.equalization)
    eight_bit = {layer: 8 for layer in evaluator.layers}
    reference = evaluator.accuracy(eight_bit)
    log(f"{name}: W8A{options.abits} validation accuracy {reference:.2f}%; per-layer sensitivity at {options.bits} bits")
    rows = sensitivity_rows(evaluator, options.bits)
    log(f"greedy mixed precision: keep validation accuracy >= {reference - options.max_drop:.2f}%")
    chosen, validation_accuracy = greedy_mixed_precision(evaluator, reference - options.max_drop, log)
    test = {label: evaluator.accuracy(bits, data.test_images, data.test_labels)
            for label, bits in (("8-bit", eight_bit), ("mixed", chosen),
                                (f"all {options.bits}-bit", {layer: options.bits for layer in evaluator.layers}))}
    final, learned = evaluator.model(chosen), None
    if options.rounding != "nearest":
        log(f"learning {options.rounding} rounding of the chosen mix")
        final, seconds = evaluator.learned_model(chosen, options.rounding, options.rounding_iters, options.seed,
                                                 data.train_images[calibration])
        learned = {"rounding": options.rounding, "seconds": seconds,
                   "validation_accuracy": evaluator.measure(final)}
        test[f"mixed, {options.rounding}"] = evaluator.measure(final, data.test_images, data.test_labels)
    float_accuracy = float_model_accuracy(model, data, options.inputs.declared)
    with staged_output(out_dir) as staging:
        model_bytes = model_file.save(final, staging / f"{name}-mixed.npz")
        results = {"model": name, "bits": options.bits, "abits": options.abits, "method": options.method,
                   "rounding": options.rounding, "bias_correction": options.bias_correction,
                   "equalization": options.equalization,
                   "validation_images": len(validation), "calibration_images": len(calibration),
                   "validation_8bit": reference, "rows": rows, "max_drop": options.max_drop,
                   "mixed": {"layer_bits": chosen, "validation_accuracy": validation_accuracy,
                             "weight_bytes": weight_bits_total(evaluator.graph, chosen) / 8, "file_bytes": model_bytes,
                             "learned": learned},
                   "test_accuracy": {"float": float_accuracy, **test},
                   "timings_s": {"total": time.perf_counter() - start}}
        if render is not None:
            render(results, staging)
        write_json(staging / "sensitivity.json", results)
    return results
