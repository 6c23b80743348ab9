"""`intq sweep`: every range method x granularity x weight bits x activation bits, integer-only.

One streaming calibration pass feeds every range method (each reads the same observers); each cell
is converted and evaluated on the test set by the reference executor, cells spread over one
process per core.
"""
from __future__ import annotations

import logging
import itertools
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import torch

from intq.calibrate.ranges import MSE, Entropy, MinMax, parse_range_method
from intq.graph.capture import trace
from intq.graph.config import ActivationConfig, QConfig, WeightConfig
from intq.graph.convert import ConversionError, check_layer_names
from intq.executors.reference import run_integer
from intq.files import check_writable, staged_output, write_json
from intq.arith.qparams import Scheme
from intq.cifar.models import ARCHITECTURES, MODELS
from intq.workflows.checkpoints import float_accuracy as float_model_accuracy
from intq.workflows.pipeline import Calibrated, calibrated, calibration_images
from intq.workflows.subject import InputOptions, load_data, load_float_model
from intq.cifar.train import accuracy, predict
from intq.progress import progress

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr

METHODS = ("minmax", "nsigma", "percentile", "mse", "entropy")
WEIGHT_BITS = (8, 6, 4, 3, 2)
ACTIVATION_BITS = (8, 6, 4)
GRANULARITIES = ("per-channel", "per-tensor")
CALIBRATION_IMAGES = 10_000  # the default calibration subset (all training images when there are fewer)


@dataclass(frozen=True)
class SweepCell:
    method: str
    granularity: str
    wbits: int
    abits: int


@dataclass(frozen=True)
class SweepOptions:
    model: str
    data_dir: str | None
    out_dir: Path
    cache_dir: Path
    seed: int = 0
    calib_samples: int | None = None  # None: CALIBRATION_IMAGES, or every training image when there are fewer
    methods: tuple[str, ...] = METHODS
    wbits: tuple[int, ...] = WEIGHT_BITS
    abits: tuple[int, ...] = ACTIVATION_BITS
    granularities: tuple[str, ...] = ("per-channel",)
    layer_bits: tuple[tuple[str, int], ...] = ()  # per-layer weight bits that override --wbits
    arch: str = "Net"  # the architecture of `model` when it is a checkpoint file
    weights: Path | None = None  # a user model's weights (model = FILE.py:factory or module:attr)
    inputs: InputOptions = InputOptions()  # --size, --channels, --mean/--std


class SweepError(Exception):
    """A sweep option that cannot work (names the option)."""


def cell_config(cell: SweepCell, layer_bits: tuple[tuple[str, int], ...] = ()) -> QConfig:
    """The QConfig of one cell: the method ranges weights and activations alike.

    Weights are symmetric (per channel or per tensor), post-ReLU activations uint, the logits int16
    (no layer consumes them), normalisation folded into the first layer. Entropy ranges the
    activations only: a KL fit to a 75-value per-channel weight histogram is noise, so its
    weights use mse.
    """
    method = parse_range_method(cell.method)
    weight_method = MSE() if isinstance(method, Entropy) else method
    # `layer_bits` (mixed precision) overrides cell.wbits for the layers it names.
    weights = WeightConfig(weight_method, Scheme.SYMMETRIC, cell.granularity == "per-channel", cell.wbits, layer_bits)
    activations = ActivationConfig(method, Scheme.ASYMMETRIC, cell.abits, unsigned_after_relu=True,
                                   output_method=MinMax(), output_bits=16)
    name = f"{cell.method} {cell.granularity} W{cell.wbits}A{cell.abits}"
    return QConfig(name, weights, activations, fold_input=True, calibration_samples=None)


def check_options(options: SweepOptions) -> list[SweepCell]:
    """Validate the grid and return its cells; every problem names its option."""
    for method in options.methods:
        try:
            parse_range_method(method)
        except ValueError as err:
            raise SweepError(f"--methods: {err}") from None
    for flag, values in (("--wbits", options.wbits), ("--abits", options.abits)):
        bad = [b for b in values if not 2 <= b <= 8]
        if bad or not values:
            raise SweepError(f"{flag}: bit widths must be 2..8, got {list(values)}")
    bad = [f"{name}={bits}" for name, bits in options.layer_bits if not 2 <= bits <= 8]
    if bad:
        raise SweepError(f"--layer-bits: bit widths must be 2..8, got {', '.join(bad)}")
    names = [name for name, _ in options.layer_bits]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SweepError(f"--layer-bits: layer {', '.join(twice)} named more than once")
    if options.calib_samples is not None and options.calib_samples < 1:
        raise SweepError(f"--calib-samples must be at least 1, got {options.calib_samples}")
    bad = [g for g in options.granularities if g not in GRANULARITIES]
    if bad or not options.granularities:
        raise SweepError(f"--granularity: choose from {', '.join(GRANULARITIES)}, got {list(options.granularities)}")
    return [SweepCell(*combo) for combo in itertools.product(options.methods, options.granularities,
                                                             options.wbits, options.abits)]


def checked_count(option: str, requested: int | None, available: int, what: str, default: int | None = None) -> int:
    """How many of the `available` items (`what`, e.g. "training images") to use.

    An explicit `requested` must be 1..available, never silently clipped; None takes `default`
    (None: all), capped at what there is. Raises SweepError naming the option otherwise.
    """
    if requested is None:
        return available if default is None else min(default, available)
    if requested < 1:
        raise SweepError(f"{option} must be at least 1, got {requested}")
    if requested > available:
        raise SweepError(f"{option} {requested}: there are only {available:,} {what}")
    return requested


def check_layer_bits(options: SweepOptions, cell: SweepCell) -> None:
    """Every layer --layer-bits names must be a conv/linear layer of the model, checked on an
    untrained copy of its architecture (names do not depend on weights), so before any training."""
    if not options.layer_bits:
        return
    architecture = ARCHITECTURES[options.model if options.model in MODELS else options.arch]
    try:
        check_layer_names(trace(architecture().eval()), cell_config(cell, options.layer_bits))
    except ConversionError as err:
        raise SweepError(f"--layer-bits: {err}") from None


def failed_cells(rows: list[dict]) -> str | None:
    """None when every cell converted, else one line: how many failed and the first one's reason."""
    failed = [row for row in rows if row.get("error")]
    if not failed:
        return None
    first = failed[0]
    return (f"{len(failed)} of {len(rows)} cells failed; first {first['method']} {first['granularity']} "
            f"W{first['wbits']}A{first['abits']}: {first['error']}")


_WORKER: dict = {}


def _start_worker(calibration: Calibrated, pixels: torch.Tensor, labels: torch.Tensor,
                  layer_bits: tuple[tuple[str, int], ...]) -> None:
    torch.set_num_threads(1)
    _WORKER.update(calibration=calibration, pixels=pixels, labels=labels, layer_bits=layer_bits)


def evaluate_cell(cell: SweepCell) -> dict:
    """Convert with the cell's config and measure integer-only top-1 accuracy on the test set."""
    row = asdict(cell)
    try:
        model = _WORKER["calibration"].integer_model(cell_config(cell, _WORKER["layer_bits"]))
    except ConversionError as err:
        return {**row, "accuracy": None, "error": str(err)}
    predicted = predict(lambda p: run_integer(model, p), _WORKER["pixels"])
    layers = model.quantized_layers()
    return {**row, "accuracy": accuracy(predicted, _WORKER["labels"]),
            "weight_bytes": sum(layer.weight.size * layer.weight_qparams.dtype.bits for layer in layers) / 8,
            "worst_accumulator": max(layer.accumulator_bound for layer in layers)}


def evaluate_cells(cells: list[SweepCell], calibration: Calibrated, pixels: torch.Tensor,
                   labels: torch.Tensor, layer_bits: tuple = (), log=_log.info) -> list[dict]:
    """Every cell, on one worker process per core; rows come back in cell order."""
    workers = max(1, min(os.cpu_count() or 1, len(cells)))
    rows = []
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(calibration, pixels, labels, layer_bits)) as pool:
        for index, row in enumerate(progress(pool.map(evaluate_cell, cells), "sweep", len(cells)), 1):
            shown = "error" if row["accuracy"] is None else f"{row['accuracy']:.2f}%"
            log(f"[{index}/{len(cells)}] {row['method']} {row['granularity']} W{row['wbits']}A{row['abits']}: {shown}")
            rows.append(row)
    return rows


def run_sweep(options: SweepOptions, log=_log.info, render: Callable[[dict, Path], None] | None = None) -> dict:
    """Run the grid and write sweep.json into options.out_dir, and the report (sweep.html/.md and
    sweep.png from cli's sweep_report.write_sweep_report) through `render(results, folder)`.

    Options, the output folder, the calibration count and --layer-bits names are all checked
    before calibration; when any cell fails to convert, the report is still written and SweepError
    then says how many failed."""
    start = time.perf_counter()
    cells = check_options(options)
    check_layer_bits(options, cells[0])
    out_dir = check_writable(options.out_dir, folder=True)
    data = load_data(options.data_dir, options.cache_dir, options.inputs, download=True, progress=log)
    samples = checked_count("--calib-samples", options.calib_samples, len(data.train_images), "training images",
                            CALIBRATION_IMAGES)
    name, model = load_float_model(options.model, data, options.cache_dir, seed=options.seed, arch=options.arch,
                                   weights=options.weights)
    subset = calibration_images(data.train_images, samples, options.seed)
    log(f"calibrating {name} on {len(subset)} training images (one pass for every method); input "
        f"{options.inputs.describe()}")
    calibration = calibrated(model, subset, example=data.train_images, preprocessing=options.inputs.declared)
    float_accuracy = float_model_accuracy(model, data, options.inputs.declared)
    rows = evaluate_cells(cells, calibration, data.test_images, data.test_labels, options.layer_bits, log)
    for row in rows:
        row["drop"] = None if row["accuracy"] is None else round(float_accuracy - row["accuracy"], 6)
    results = {"model": name, "float_accuracy": float_accuracy, "rows": rows,
               "config": {"seed": options.seed, "calibration_images": len(subset), "data_source": data.source,
                          "test_images": len(data.test_images), "logits": "int16", "weights": "symmetric",
                          "activations": "uint after ReLU, asymmetric otherwise",
                          "layer_bits": dict(options.layer_bits)},
               "timings_s": {"total": time.perf_counter() - start}}
    with staged_output(out_dir) as staging:
        if render is not None:
            render(results, staging)
        write_json(staging / "sweep.json", results)
    failure = failed_cells(rows)
    if failure:  # the report is whole and says which cells failed; the exit status must say so too
        raise SweepError(f"{failure} (sweep.json in {out_dir} lists every cell)")
    return results
