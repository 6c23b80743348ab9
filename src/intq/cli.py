"""Command line: `intq run` (the CIFAR-10 study), `intq sweep`, `intq sensitivity`, `intq inspect`,
`intq explain`, `intq export-c`, `intq export-onnx`, `intq train`, `intq quantize`, `intq eval`,
`intq verify`, `intq compare`. The only module that reads argv or the environment.

Each command parses its arguments, calls one workflow and prints its results; the commands that
write a report hand the workflow its renderer, so the report lands in the same all-or-nothing
output as the results."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from intq.capture import CaptureError
from intq.convert import ConversionError
from intq.data import DataError
from intq.executors.reference import ExecutionError
from intq.executors.encoding import EngineError
from intq.executors.torch_quantized import ENGINES
from intq.files import OutputError, atomic_write, check_writable, recording_writes
from intq.model_check import ModelCheckError
from intq.model_file import ModelFileError
from intq.calibration import parse_range_method
from intq.config import PRESETS, QConfig
from intq import model_file
from intq.data import load_cifar10
from intq.diagnostics import InspectOptions, run_inspect
from intq.executors.c_export import export_c
from intq.explain import ExplainError, cached_float_graph, explain
from intq.models import ARCHITECTURES, MODELS
from intq.pipeline import CheckpointError, load_checkpoint
from intq.compare import run_compare
from intq.quantize import integer_accuracy, quantize_checkpoint, train_architecture
from intq.train import ClassifierRecipe
from intq.verify import EXECUTORS, VerifyError, verify
from intq.sensitivity import SensitivityOptions, run_sensitivity
from intq.study import StudyError, StudyOptions, run_study
from intq.sweep import (ACTIVATION_BITS, CALIBRATION_IMAGES, GRANULARITIES, METHODS, WEIGHT_BITS, SweepCell,
                        SweepError, SweepOptions, cell_config, checked_count, run_sweep)

COMPARE_CALIBRATION_IMAGES = 2000  # compare's default calibration subset
GOLDEN_IMAGES = 4  # export-c's default golden test images

USER_ERRORS = (DataError, CaptureError, ConversionError, ExecutionError, OutputError, ModelFileError, ModelCheckError, StudyError,
               SweepError, ExplainError, CheckpointError, VerifyError, EngineError, argparse.ArgumentTypeError)


def _add_run(commands) -> None:
    run = commands.add_parser(
        "run", help="run the five-stage CIFAR-10 quantization study end to end",
        description="Train the study's Net and NetWithBias (or load them from the cache), quantize them "
        "under the 'study' and 'recommended' presets, evaluate every stage on the 10,000 test images "
        "and write results.json, report.html/report.md, PNG plots and each integer model (.npz).")
    _add_common(run)
    run.add_argument("--out", metavar="DIR", type=Path, default=Path("runs/study"),
                     help="output folder (default: runs/study)")
    run.add_argument("--calib-samples", type=int, metavar="N", default=None,
                     help="training images that calibrate the recommended preset (default: all 50,000; "
                     "the study preset keeps the study's 400)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where tensors run (default: cpu)")


def _words(values: list[str]) -> tuple[str, ...]:
    """Space- or comma-separated values: ['mse,entropy', 'minmax'] -> ('mse', 'entropy', 'minmax')."""
    return tuple(word for value in values for word in value.split(",") if word)


def _bit_widths(values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(word) for word in _words(values))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit widths must be integers, got {' '.join(values)}") from None


def _layer_bits(text: str | None) -> tuple[tuple[str, int], ...]:
    """'conv1=8,fc3=8' -> (('conv1', 8), ('fc3', 8))."""
    pairs = []
    for item in _words([text or ""]):
        name, _, bits = item.partition("=")
        if not name or not bits.isdigit():
            raise argparse.ArgumentTypeError(f"--layer-bits: expected LAYER=BITS, got {item!r}")
        pairs.append((name, int(bits)))
    return tuple(pairs)


def _add_common(command) -> None:
    command.add_argument("--data", metavar="DIR", default=os.environ.get("INTQ_DATA"),
                         help="CIFAR-10: a cifar-10-batches-py folder, its .tar.gz, or an image folder "
                         "train|test/<class>/*.jpg|png (default: $INTQ_DATA, else ./data)")
    command.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and calibration subsets (default: 0)")
    command.add_argument("--cache", metavar="DIR", type=Path, default=Path(os.environ.get("INTQ_CACHE", ".cache/intq")),
                         help="decoded data and trained weights (default: $INTQ_CACHE, else .cache/intq)")


def _add_model_and_out(command, name: str, checkpoints: bool = False) -> None:
    """--model (a study model, or a checkpoint with --arch) and --out (default runs/<name>)."""
    _add_model(command, checkpoints)
    command.add_argument("--out", metavar="DIR", type=Path, default=Path("runs") / name,
                         help=f"output folder (default: runs/{name})")


def _add_model(command, checkpoints: bool) -> None:
    if checkpoints:
        command.add_argument("--model", default="Net", metavar="Net|NetWithBias|CHECKPOINT",
                             help="a study model, or a checkpoint written by intq train (default: Net)")
        command.add_argument("--arch", choices=tuple(ARCHITECTURES), default="Net",
                             help="the architecture of a CHECKPOINT (default: Net)")
    else:
        command.add_argument("--model", choices=("Net", "NetWithBias"), default="Net", help="the study model (default: Net)")


def _add_sweep(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="evaluate every range method x granularity x weight bits x activation bits",
        description="Train (or load from the cache) one of the study's models, calibrate it once, then "
        "convert and evaluate every combination integer-only on the test set. Writes sweep.json, "
        "sweep.html/sweep.md and sweep.png. Lists take spaces or commas.")
    _add_common(sweep)
    _add_model_and_out(sweep, "sweep", checkpoints=True)
    sweep.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                       help="range methods: minmax nsigma nsigma(K) percentile percentile(P) mse entropy (default: all five)")
    sweep.add_argument("--wbits", nargs="+", default=[str(b) for b in WEIGHT_BITS], metavar="B", help="weight bit widths, 2..8 (default: 8 6 4 3 2)")
    sweep.add_argument("--abits", nargs="+", default=[str(b) for b in ACTIVATION_BITS], metavar="B", help="activation bit widths, 2..8 (default: 8 6 4)")
    sweep.add_argument("--granularity", nargs="+", default=["per-channel"], metavar="G",
                       help="weight granularity: per-channel per-tensor (default: per-channel)")
    sweep.add_argument("--layer-bits", metavar="LAYER=B,...", default=None,
                       help="mixed precision: weight bits per layer that override --wbits, e.g. conv1=8,fc3=8")
    sweep.add_argument("--calib-samples", type=int, metavar="N", default=None,
                       help="training images in the one calibration pass, at most all of them "
                       "(default: 10000, or all when there are fewer)")


def _add_sensitivity(commands) -> None:
    command = commands.add_parser(
        "sensitivity", help="per-layer sensitivity at a low weight bit width, and greedy mixed precision",
        description="Integer-only accuracy with only one layer at --bits (others 8-bit) and with all but one "
        "layer at --bits, ranked; then lower layers one step at a time (8, 6, 4, 3, 2 bits) while validation "
        "accuracy stays within --max-drop points of 8-bit. Writes sensitivity.json, sensitivity.html/.md, "
        "sensitivity.png and the chosen mixed-precision model (.npz).")
    _add_common(command)
    _add_model_and_out(command, "sensitivity")
    command.add_argument("--bits", type=int, default=2, help="the low weight bit width to probe, 2..8 (default: 2)")
    command.add_argument("--abits", type=int, default=8, help="activation bits (default: 8)")
    command.add_argument("--method", default="mse", help="range method (default: mse)")
    command.add_argument("--max-drop", type=float, default=1.0,
                         help="greedy search: largest validation accuracy loss vs 8-bit, in points (default: 1.0)")


def _add_config(command) -> None:
    """--preset, or a sweep cell (--method with --wbits, --abits, --granularity)."""
    command.add_argument("--preset", choices=tuple(PRESETS), default="recommended", help="(default: recommended)")
    command.add_argument("--method", default=None, help="a sweep cell instead of a preset: range method "
                         "(minmax, nsigma(K), percentile(P), mse, entropy)")
    command.add_argument("--wbits", type=int, default=None, help="with --method: weight bits, 2..8 (default: 8)")
    command.add_argument("--abits", type=int, default=None, help="with --method: activation bits, 2..8 (default: 8)")
    command.add_argument("--granularity", choices=GRANULARITIES, default=None,
                         help="with --method (default: per-channel)")


def _cell(args: argparse.Namespace) -> SweepCell | None:
    """The sweep cell that --method, --wbits, --abits and --granularity describe (None: a preset)."""
    if args.method is None:
        return None
    return SweepCell(args.method, args.granularity or "per-channel", 8 if args.wbits is None else args.wbits,
                     8 if args.abits is None else args.abits)


def _config(args: argparse.Namespace) -> QConfig:
    """The preset, or the sweep cell's QConfig when --method is given (options checked first).
    --wbits, --abits and --granularity describe a cell: with a preset they are refused, not ignored."""
    if args.method is None:
        given = [flag for flag, value in (("--wbits", args.wbits), ("--abits", args.abits),
                                          ("--granularity", args.granularity)) if value is not None]
        if given:
            raise argparse.ArgumentTypeError(f"{', '.join(given)}: only with --method (a sweep cell); "
                                             f"the preset {args.preset} sets its own bits and granularity")
        return PRESETS[args.preset]
    cell = _cell(args)
    _range_method("--method", cell.method)
    _bit_width("--wbits", cell.wbits)
    _bit_width("--abits", cell.abits)  # --granularity: argparse's choices
    return cell_config(cell)


def _add_inspect(commands) -> None:
    command = commands.add_parser(
        "inspect", help="per-layer diagnostics of one configuration",
        description="Per layer: scales, zero points, multipliers, clipping rate, SQNR of fake-quant and of the "
        "integer pipeline against float, accumulator observed vs proven bound vs int32, and the histograms with "
        "the chosen ranges. Writes inspect.json, inspect.html/.md and inspect.png. The configuration is a preset, "
        "or a sweep cell when --method is given.")
    _add_common(command)
    _add_model_and_out(command, "inspect")
    _add_config(command)
    command.add_argument("--images", type=int, default=None,
                         help="test images to diagnose (default: 1000, or all when fewer)")


def _add_explain(commands) -> None:
    command = commands.add_parser(
        "explain", help="how one output integer of one layer comes about",
        description="For one output value of one layer on one test image: the integer inputs and weights "
        "that feed it, the int32 accumulation, the bias, the mantissa and shift, the rounding, the zero point "
        "and clamp, the final integer (checked against the reference executor), the dequantized value and the "
        "float model's value there (when its trained weights are in the cache).")
    command.add_argument("model_file", metavar="MODEL.npz", type=Path, help="an integer model written by intq")
    command.add_argument("--layer", required=True, help="a conv/linear layer name, e.g. conv1")
    command.add_argument("--image", type=int, default=0, help="test image number (default: 0)")
    command.add_argument("--index", required=True, help="output element: C,Y,X for a conv, C for a linear layer")
    _add_common(command)


def _add_export_c(commands) -> None:
    command = commands.add_parser(
        "export-c", help="export an integer model as portable C99 with golden vectors",
        description="Writes model.h (int8 weights, int32 biases, mantissas, shifts, zero points, op table), the "
        "intq C runtime (integer arithmetic only), golden.h (pixels and every op's reference output for "
        "--images test images) and main.c. Build and check: cc -std=c99 -O2 main.c intq_runtime.c -o check && ./check")
    command.add_argument("model_file", metavar="MODEL.npz", type=Path, help="an integer model written by intq")
    command.add_argument("--out", metavar="DIR", type=Path, required=True, help="output folder")
    command.add_argument("--images", type=int, default=None, help="golden test images (default: 4, or all when fewer)")
    _add_common(command)


def _add_export_onnx(commands) -> None:
    command = commands.add_parser(
        "export-onnx", help="export an integer model to ONNX (QLinearConv, ONNX Runtime's QLinearAdd)",
        description="Writes MODEL.onnx: input `pixels` uint8 (N, 3, H, W), output `output` (the model's output "
        "integers; uint8 values are q + output_offset, a metadata property). Run it with ONNX Runtime.")
    command.add_argument("model_file", metavar="MODEL.npz", type=Path, help="an integer model written by intq")
    command.add_argument("--out", metavar="MODEL.onnx", type=Path, required=True, help="output file")
    command.add_argument("--height", type=int, default=32, help="input height (default: 32)")
    command.add_argument("--width", type=int, default=32, help="input width (default: 32)")
    command.add_argument("--exact", action="store_true",
                         help="every conv, linear and add as exact integer ops (ConvInteger, int64 fixed point): "
                         "bit-exact with intq's reference, slower than QLinearConv")


def _add_train_quantize_eval(commands) -> None:
    train = commands.add_parser("train", help="train an architecture on CIFAR-10 (e.g. resnet20)",
                                description="Train with SGD (Nesterov momentum 0.9, weight decay 5e-4, cosine lr), "
                                "random shifts and flips; writes a pickle-free .npz checkpoint.")
    train.add_argument("--arch", choices=tuple(ARCHITECTURES), default="resnet20", help="(default: resnet20)")
    train.add_argument("--epochs", type=int, default=10, help="(default: 10)")
    train.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    train.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default: 0.1)")
    train.add_argument("--out", metavar="FILE", type=Path, default=None, help="checkpoint (default: runs/<arch>/<arch>.npz)")
    _add_common(train)
    quantize = commands.add_parser("quantize", help="quantize a checkpoint to an integer model",
                                   description="Calibrate on training images, convert to an IntegerModel (.npz), and "
                                   "report float and integer-only test accuracy.")
    quantize.add_argument("checkpoint", metavar="CHECKPOINT", type=Path, help="a checkpoint written by intq train")
    quantize.add_argument("--arch", choices=tuple(ARCHITECTURES), required=True)
    _add_config(quantize)
    quantize.add_argument("--calib-samples", type=int, default=None,
                          help="training images to calibrate on, at most all of them (default: 10000, or all when fewer)")
    quantize.add_argument("--out", metavar="MODEL.npz", type=Path, default=None, help="(default: beside the checkpoint)")
    _add_common(quantize)
    evaluate = commands.add_parser("eval", help="integer-only test accuracy of an integer model")
    evaluate.add_argument("model_file", metavar="MODEL.npz", type=Path)
    _add_common(evaluate)
    check = commands.add_parser("verify", help="check other executors against the reference on the test set",
                                description="Share of output values that differ from the reference executor, the "
                                "largest difference in LSB, and the share of images whose top-1 differs.")
    check.add_argument("model_file", metavar="MODEL.npz", type=Path)
    check.add_argument("--executors", nargs="+", default=list(EXECUTORS),
                       help=f"executors to check (default: {' '.join(EXECUTORS)})")
    check.add_argument("--images", type=int, default=None, help="test images (default: all)")
    check.add_argument("--engine", choices=ENGINES, default="onednn",
                       help="torch_quantized's PyTorch quantized backend (default: onednn)")
    _add_common(check)


def _add_compare(commands) -> None:
    command = commands.add_parser(
        "compare", help="intq against PyTorch's own post-training quantization (torch.ao)",
        description="Quantize the same float model with intq (a preset) and with torch.ao FX static PTQ "
        "(x86 qconfig) on the same calibration images; print accuracy, size, latency (batch 1), "
        "throughput (batch 256) and top-1 agreement with the intq reference executor.")
    _add_model(command, checkpoints=True)
    _add_config(command)
    command.add_argument("--calib-samples", type=int, default=None,
                         help="calibration images for both, at most all of them (default: 2000, or all when fewer)")
    _add_common(command)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="intq", description="Post-training quantization of PyTorch CNNs to integer-only inference.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(commands)
    _add_sweep(commands)
    _add_sensitivity(commands)
    _add_inspect(commands)
    _add_explain(commands)
    _add_export_c(commands)
    _add_export_onnx(commands)
    _add_train_quantize_eval(commands)
    _add_compare(commands)
    return root


def _existing_file(path: Path) -> Path:
    """`path` if it is a file; the one-line 'no such file' otherwise (before any loader runs)."""
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    return path


def _at_least(option: str, value: int | float | None, low: int | float) -> None:
    """Refuse `value` below `low` (or NaN/Inf); None means the option was not given."""
    if value is not None and not (math.isfinite(value) and value >= low):
        raise argparse.ArgumentTypeError(f"{option} must be at least {low:g}, got {value}")


def _bit_width(option: str, value: int) -> None:
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{option}: bit widths must be 2..8, got {value}")


def _range_method(option: str, text: str) -> None:
    try:
        parse_range_method(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{option}: {err}") from None


def _checkpoint_model(model: str) -> None:
    """--model is a study model's name or a checkpoint file that must exist."""
    if model not in MODELS:
        _existing_file(Path(model))


def _run(args: argparse.Namespace) -> None:
    _at_least("--calib-samples", args.calib_samples, 1)
    from intq.report import write_report  # reports load matplotlib: only the commands that write one

    options = StudyOptions(args.data, args.out, args.cache, args.seed, args.calib_samples, args.device)
    results = run_study(options, render=write_report)
    print(f"\nresults written to {args.out}/ (results.json, report.html, report.md)")
    for row in results["rows"]:
        preset = row["preset"] or "-"
        print(f"  {row['model']:<12} {row['stage']:<20} {preset:<12} {row['accuracy']:6.2f}%")
    print(f"  total {results['timings_s']['total']:.1f} s")


def _sweep(args: argparse.Namespace) -> None:
    from intq.sweep_report import write_sweep_report

    _checkpoint_model(args.model)
    options = SweepOptions(args.model, args.data, args.out, args.cache, args.seed, args.calib_samples,
                           _words(args.methods), _bit_widths(args.wbits), _bit_widths(args.abits),
                           _words(args.granularity), _layer_bits(args.layer_bits), args.arch)
    results = run_sweep(options, render=write_sweep_report)
    print(f"\n{len(results['rows'])} cells written to {args.out}/ (sweep.json, sweep.html, sweep.md, sweep.png); "
          f"float {results['float_accuracy']:.2f}%")


def _sensitivity(args: argparse.Namespace) -> None:
    from intq.sensitivity_report import write_sensitivity_report

    _bit_width("--bits", args.bits)
    _bit_width("--abits", args.abits)
    _range_method("--method", args.method)
    _at_least("--max-drop", args.max_drop, 0)
    check_writable(args.out, folder=True)
    options = SensitivityOptions(args.model, args.data, args.out, args.cache, args.seed, args.bits, args.abits,
                                 args.method, args.max_drop)
    results = run_sensitivity(options, render=write_sensitivity_report)
    mixed = results["mixed"]
    print(f"\nmixed precision {mixed['layer_bits']}: {mixed['weight_bytes'] / 1000:.1f} KB of weights; "
          f"test accuracy {results['test_accuracy']}")


def _inspect(args: argparse.Namespace) -> None:
    from intq.diagnostics_report import write_inspect_report

    config = _config(args)
    _at_least("--images", args.images, 1)
    check_writable(args.out, folder=True)
    options = InspectOptions(args.model, args.data, args.out, args.cache, config, args.seed, args.images)
    results = run_inspect(options, render=write_inspect_report)
    for row in results["layers"]:
        print(f"  {row['layer']:<8} clipped {100 * row['clipped_share']:.3f}%  SQNR fake-quant "
              f"{row['sqnr_fake_quant_db']:.1f} dB, integer {row['sqnr_integer_db']:.1f} dB  "
              f"|acc| {row['accumulator_observed']:,} <= {row['accumulator_bound']:,}")


def _explain(args: argparse.Namespace) -> None:
    try:
        index = tuple(int(part) for part in args.index.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--index: expected integers like 2,10,5, got {args.index!r}") from None
    model = model_file.load(_existing_file(args.model_file))
    data = _dataset(args)
    if not 0 <= args.image < len(data.test_images):
        raise argparse.ArgumentTypeError(f"--image {args.image}: the test set has {len(data.test_images)} images")
    graph = cached_float_graph(model, data, args.cache)
    result = explain(model, data.test_images[args.image], args.layer, index, graph)
    print(f"test image {args.image} (label {data.classes[int(data.test_labels[args.image])]}), {args.model_file}")
    print("\n".join(result.lines))
    if graph is None:
        print("float model              = unavailable (its trained weights are not in the cache)")


def _export_c(args: argparse.Namespace) -> None:
    _at_least("--images", args.images, 1)
    _existing_file(args.model_file)
    check_writable(args.out, folder=True)
    model = model_file.load(args.model_file)
    data = _dataset(args)
    images = checked_count("--images", args.images, len(data.test_images), "test images", GOLDEN_IMAGES)
    written = export_c(model, data.test_images[:images], args.out)
    print(f"wrote {', '.join(path.name for path in written)} to {args.out}/")
    print(f"check: cd {args.out} && cc -std=c99 -O2 main.c intq_runtime.c -o check && ./check")


def _export_onnx(args: argparse.Namespace) -> None:
    from intq.executors.onnx_export import export_onnx

    _at_least("--height", args.height, 1)
    _at_least("--width", args.width, 1)
    _existing_file(args.model_file)
    check_writable(args.out)
    model = model_file.load(args.model_file)
    contents = export_onnx(model, torch.zeros((1, 3, args.height, args.width), dtype=torch.uint8), args.exact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out, "wb") as handle:
        handle.write(contents)
    print(f"wrote {args.out} ({len(contents):,} bytes)")


def _train(args: argparse.Namespace) -> None:
    _at_least("--epochs", args.epochs, 1)
    _at_least("--batch-size", args.batch_size, 1)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise argparse.ArgumentTypeError(f"--lr must be a finite number above 0, got {args.lr}")
    out = check_writable(args.out or Path("runs") / args.arch / f"{args.arch}.npz")  # before an hour of training
    recipe = ClassifierRecipe(args.epochs, args.batch_size, args.lr)
    result = train_architecture(args.arch, _dataset(args), recipe, args.seed, out)
    print(f"checkpoint {out}; {result['seconds']:.0f} s; test accuracy {result['history'][-1]['test_accuracy']:.2f}%")


def _quantize(args: argparse.Namespace) -> None:
    config = _config(args)
    _at_least("--calib-samples", args.calib_samples, 1)
    model = load_checkpoint(_existing_file(args.checkpoint), args.arch)
    cell = _cell(args)
    label = args.preset if cell is None else f"{cell.method}-w{cell.wbits}a{cell.abits}-{cell.granularity}"
    out = check_writable(args.out or args.checkpoint.with_name(f"{args.checkpoint.stem}-{label}-int.npz"))
    data = _dataset(args)
    samples = checked_count("--calib-samples", args.calib_samples, len(data.train_images), "training images",
                            CALIBRATION_IMAGES)
    result = quantize_checkpoint(model, data, config, samples, args.seed, out,
                                 {"model": args.arch, "checkpoint": str(args.checkpoint)})
    print(f"{out}: {result['bytes']:,} bytes; float {result['float_accuracy']:.2f}%, integer-only "
          f"{result['integer_accuracy']:.2f}% (drop {result['float_accuracy'] - result['integer_accuracy']:.2f} points)")


def _eval(args: argparse.Namespace) -> None:
    model = model_file.load(_existing_file(args.model_file))
    print(f"{args.model_file}: integer-only test accuracy {integer_accuracy(model, _dataset(args)):.2f}%")


def _verify(args: argparse.Namespace) -> None:
    _at_least("--images", args.images, 1)
    model = model_file.load(_existing_file(args.model_file))
    test_images = _dataset(args).test_images
    pixels = test_images[: checked_count("--images", args.images, len(test_images), "test images")]
    for name, row in verify(model, pixels, _words(args.executors), args.engine).items():
        print(f"{name}: {row['values']:,} output values on {len(pixels):,} images; differing {100 * row['differing_share']:.4f}%, "
              f"max {row['max_lsb']} LSB ({row['max_real']:.4g} in real units); "
              f"top-1 differs on {100 * row['top1_differing_share']:.3f}% of images")
        for note in row["notes"]:
            print(f"  note: {note}")


def _compare(args: argparse.Namespace) -> None:
    config = _config(args)
    _at_least("--calib-samples", args.calib_samples, 1)
    _checkpoint_model(args.model)
    data = _dataset(args)
    samples = checked_count("--calib-samples", args.calib_samples, len(data.train_images), "training images",
                            COMPARE_CALIBRATION_IMAGES)
    result = run_compare(args.model, data, args.cache, config, samples, seed=args.seed, arch=args.arch)
    rows = result["rows"]
    print(f"{result['model']}: {result['calibration_images']:,} calibration images for both; "
          f"{result['test_images']:,} test images")
    print(f"  {'executor':<34}{'accuracy':>9}{'bytes':>10}{'ms (b1)':>9}{'img/s (b256)':>14}{'top-1 = intq':>14}")
    for row in rows:
        print(f"  {row['executor']:<34}{row['accuracy']:>8.2f}%{row['bytes']:>10,}{row['latency_ms_b1']:>9.2f}"
              f"{row['throughput_b256']:>14,.0f}{row['top1_agreement_with_intq']:>13.2f}%")
    for row in rows:
        if "note" in row:
            print(f"  note ({row['executor']}): {row['note']}")


COMMANDS = {"compare": _compare, "train": _train, "quantize": _quantize, "eval": _eval, "verify": _verify, "run": _run, "sweep": _sweep, "sensitivity": _sensitivity, "inspect": _inspect, "explain": _explain,
            "export-c": _export_c, "export-onnx": _export_onnx}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that every cleanup written for Ctrl-C runs for it too."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises _Terminated (a KeyboardInterrupt); the previous
    handler is restored after. Outside the main thread signals cannot be handled: no change."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(written: list[Path], cache: Path | None) -> str:
    """What an interrupted command did and did not write, outputs only (the cache keeps only
    whole files, and is not the user's output)."""
    def in_cache(path: Path) -> bool:
        return cache is not None and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(cache))

    outputs = list(dict.fromkeys(str(path) for path in written if not in_cache(path)))
    if not outputs:
        return "interrupted; no output was written"
    shown = ", ".join(outputs[:3]) + (f" and {len(outputs) - 3} more" if len(outputs) > 3 else "")
    return f"interrupted; wrote {shown}; nothing else was written"


def _dataset(args: argparse.Namespace):
    """CIFAR-10 from --data via --cache, its progress (decoding, a corrupt cache rebuilt) on stdout."""
    return load_cifar10(args.data, args.cache, progress=print)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done; 2 a user error (one line naming the file, option or
    layer); 130 interrupted by SIGINT, 143 by SIGTERM (both clean up alike and say what was
    written); 1 an internal error (one line; INTQ_DEBUG=1 re-raises it with its traceback)."""
    args = parser().parse_args(argv)
    with recording_writes() as written:
        try:
            with _sigterm_as_interrupt():
                COMMANDS[args.command](args)
        except USER_ERRORS as err:
            print(f"intq: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as interrupt:
            print(f"intq: {interrupted_message(written, getattr(args, 'cache', None))}", file=sys.stderr)
            return 143 if isinstance(interrupt, _Terminated) else 130
        except Exception as err:  # the last safety net: every error a user can cause has its own message
            if os.environ.get("INTQ_DEBUG") == "1":
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            print(f"intq: internal error: {type(err).__name__}: {first} (please report; INTQ_DEBUG=1 shows "
                  "the traceback)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
