"""`intq sweep`: every range method x granularity x weight bits x activation bits x rounding x bias
correction x equalization x fine-tuning epochs, integer-only.

One streaming calibration pass per equalization value feeds every other axis (each range method reads
the same observers; bias correction reads its window means; learned rounding learns on the first
calibration images; the equalized graph needs its own statistics). Each cell is made (convert, learned
rounding or fine-tuning, timed) and evaluated on the test set by the reference executor, cells spread
over one process per core. A fine-tuned cell learns its weights and biases itself (qat.finetune): it
takes nearest rounding and no bias correction, whatever those axes list, so the grid holds each such
cell once. Learned rounding and fine-tuning are seeded with --seed, as `intq quantize` and `intq
finetune` seed them: the same command gives the same integers.
"""
from __future__ import annotations

import logging
import itertools
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import torch

from intq.calibrate.ranges import MSE, Entropy, MinMax, parse_range_method
from intq.graph.capture import trace
from intq.graph.config import ROUNDINGS, ActivationConfig, QConfig, RoundingConfig, WeightConfig
from intq.graph.convert import ConversionError, check_layer_names
from intq.executors.reference import run_integer
from intq.files import check_writable, staged_output, write_json
from intq.arith.qparams import Scheme
from intq.cifar.models import ARCHITECTURES, MODELS
from intq.qat.finetune import FinetuneOptions, finetune
from intq.workflows.checkpoints import float_accuracy as float_model_accuracy, with_options
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
    rounding: str = "nearest"  # or a learned rounding, ROUNDINGS
    bias_correction: bool = False
    equalization: bool = False
    finetune_epochs: int = 0  # 0: not fine-tuned


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
    roundings: tuple[str, ...] = ("nearest",)
    bias_corrections: tuple[bool, ...] = (False,)
    equalizations: tuple[bool, ...] = (False,)
    finetune_epochs: tuple[int, ...] = (0,)
    rounding_iters: int | None = None  # learned rounding's steps per layer or block (None: RoundingConfig's)
    finetune_lr: float | None = None  # fine-tuning's peak learning rate (None: FinetuneOptions')
    layer_abits: tuple[tuple[str, int], ...] = ()  # per-node activation bits that override --abits
    finetune_distill: float | None = None  # fine-tuning's distillation weight (None: FinetuneOptions')
    finetune_optimizer: str | None = None  # fine-tuning's optimizer (None: FinetuneOptions')


class SweepError(Exception):
    """A sweep option that cannot work (names the option)."""


def cell_config(cell: SweepCell, layer_bits: tuple[tuple[str, int], ...] = (), rounding_iters: int | None = None,
                seed: int = 0, layer_abits: tuple[tuple[str, int], ...] = ()) -> QConfig:
    """The QConfig of one cell: the method ranges weights and activations alike; the cell's bias
    correction, equalization and rounding (learned: `rounding_iters` steps, seeded by `seed`, as
    `intq quantize --rounding R --rounding-iters N --seed S` sets them).

    Weights are symmetric (per channel or per tensor), post-ReLU activations uint, the logits int16
    (no layer consumes them), normalisation folded into the first layer. Entropy ranges the
    activations only: a KL fit to a 75-value per-channel weight histogram is noise, so its
    weights use mse.
    """
    method = parse_range_method(cell.method)
    weight_method = MSE() if isinstance(method, Entropy) else method
    # `layer_bits` (mixed precision) overrides cell.wbits for the layers it names, `layer_abits` cell.abits
    # for the outputs of the nodes it names (e.g. the first layer's output and the last layer's input).
    weights = WeightConfig(weight_method, Scheme.SYMMETRIC, cell.granularity == "per-channel", cell.wbits)
    activations = ActivationConfig(method, Scheme.ASYMMETRIC, cell.abits, unsigned_after_relu=True,
                                   output_method=MinMax(), output_bits=16)
    config = QConfig(describe_cell(asdict(cell)), weights, activations, fold_input=True, calibration_samples=None,
                     equalization=cell.equalization, bias_correction=cell.bias_correction)
    learned = cell.rounding != "nearest"
    return with_options(config, layer_bits, cell.rounding, rounding_iters if learned else None, seed, layer_abits)


def describe_cell(row) -> str:
    """'mse per-channel W4A8', then ' +adaround', ' +bc', ' +cle', ' +ft1' for the methods the cell (or
    its results row; absent fields are nearest, off, off, 0) adds."""
    extras = [f"+{row['rounding']}" if row.get("rounding", "nearest") != "nearest" else "",
              "+bc" * bool(row.get("bias_correction")), "+cle" * bool(row.get("equalization")),
              f"+ft{row['finetune_epochs']}" if row.get("finetune_epochs") else ""]
    return " ".join([f"{row['method']} {row['granularity']} W{row['wbits']}A{row['abits']}", *filter(None, extras)])


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
    for flag, pairs in (("--layer-bits", options.layer_bits), ("--layer-abits", options.layer_abits)):
        bad = [f"{name}={bits}" for name, bits in pairs if not 2 <= bits <= 8]
        if bad:
            raise SweepError(f"{flag}: bit widths must be 2..8, got {', '.join(bad)}")
        names = [name for name, _ in pairs]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise SweepError(f"{flag}: layer {', '.join(twice)} named more than once")
    if options.calib_samples is not None and options.calib_samples < 1:
        raise SweepError(f"--calib-samples must be at least 1, got {options.calib_samples}")
    bad = [g for g in options.granularities if g not in GRANULARITIES]
    if bad or not options.granularities:
        raise SweepError(f"--granularity: choose from {', '.join(GRANULARITIES)}, got {list(options.granularities)}")
    check_method_axes(options)
    combos = itertools.product(options.methods, options.granularities, options.wbits, options.abits, options.roundings,
                               options.bias_corrections, options.equalizations, options.finetune_epochs)
    cells = list(dict.fromkeys(fine_tuned_alone(SweepCell(*combo)) for combo in combos))
    for flag, field, values, word in (("--rounding", "rounding", options.roundings, str),
                                      ("--bias-correction", "bias_correction", options.bias_corrections,
                                       lambda on: "on" if on else "off")):
        unused = [value for value in values if all(getattr(cell, field) != value for cell in cells)]
        if unused:
            raise SweepError(f"{flag} {word(unused[0])}: no cell uses it, since a fine-tuned cell takes nearest "
                             "rounding and no bias correction; add 0 to --finetune-epochs")
    return cells


def check_method_axes(options: SweepOptions) -> None:
    """--rounding, --bias-correction, --equalization and --finetune-epochs each list at least one value;
    each rounding is one of ROUNDINGS, each epoch count 0 or more; --rounding-iters only with a learned
    rounding and --finetune-lr, --finetune-distill, --finetune-optimizer only with fine-tuning, each
    valid. SweepError naming the option."""
    for flag, values in (("--rounding", options.roundings), ("--bias-correction", options.bias_corrections),
                         ("--equalization", options.equalizations), ("--finetune-epochs", options.finetune_epochs)):
        if not values:
            raise SweepError(f"{flag}: give at least one value")
    bad = [r for r in options.roundings if r not in ROUNDINGS]
    if bad:
        raise SweepError(f"--rounding {bad[0]}: choose from {', '.join(ROUNDINGS)}")
    bad = [e for e in options.finetune_epochs if isinstance(e, bool) or not isinstance(e, int) or e < 0]
    if bad:
        raise SweepError(f"--finetune-epochs {bad[0]}: epochs must be whole numbers, 0 (not fine-tuned) or more")
    if options.rounding_iters is not None:
        if all(r == "nearest" for r in options.roundings):
            raise SweepError("--rounding-iters: only with a learned --rounding (adaround, brecq)")
        if isinstance(options.rounding_iters, bool) or options.rounding_iters < 1:
            raise SweepError(f"--rounding-iters must be at least 1, got {options.rounding_iters}")
    for field, value in finetune_given(options).items():
        flag = f"--finetune-{field}"
        if not any(options.finetune_epochs):
            raise SweepError(f"{flag}: only with --finetune-epochs above 0")
        try:
            FinetuneOptions(**{field: value})
        except ValueError as err:
            raise SweepError(f"{flag}: {err}") from None


FINETUNE_FIELDS = ("lr", "distill", "optimizer")  # --finetune-F sets FinetuneOptions.F


def finetune_given(source: SweepOptions | CellInputs) -> dict:
    """The FinetuneOptions fields that --finetune-lr, --finetune-distill, --finetune-optimizer set on
    `source` (its finetune_F attributes); those not given are left to FinetuneOptions' defaults."""
    values = {field: getattr(source, f"finetune_{field}") for field in FINETUNE_FIELDS}
    return {field: value for field, value in values.items() if value is not None}


def fine_tuned_alone(cell: SweepCell) -> SweepCell:
    """A fine-tuned cell with nearest rounding and no bias correction: fine-tuning learns the weights and
    biases on the fake-quantized grids, so rounding is its own and its biases already answer for it."""
    return replace(cell, rounding="nearest", bias_correction=False) if cell.finetune_epochs else cell


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
    """Every layer --layer-bits names must be a conv/linear layer of the model, every node --layer-abits
    names one whose output is requantized, checked on an untrained copy of its architecture (names do
    not depend on weights), so before any training."""
    if not (options.layer_bits or options.layer_abits):
        return
    graph = trace(ARCHITECTURES[options.model if options.model in MODELS else options.arch]().eval())
    for flag, weights, activations in (("--layer-bits", options.layer_bits, ()), ("--layer-abits", (), options.layer_abits)):
        try:
            check_layer_names(graph, cell_config(cell, weights, layer_abits=activations))
        except ConversionError as err:
            raise SweepError(f"{flag}: {err}") from None


def failed_cells(rows: list[dict]) -> str | None:
    """None when every cell converted, else one line: how many failed and the first one's reason."""
    failed = [row for row in rows if row.get("error")]
    if not failed:
        return None
    return f"{len(failed)} of {len(rows)} cells failed; first {describe_cell(failed[0])}: {failed[0]['error']}"


@dataclass(frozen=True)
class CellInputs:
    """What making and evaluating a cell reads, handed once to each worker process."""

    calibrations: dict[bool, Calibrated]  # by equalization: the graph (equalized or not) and its statistics
    test_pixels: torch.Tensor
    test_labels: torch.Tensor
    layer_bits: tuple[tuple[str, int], ...] = ()
    calibration_pixels: torch.Tensor | None = None  # uint8, the first calibration images: learned rounding's
    train_pixels: torch.Tensor | None = None  # uint8 training images and labels: fine-tuning's
    train_labels: torch.Tensor | None = None
    rounding_iters: int | None = None
    seed: int = 0
    finetune_lr: float | None = None
    layer_abits: tuple[tuple[str, int], ...] = ()
    finetune_distill: float | None = None
    finetune_optimizer: str | None = None


def cell_model(cell: SweepCell, inputs: CellInputs):
    """(the cell's IntegerModel, the seconds its method took): convert; learned rounding on the first
    calibration images (Calibrated.rounded_model, as `intq quantize --rounding`); or fine-tuning
    `cell.finetune_epochs` epochs on the training images from that conversion (qat.finetune, as `intq
    finetune`), FinetuneOptions' defaults but those finetune_given sets, seeded, one thread.
    ConversionError if the cell cannot be converted."""
    config = cell_config(cell, inputs.layer_bits, inputs.rounding_iters, inputs.seed, inputs.layer_abits)
    calibration = inputs.calibrations[cell.equalization]
    start = time.perf_counter()
    if cell.finetune_epochs:
        options = FinetuneOptions(cell.finetune_epochs, seed=inputs.seed, threads=1, **finetune_given(inputs))
        model = finetune(calibration.graph, calibration.stats, config, inputs.train_pixels, inputs.train_labels,
                         options, log=_log.debug).after
    else:
        model, _ = calibration.rounded_model(config, inputs.calibration_pixels)
    return model, time.perf_counter() - start


_WORKER: dict = {}


def _start_worker(inputs: CellInputs) -> None:
    torch.set_num_threads(1)
    _WORKER["inputs"] = inputs


def evaluate_cell(cell: SweepCell, inputs: CellInputs | None = None) -> dict:
    """Make the cell's model (cell_model) and measure integer-only top-1 accuracy on the test set."""
    inputs = inputs or _WORKER["inputs"]
    row = asdict(cell)
    try:
        model, seconds = cell_model(cell, inputs)
    except ConversionError as err:
        return {**row, "accuracy": None, "error": str(err)}
    predicted = predict(lambda p: run_integer(model, p), inputs.test_pixels)
    layers = model.quantized_layers()
    return {**row, "accuracy": accuracy(predicted, inputs.test_labels), "method_seconds": round(seconds, 3),
            "weight_bytes": sum(layer.weight.size * layer.weight_qparams.dtype.bits for layer in layers) / 8,
            "worst_accumulator": max(layer.accumulator_bound for layer in layers)}


def evaluate_cells(cells: list[SweepCell], inputs: CellInputs, log=_log.info) -> list[dict]:
    """Every cell, on one worker process per core; rows come back in cell order."""
    workers = max(1, min(os.cpu_count() or 1, len(cells)))
    rows = []
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(inputs,)) as pool:
        for index, row in enumerate(progress(pool.map(evaluate_cell, cells), "sweep", len(cells)), 1):
            shown = "error" if row["accuracy"] is None else f"{row['accuracy']:.2f}% ({row['method_seconds']:.1f} s)"
            log(f"[{index}/{len(cells)}] {describe_cell(row)}: {shown}")
            rows.append(row)
    return rows


def cell_inputs(options: SweepOptions, cells: list[SweepCell], model: torch.nn.Module, data, subset: torch.Tensor,
                log=_log.info) -> CellInputs:
    """One calibration per equalization value the cells use, on the uint8 `subset`; the first
    calibration images when a cell learns its rounding; the training images when a cell fine-tunes
    (at least one batch of them, else SweepError naming --finetune-epochs)."""
    calibrations = {}
    for equalization in sorted({cell.equalization for cell in cells}):
        log(f"calibrating on {len(subset)} training images{' (equalized graph)' * equalization}; input "
            f"{options.inputs.describe()}")
        calibrations[equalization] = calibrated(model, subset, example=data.train_images,
                                                preprocessing=options.inputs.declared, equalization=equalization)
    learned = any(cell.rounding != "nearest" for cell in cells)
    tuned = any(cell.finetune_epochs for cell in cells)
    batch = FinetuneOptions().batch_size
    if tuned and len(data.train_images) < batch:
        raise SweepError(f"--finetune-epochs: fine-tuning needs at least one batch of {batch} training images, "
                         f"there are {len(data.train_images)}")
    return CellInputs(calibrations, data.test_images, data.test_labels, options.layer_bits,
                      subset[: RoundingConfig().images] if learned else None,
                      data.train_images if tuned else None, data.train_labels if tuned else None,
                      options.rounding_iters, options.seed, options.finetune_lr, options.layer_abits,
                      options.finetune_distill, options.finetune_optimizer)


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
    log(f"{name}: {len(cells)} cells")
    inputs = cell_inputs(options, cells, model, data, subset, log)
    float_accuracy = float_model_accuracy(model, data, options.inputs.declared)
    rows = evaluate_cells(cells, inputs, log)
    for row in rows:
        row["drop"] = None if row["accuracy"] is None else round(float_accuracy - row["accuracy"], 6)
    learned = any(cell.rounding != "nearest" for cell in cells)
    tuning = FinetuneOptions(**finetune_given(options))  # what the fine-tuned cells ran
    results = {"model": name, "float_accuracy": float_accuracy, "rows": rows,
               "config": {"seed": options.seed, "calibration_images": len(subset), "data_source": data.source,
                          "test_images": len(data.test_images), "logits": "int16", "weights": "symmetric",
                          "activations": "uint after ReLU, asymmetric otherwise",
                          "layer_bits": dict(options.layer_bits), "layer_abits": dict(options.layer_abits),
                          "rounding_iterations": (options.rounding_iters or RoundingConfig().iterations)
                          if learned else None,
                          **{f"finetune_{field}": getattr(tuning, field) for field in FINETUNE_FIELDS}},
               "timings_s": {"total": time.perf_counter() - start}}
    with staged_output(out_dir) as staging:
        if render is not None:
            render(results, staging)
        write_json(staging / "sweep.json", results)
    failure = failed_cells(rows)
    if failure:  # the report is whole and says which cells failed; the exit status must say so too
        raise SweepError(f"{failure} (sweep.json in {out_dir} lists every cell)")
    return results
