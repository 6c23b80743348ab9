"""The body of each `intq` command: check its arguments, call one workflow and print its results.

cli.py parses the command line and dispatches here; every value it read from argv or the
environment arrives in the parsed arguments (nothing here reads either). The commands that write a
report hand the workflow its renderer, so the report lands in the same all-or-nothing output as
the results. A bad argument is an argparse.ArgumentTypeError: one line, exit status 2."""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import replace
from pathlib import Path


from intq.command_checks import (at_least, bit_width, bit_widths, existing_file, layer_bits, numbers, range_method,
                                  switches, words)
from intq.graph import model_file
from intq.workflows.compare import run_compare
from intq.graph.config import PRESETS, QConfig
from intq.arith.preprocessing import Preprocessing
from intq.graph.integer_model import IntegerModel
from intq.workflows.inspect import InspectOptions, run_inspect
from intq.executors.c_export import export_c
from intq.workflows.explain import cached_float_graph, explain
from intq.extras import require
from intq.files import atomic_write, check_writable, write_json
from intq.cifar.models import MODELS
from intq.workflows.subject import (InputOptions, check_data_fits, check_model_files, inputs_for, load_data, load_float_model,
                                   model_name)
from intq.workflows.checkpoints import integer_accuracy, quantize_checkpoint, train_architecture, with_options
from intq.workflows.sensitivity import SensitivityOptions, run_sensitivity
from intq.workflows.study import StudyOptions, run_study
from intq.workflows.sweep import CALIBRATION_IMAGES, SweepCell, SweepOptions, cell_config, checked_count, run_sweep
from intq.cifar.train import ClassifierRecipe
from intq.executors.verify import path_summary, verify

_log = logging.getLogger(__name__)  # progress messages and debug detail; results are printed to stdout
COMPARE_CALIBRATION_IMAGES = 2000  # compare's default calibration subset
GOLDEN_IMAGES = 4  # export-c's default golden test images


def _cell(args: argparse.Namespace) -> SweepCell | None:
    """The sweep cell that --method, --wbits, --abits and --granularity describe (None: a preset)."""
    if args.method is None:
        return None
    return SweepCell(args.method, args.granularity or "per-channel", 8 if args.wbits is None else args.wbits,
                     8 if args.abits is None else args.abits)


def _config(args: argparse.Namespace) -> QConfig:
    """The preset, or the sweep cell's QConfig when --method is given (options checked first), with
    --equalization and --bias-correction switched on when given.
    --wbits, --abits and --granularity describe a cell: with a preset they are refused, not ignored."""
    switches = {"equalization": args.equalization, "bias_correction": args.bias_correction}
    if args.method is None:
        given = [flag for flag, value in (("--wbits", args.wbits), ("--abits", args.abits),
                                          ("--granularity", args.granularity)) if value is not None]
        if given:
            raise argparse.ArgumentTypeError(f"{', '.join(given)}: only with --method (a sweep cell); "
                                             f"the preset {args.preset} sets its own bits and granularity")
        return replace(PRESETS[args.preset], **switches)
    cell = _cell(args)
    range_method("--method", cell.method)
    bit_width("--wbits", cell.wbits)
    bit_width("--abits", cell.abits)  # --granularity: argparse's choices
    return replace(cell_config(cell), **switches)


def _switches_label(config: QConfig) -> str:
    """'-cle-bc' for a config with equalization and bias correction, '' without them: for file names."""
    return "-cle" * config.equalization + "-bc" * config.bias_correction


def _quantize_config(args: argparse.Namespace) -> QConfig:
    """_config with quantize's --layer-bits, --layer-abits, --rounding and --rounding-iters (seeded by --seed)."""
    try:
        return with_options(_config(args), layer_bits(args.layer_bits), args.rounding, args.rounding_iters, args.seed,
                            layer_bits(args.layer_abits, "--layer-abits"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _dataset(args: argparse.Namespace, inputs: InputOptions = InputOptions()):
    """CIFAR-10 or the user's image folder from --data via --cache, its progress (decoding, a corrupt
    cache rebuilt) logged."""
    _log.debug(f"data {args.data or './data'}, cache {args.cache}")
    data = load_data(args.data, args.cache, inputs, progress=_log.info)
    _log.debug(f"data: {len(data.train_images):,} training and {len(data.test_images):,} test images from {data.source}")
    return data


def _inputs(args: argparse.Namespace) -> InputOptions:
    """--size (H [W], 1..4096), --channels and --mean/--std (given together) as InputOptions."""
    size = numbers("--size", args.size, int)
    if size is not None and (len(size) not in (1, 2) or not all(1 <= side <= 4096 for side in size)):
        raise argparse.ArgumentTypeError(f"--size takes H or H W, each 1..4096, got {' '.join(args.size)}")
    mean, std = numbers("--mean", args.mean), numbers("--std", args.std)
    if (mean is None) != (std is None):
        raise argparse.ArgumentTypeError("--mean and --std go together (the model's x = (p/255 - mean)/std)")
    preprocessing = None if mean is None else Preprocessing(mean, std)
    return InputOptions(None if size is None else (size[0], size[-1]), args.channels, preprocessing)


def _float_model_inputs(args: argparse.Namespace, model: str) -> InputOptions:
    """The InputOptions of a command on a float model. The study's models and intq train checkpoints
    were trained on the study's normalisation: --mean/--std describe a model file's own."""
    inputs = _inputs(args)
    if inputs.preprocessing is not None and (model in MODELS or model.endswith(".npz")):
        raise argparse.ArgumentTypeError(f"--mean/--std: {model} was trained on the study's (p/255 - 0.5)/0.5; they "
                                         "describe your own model's input (--model FILE.py:factory --weights W)")
    check_model_files(model, getattr(args, "weights", None))
    return inputs


def _model_data(args: argparse.Namespace, model: IntegerModel, split: str = "test") -> tuple:
    """(dataset, images of `split`) for an integer model: images of its shape (its own size and
    channels unless --size/--channels say otherwise); --mean/--std, which the model records, must agree."""
    inputs = _inputs(args)
    if inputs.preprocessing is not None and inputs.preprocessing.for_channels(model.input.channels) != model.input.preprocessing:
        raise argparse.ArgumentTypeError(f"--mean/--std: the model records its own preprocessing "
                                         f"({model.input.preprocessing.describe()})")
    data = _dataset(args, inputs_for(model, inputs))
    return data, check_data_fits(data, model, split)


def _load_model(path: Path) -> IntegerModel:
    """The integer model in `path` ('no such file' when there is none)."""
    model = model_file.load(existing_file(path))
    _log.debug(f"integer model {path}: {len(model.layers)} ops, input {model.input.shape}")
    return model


def run_command(args: argparse.Namespace) -> None:
    at_least("--calib-samples", args.calib_samples, 1)
    require("matplotlib", "writing the report")
    from intq.report.study_report import write_report  # reports load matplotlib: only the commands that write one

    options = StudyOptions(args.data, args.out, args.cache, args.seed, args.calib_samples, args.device)
    results = run_study(options, render=write_report)
    print(f"\nresults written to {args.out}/ (results.json, report.html, report.md)")
    for row in results["rows"]:
        preset = row["preset"] or "-"
        print(f"  {row['model']:<12} {row['stage']:<20} {preset:<12} {row['accuracy']:6.2f}%")
    print(f"  total {results['timings_s']['total']:.1f} s")


def sweep_command(args: argparse.Namespace) -> None:
    require("matplotlib", "writing the report")
    from intq.report.sweep_report import write_sweep_report

    inputs = _float_model_inputs(args, args.model)
    options = SweepOptions(args.model, args.data, args.out, args.cache, args.seed, args.calib_samples,
                           words(args.methods), bit_widths(args.wbits), bit_widths(args.abits),
                           words(args.granularity), layer_bits(args.layer_bits), args.arch, args.weights, inputs,
                           words(args.rounding), switches("--bias-correction", args.bias_correction),
                           switches("--equalization", args.equalization),
                           numbers("--finetune-epochs", args.finetune_epochs, int), args.rounding_iters,
                           args.finetune_lr, layer_bits(args.layer_abits, "--layer-abits"), args.finetune_distill,
                           args.finetune_optimizer)
    results = run_sweep(options, render=write_sweep_report)
    print(f"\n{len(results['rows'])} cells written to {args.out}/ (sweep.json, sweep.html, sweep.md, sweep.png); "
          f"float {results['float_accuracy']:.2f}%")


def sensitivity_command(args: argparse.Namespace) -> None:
    require("matplotlib", "writing the report")
    from intq.report.sensitivity_report import write_sensitivity_report

    bit_width("--bits", args.bits)
    bit_width("--abits", args.abits)
    range_method("--method", args.method)
    at_least("--max-drop", args.max_drop, 0)
    try:
        with_options(PRESETS["recommended"], (), args.rounding, args.rounding_iters, args.seed)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    inputs = _float_model_inputs(args, args.model)
    check_writable(args.out, folder=True)
    options = SensitivityOptions(args.model, args.data, args.out, args.cache, args.seed, args.bits, args.abits,
                                 args.method, args.max_drop, arch=args.arch, weights=args.weights, inputs=inputs,
                                 rounding=args.rounding, rounding_iters=args.rounding_iters,
                                 bias_correction=args.bias_correction, equalization=args.equalization)
    results = run_sensitivity(options, render=write_sensitivity_report)
    mixed = results["mixed"]
    print(f"\nmixed precision {mixed['layer_bits']}: {mixed['weight_bytes'] / 1000:.1f} KB of weights; "
          f"test accuracy {results['test_accuracy']}")


def inspect_command(args: argparse.Namespace) -> None:
    require("matplotlib", "writing the report")
    from intq.report.inspect_report import write_inspect_report

    config = _config(args)
    at_least("--images", args.images, 1)
    inputs = _float_model_inputs(args, args.model)
    check_writable(args.out, folder=True)
    options = InspectOptions(args.model, args.data, args.out, args.cache, config, args.seed, args.images,
                             arch=args.arch, weights=args.weights, inputs=inputs)
    results = run_inspect(options, render=write_inspect_report)
    for row in results["layers"]:
        print(f"  {row['layer']:<8} clipped {100 * row['clipped_share']:.3f}%  SQNR fake-quant "
              f"{row['sqnr_fake_quant_db']:.1f} dB, integer {row['sqnr_integer_db']:.1f} dB  "
              f"|acc| {row['accumulator_observed']:,} <= {row['accumulator_bound']:,}")


def explain_command(args: argparse.Namespace) -> None:
    json_target = _json_target(args)
    try:
        index = tuple(int(part) for part in args.index.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--index: expected integers like 2,10,5, got {args.index!r}") from None
    model = _load_model(args.model_file)
    data, _ = _model_data(args, model)
    if not 0 <= args.image < len(data.test_images):
        raise argparse.ArgumentTypeError(f"--image {args.image}: the test set has {len(data.test_images)} images")
    graph = cached_float_graph(model, data, args.cache)
    result = explain(model, data.test_images[args.image], args.layer, index, graph)
    label = data.classes[int(data.test_labels[args.image])]
    print(f"test image {args.image} (label {label}), {args.model_file}")
    print("\n".join(result.lines))
    if graph is None:
        print("float model              = unavailable (its trained weights are not in the cache)")
    _save_json(json_target, {"model_file": str(args.model_file), "layer": args.layer, "index": list(index),
                             "image": args.image, "label": label, "lines": result.lines,
                             "float_model": graph is not None})


def export_c_command(args: argparse.Namespace) -> None:
    at_least("--images", args.images, 1)
    existing_file(args.model_file)
    check_writable(args.out, folder=True)
    model = _load_model(args.model_file)
    _, test_images = _model_data(args, model)
    images = checked_count("--images", args.images, len(test_images), "test images", GOLDEN_IMAGES)
    written = export_c(model, test_images[:images], args.out)
    print(f"wrote {', '.join(path.name for path in written)} to {args.out}/")
    print(f"check: cd {args.out} && cc -std=c99 -O2 main.c intq_runtime.c -o check && ./check")


def export_onnx_command(args: argparse.Namespace) -> None:
    from intq.executors.onnx_export import export_onnx

    existing_file(args.model_file)
    check_writable(args.out)
    qdq = getattr(args, "format", "qoperator") == "qdq"
    if qdq and args.exact:
        raise argparse.ArgumentTypeError("--exact applies to --format qoperator only (a QDQ graph requantizes in float)")
    model = _load_model(args.model_file)
    if qdq:
        from intq.executors.onnx_qdq import export_qdq, fusion_note, input_note

        contents = export_qdq(model)
    else:
        contents = export_onnx(model, exact=args.exact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out, "wb") as handle:
        handle.write(contents)
    channels, height, width = model.input.shape
    described = input_note(model) if qdq else f"input `pixels` uint8 (N, {channels}, {height}, {width})"
    print(f"wrote {args.out} ({len(contents):,} bytes): {described}")
    if qdq:
        print(fusion_note(model))


def train_command(args: argparse.Namespace) -> None:
    at_least("--epochs", args.epochs, 1)
    at_least("--batch-size", args.batch_size, 1)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise argparse.ArgumentTypeError(f"--lr must be a finite number above 0, got {args.lr}")
    out = check_writable(args.out or Path("runs") / args.arch / f"{args.arch}.npz")  # before an hour of training
    json_target = _json_target(args)
    recipe = ClassifierRecipe(args.epochs, args.batch_size, args.lr)
    result = train_architecture(args.arch, _dataset(args), recipe, args.seed, out, log=_log.info)
    print(f"checkpoint {out}; {result['seconds']:.0f} s; test accuracy {result['history'][-1]['test_accuracy']:.2f}%")
    _save_json(json_target, {"arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                             "seed": args.seed, **result})


def _json_target(args: argparse.Namespace) -> Path | None:
    """--json FILE, proven writable before any work; None without it."""
    return check_writable(args.json) if args.json else None


def _save_json(target: Path | None, figures: dict) -> None:
    """The command's figures as JSON (atomically), when --json asked for them."""
    if target is not None:
        write_json(target, figures)
        _log.debug(f"figures written to {target}")


def provenance(args: argparse.Namespace, spec: str, name: str, checkpoint: Path | None) -> dict:
    """An integer model's metadata: the checkpoint and its --arch, a study model's name and seed (explain
    finds its cached weights), or the user's model file and its --weights."""
    return ({"model": args.arch, "checkpoint": str(checkpoint)[:1024]} if checkpoint else
            {"model": name, "seed": args.seed} if spec in MODELS else
            {"model": spec[:1024], "weights": str(args.weights)[:1024]})


def quantize_command(args: argparse.Namespace) -> None:
    json_target = _json_target(args)
    config = _quantize_config(args)
    at_least("--calib-samples", args.calib_samples, 1)
    if (args.checkpoint is None) == (args.model is None):
        raise argparse.ArgumentTypeError("quantize takes a CHECKPOINT or --model (one of them)")
    spec = args.model or str(args.checkpoint)
    inputs = _float_model_inputs(args, spec)
    cell = _cell(args)
    label = args.preset if cell is None else f"{cell.method}-w{cell.wbits}a{cell.abits}-{cell.granularity}"
    label += _switches_label(config)
    label += f"-{args.rounding}" if config.rounding.learned else ""
    default_out = (args.checkpoint.with_name(f"{args.checkpoint.stem}-{label}-int.npz") if args.checkpoint
                   else Path("runs") / model_name(spec) / f"{model_name(spec)}-{label}-int.npz")
    out = check_writable(args.out or default_out)
    data = _dataset(args, inputs)
    samples = checked_count("--calib-samples", args.calib_samples, len(data.train_images), "training images",
                            config.calibration_samples or CALIBRATION_IMAGES)  # the study preset's own 400
    name, model = load_float_model(spec, data, args.cache, seed=args.seed, arch=args.arch, weights=args.weights)
    _log.info(f"{name}: input {data.image_shape} images, {inputs.describe()}; calibrating on {samples:,} images")
    metadata = provenance(args, spec, name, args.checkpoint)
    result = quantize_checkpoint(model, data, config, samples, args.seed, out, metadata, inputs.declared)
    if result["integer_accuracy"] is None:
        print(f"{out}: {result['bytes']:,} bytes; no test split in {data.source}, so no accuracy measured")
    else:
        print(f"{out}: {result['bytes']:,} bytes; float {result['float_accuracy']:.2f}%, integer-only "
              f"{result['integer_accuracy']:.2f}% (drop {result['float_accuracy'] - result['integer_accuracy']:.2f} "
              f"points) on {result['test_images']:,} test images")
    if config.rounding.learned:
        print(f"rounding {args.rounding}: {len(result['rounding']['units'])} layers or blocks x "
              f"{config.rounding.iterations:,} iterations, {result['rounding']['seconds']:.0f} s")
    _save_json(json_target, {"model": spec, "calibration_images": samples, **result})


def eval_command(args: argparse.Namespace) -> None:
    json_target = _json_target(args)
    model = _load_model(args.model_file)
    data, test_images = _model_data(args, model)
    accuracy = integer_accuracy(model, data)
    print(f"{args.model_file}: integer-only test accuracy {accuracy:.2f}% on {len(test_images):,} images")
    _save_json(json_target, {"model_file": str(args.model_file), "test_images": len(test_images),
                             "integer_accuracy": accuracy})


def verify_command(args: argparse.Namespace) -> None:
    json_target = _json_target(args)
    at_least("--images", args.images, 1)
    model = _load_model(args.model_file)
    _, test_images = _model_data(args, model)
    pixels = test_images[: checked_count("--images", args.images, len(test_images), "test images")]
    rows = verify(model, pixels, words(args.executors), args.engine)
    for name, row in rows.items():
        print(f"{name}: {row['values']:,} output values on {len(pixels):,} images; differing {100 * row['differing_share']:.4f}%, "
              f"max {row['max_lsb']} LSB ({row['max_real']:.4g} in real units); "
              f"top-1 differs on {100 * row['top1_differing_share']:.3f}% of images")
        for note in row["notes"]:
            print(f"  note: {note}")
        for line in path_summary(row["ops"]):
            print(f"  ops: {line}")
    _save_json(json_target, {"model_file": str(args.model_file), "images": len(pixels), "executors": rows})


def compare_command(args: argparse.Namespace) -> None:
    json_target = _json_target(args)
    config = _config(args)
    at_least("--calib-samples", args.calib_samples, 1)
    inputs = _float_model_inputs(args, args.model)
    data = _dataset(args, inputs)
    samples = checked_count("--calib-samples", args.calib_samples, len(data.train_images), "training images",
                            COMPARE_CALIBRATION_IMAGES)
    result = run_compare(args.model, data, args.cache, config, samples, seed=args.seed, arch=args.arch,
                         weights=args.weights, preprocessing=inputs.declared,
                         compile_peer=not args.peer_eager)
    rows = result["rows"]
    print(f"{result['model']}: {result['calibration_images']:,} calibration images for both; "
          f"{result['test_images']:,} test images")
    print(f"  {'executor':<37}{'accuracy':>9}{'bytes':>10}{'ms (b1)':>9}{'img/s (b256)':>14}{'top-1 = intq':>14}")
    for row in rows:
        print(f"  {row['executor']:<37}{row['accuracy']:>8.2f}%{row['bytes']:>10,}{row['latency_ms_b1']:>9.2f}"
              f"{row['throughput_b256']:>14,.0f}{row['top1_agreement_with_intq']:>13.2f}%")
    for row in rows:
        if "note" in row:
            print(f"  note ({row['executor']}): {row['note']}")
    _save_json(json_target, result)

