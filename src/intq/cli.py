"""Command line: `intq run` (the CIFAR-10 study), `intq sweep`, `intq sensitivity`, `intq inspect`,
`intq explain`, `intq export-c`, `intq export-onnx`, `intq train`, `intq quantize`, `intq eval`,
`intq verify`, `intq compare`, `intq finetune`. The only module that reads argv or the environment.

This module builds the parser (the defaults of --data and --cache come from $INTQ_DATA and
$INTQ_CACHE), dispatches each command to its body in commands.py (which checks the arguments, calls
one workflow and prints its results) and turns what escapes into an exit status and one line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from intq import __version__
from intq.command_runtime import Terminated, interrupted_message, logging_to_stderr, sigterm_as_interrupt
from intq.extras import MissingExtraError
from intq.graph.capture import CaptureError
from intq.commands import (compare_command, eval_command, explain_command, export_c_command, export_onnx_command,
                           inspect_command, quantize_command, run_command, sensitivity_command, sweep_command,
                           train_command, verify_command)
from intq.command_checks import ABITS_HELP
from intq.commands_finetune import add_finetune, finetune_command
from intq.graph.config import PRESETS, ROUNDINGS
from intq.qat.optimizers import OPTIMIZERS
from intq.graph.convert import ConversionError
from intq.cifar.data import DataError
from intq.executors.encoding import EngineError
from intq.executors.reference import ExecutionError
from intq.executors.torch_quantized import ENGINES
from intq.workflows.explain import ExplainError
from intq.files import OutputError, recording_writes
from intq.graph.model_check import ModelCheckError
from intq.graph.model_file import ModelFileError
from intq.cifar.models import ARCHITECTURES
from intq.workflows.pipeline import CheckpointError
from intq.workflows.user_model import UserModelError
from intq.workflows.peer import PeerError
from intq.arith.preprocessing import PreprocessingError
from intq.workflows.study import StudyError
from intq.workflows.sweep import ACTIVATION_BITS, GRANULARITIES, METHODS, WEIGHT_BITS, SweepError
from intq.executors.verify import EXECUTORS, VerifyError

USER_ERRORS = (DataError, CaptureError, ConversionError, ExecutionError, OutputError, ModelFileError, ModelCheckError,
               StudyError, SweepError, ExplainError, CheckpointError, VerifyError, EngineError, MissingExtraError,
               UserModelError, PreprocessingError, PeerError, argparse.ArgumentTypeError)


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


def _add_common(command) -> None:
    command.add_argument("--data", metavar="DIR", default=os.environ.get("INTQ_DATA"),
                         help="CIFAR-10: a cifar-10-batches-py folder, its .tar.gz, or an image folder "
                         "train|test/<class>/*.jpg|png (default: $INTQ_DATA, else ./data)")
    command.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and calibration subsets (default: 0)")
    command.add_argument("--cache", metavar="DIR", type=Path, default=Path(os.environ.get("INTQ_CACHE", ".cache/intq")),
                         help="decoded data and trained weights (default: $INTQ_CACHE, else .cache/intq)")


def _add_inputs(command, weights: bool = True) -> None:
    """--size, --channels, --mean, --std (and --weights for a model file): the user's data and model."""
    command.add_argument("--size", nargs="+", metavar="H [W]", default=None,
                         help="resize every image to H x W (one number: square); needed for images of mixed sizes")
    command.add_argument("--channels", type=int, choices=(1, 3), default=None,
                         help="convert images to 1 (grayscale) or 3 (RGB) channels")
    command.add_argument("--mean", nargs="+", metavar="M", default=None,
                         help="the model's preprocessing x = (p/255 - mean)/std: one mean per channel, or one for all "
                         "(default: 0.5, the study's)")
    command.add_argument("--std", nargs="+", metavar="S", default=None, help="with --mean: one std per channel, or one "
                         "for all (default: 0.5)")
    if weights:
        command.add_argument("--weights", metavar="FILE", type=Path, default=None,
                             help="the weights of a model file: a state_dict .pt/.pth (read with weights_only=True), "
                             ".safetensors, or an intq train .npz")


def _add_json(command) -> None:
    command.add_argument("--json", metavar="FILE", type=Path, default=None,
                         help="also write the figures printed as JSON to FILE (checked writable before any work)")


def _add_model_and_out(command, name: str) -> None:
    """--model and its options (_add_model) and --out (default runs/<name>)."""
    _add_model(command)
    command.add_argument("--out", metavar="DIR", type=Path, default=Path("runs") / name,
                         help=f"output folder (default: runs/{name})")


MODEL_FORMS = "Net|NetWithBias|CHECKPOINT|FILE.py:factory|module:attr"


def _add_model(command, default: str | None = "Net") -> None:
    """--model (a study model, an intq train checkpoint with --arch, or the user's model file with
    --weights), --arch, and the data and preprocessing options."""
    command.add_argument("--model", default=default, metavar=MODEL_FORMS,
                         help="a study model, a checkpoint written by intq train, or your model: a Python file and "
                         f"the factory or module in it, with --weights (default: {default})")
    command.add_argument("--arch", choices=tuple(ARCHITECTURES), default="Net",
                         help="the architecture of a CHECKPOINT (default: Net)")
    _add_inputs(command)


def _add_sweep(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="evaluate every range method x granularity x weight bits x activation bits x PTQ method",
        description="Train (or load from the cache) one of the study's models, calibrate it once, then "
        "convert and evaluate every combination integer-only on the test set. Writes sweep.json, "
        "sweep.html/sweep.md and sweep.png. Lists take spaces or commas.")
    _add_common(sweep)
    _add_model_and_out(sweep, "sweep")
    sweep.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                       help="range methods: minmax nsigma nsigma(K) percentile percentile(P) mse entropy (default: all five)")
    sweep.add_argument("--wbits", nargs="+", default=[str(b) for b in WEIGHT_BITS], metavar="B", help="weight bit widths, 2..8 (default: 8 6 4 3 2)")
    sweep.add_argument("--abits", nargs="+", default=[str(b) for b in ACTIVATION_BITS], metavar="B", help="activation bit widths, 2..8 (default: 8 6 4)")
    sweep.add_argument("--granularity", nargs="+", default=["per-channel"], metavar="G",
                       help="weight granularity: per-channel per-tensor (default: per-channel)")
    sweep.add_argument("--layer-bits", metavar="LAYER=B,...", default=None,
                       help="mixed precision: weight bits per layer that override --wbits, e.g. conv1=8,fc3=8")
    sweep.add_argument("--layer-abits", metavar="NODE=B,...", default=None, help=ABITS_HELP)
    sweep.add_argument("--calib-samples", type=int, metavar="N", default=None,
                       help="training images in the one calibration pass, at most all of them "
                       "(default: 10000, or all when there are fewer)")
    sweep.add_argument("--rounding", nargs="+", default=["nearest"], metavar="R",
                       help="weight rounding: nearest adaround brecq (default: nearest)")
    sweep.add_argument("--rounding-iters", type=int, metavar="N", help="learned rounding: steps per layer or block")
    sweep.add_argument("--bias-correction", nargs="+", default=["off"], metavar="off|on", help="(default: off)")
    sweep.add_argument("--equalization", nargs="+", default=["off"], metavar="off|on", help="(default: off)")
    sweep.add_argument("--finetune-epochs", nargs="+", default=["0"], metavar="N",
                       help="epochs of quantization-aware fine-tuning per cell, 0: none (default: 0)")
    sweep.add_argument("--finetune-optimizer", metavar="|".join(OPTIMIZERS), help="fine-tuning's optimizer (default: sgd)")
    sweep.add_argument("--finetune-lr", type=float, metavar="LR",
                       help="fine-tuning's peak learning rate (default: 0.01 with sgd, 0.0001 with adam)")
    sweep.add_argument("--finetune-distill", type=float, metavar="A",
                       help="fine-tuning's weight of the float model's predictions in the loss, in [0, 1] (default: 0)")


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
    command.add_argument("--rounding", choices=ROUNDINGS, default="nearest",
                         help="learned (adaround, brecq): the search rounds to nearest, the chosen mix is then learned")
    command.add_argument("--rounding-iters", type=int, metavar="N", help="learned rounding: steps per layer or block")
    command.add_argument("--equalization", action="store_true", help="every evaluated model equalized (eq. 36)")
    command.add_argument("--bias-correction", action="store_true", help="every evaluated model bias-corrected (eq. 37)")


def _add_config(command) -> None:
    """--preset, or a sweep cell (--method with --wbits, --abits, --granularity); with either, the PTQ switches."""
    command.add_argument("--preset", choices=tuple(PRESETS), default="recommended", help="(default: recommended)")
    command.add_argument("--method", default=None, help="a sweep cell instead of a preset: range method (minmax, nsigma(K), percentile(P), mse, entropy)")
    command.add_argument("--wbits", type=int, default=None, help="with --method: weight bits, 2..8 (default: 8)")
    command.add_argument("--abits", type=int, default=None, help="with --method: activation bits, 2..8 (default: 8)")
    command.add_argument("--granularity", choices=GRANULARITIES, default=None, help="with --method (default: per-channel)")
    command.add_argument("--equalization", action="store_true", help="balance the channels of layers chained through ReLU (eq. 36)")
    command.add_argument("--bias-correction", action="store_true", help="correct each bias for its weights' rounding (eq. 37)")


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
    _add_inputs(command, weights=False)
    _add_json(command)


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
    _add_inputs(command, weights=False)


def _add_export_onnx(commands) -> None:
    command = commands.add_parser(
        "export-onnx", help="export an integer model to ONNX (QLinearConv, ONNX Runtime's QLinearAdd)",
        description="Writes MODEL.onnx: input `pixels` uint8 (N, C, H, W) of the size the model was calibrated at, output `output` (the model's output "
        "integers; uint8 values are q + output_offset, a metadata property). Run it with ONNX Runtime.")
    command.add_argument("model_file", metavar="MODEL.npz", type=Path, help="an integer model written by intq")
    command.add_argument("--out", metavar="MODEL.onnx", type=Path, required=True, help="output file")
    command.add_argument("--format", choices=("qoperator", "qdq"), default="qoperator",
                         help="qoperator (default): uint8 pixels in, QLinearConv and ONNX Runtime's QLinear ops, the "
                         "output integers out; qdq: float input preprocessed with the model's mean/std, float ops between "
                         "QuantizeLinear/DequantizeLinear with intq's scales and zero points (what TensorRT, OpenVINO and "
                         "ONNX Runtime's tooling consume), float logits out")
    command.add_argument("--exact", action="store_true",
                         help="every conv, linear and add as exact integer ops (ConvInteger, int64 fixed point): "
                         "bit-exact with intq's reference, slower than QLinearConv (qoperator format only)")


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
    _add_json(train)
    quantize = commands.add_parser("quantize", help="quantize a float model to an integer model",
                                   description="Calibrate on training images, convert to an IntegerModel (.npz), and "
                                   "report float and integer-only test accuracy (when the data has a test split). "
                                   "The model: a checkpoint of intq train (with --arch), or --model FILE.py:factory "
                                   "--weights W.pt with --data DIR and, where it needs them, --size, --mean, --std.")
    quantize.add_argument("checkpoint", metavar="CHECKPOINT", type=Path, nargs="?", default=None,
                          help="a checkpoint written by intq train (or use --model)")
    _add_model(quantize, default=None)
    _add_config(quantize)
    quantize.add_argument("--calib-samples", type=int, help="training images to calibrate on (default: 10000 or all)")
    quantize.add_argument("--layer-bits", metavar="LAYER=B,...", help="weight bits per layer, e.g. conv=8,fc=8")
    quantize.add_argument("--layer-abits", metavar="NODE=B,...", help=ABITS_HELP)
    quantize.add_argument("--rounding", choices=ROUNDINGS, default="nearest", help="learned: adaround, brecq (QDrop)")
    quantize.add_argument("--rounding-iters", type=int, metavar="N", help="learned rounding: steps per layer or block")
    quantize.add_argument("--out", metavar="MODEL.npz", type=Path, default=None, help="(default: beside the checkpoint)")
    _add_common(quantize)
    _add_json(quantize)
    evaluate = commands.add_parser("eval", help="integer-only test accuracy of an integer model")
    evaluate.add_argument("model_file", metavar="MODEL.npz", type=Path)
    _add_common(evaluate)
    _add_inputs(evaluate, weights=False)
    _add_json(evaluate)
    check = commands.add_parser("verify", help="check other executors against the reference on the test set",
                                description="Share of output values that differ from the reference executor, the "
                                "largest difference in LSB, and the share of images whose top-1 differs; then, "
                                "per op type, the path each op took (a kernel of the engine, or exact integers) "
                                "and, for the engines, its own differences on the reference's inputs.")
    _add_inputs(check, weights=False)
    check.add_argument("model_file", metavar="MODEL.npz", type=Path)
    check.add_argument("--executors", nargs="+", default=list(EXECUTORS),
                       help=f"executors to check (default: {' '.join(EXECUTORS)})")
    check.add_argument("--images", type=int, default=None, help="test images (default: all)")
    check.add_argument("--engine", choices=ENGINES, default="onednn",
                       help="torch_quantized's PyTorch quantized backend (default: onednn)")
    _add_common(check)
    _add_json(check)


def _add_compare(commands) -> None:
    command = commands.add_parser(
        "compare", help="intq against PyTorch's own post-training quantization (torchao pt2e)",
        description="Quantize the same float model with intq (a preset) and with PyTorch's static PTQ, "
        "torchao pt2e (X86InductorQuantizer, compiled to int8 kernels by torch.compile; torch.ao FX with "
        "the x86 qconfig only where pt2e cannot run, said so), on the same calibration images; print "
        "accuracy, size, latency (batch 1), throughput (batch 256) and top-1 agreement with the intq "
        "reference executor.")
    _add_model(command)
    _add_config(command)
    command.add_argument("--calib-samples", type=int, default=None,
                         help="calibration images for both, at most all of them (default: 2000, or all when fewer)")
    command.add_argument("--peer-eager", action="store_true",
                         help="run the pt2e model without torch.compile: no compile time, but quantize/dequantize "
                         "around float ops (int8 simulated: its speed is not int8 speed)")
    _add_common(command)
    _add_json(command)


def _add_verbosity(command, default) -> None:
    """-v/--verbose and -q/--quiet. The root parser holds the defaults; each command takes them too
    (default SUPPRESS, so that `intq -q eval ...` is not undone by eval's own default)."""
    group = command.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="also show debug detail: timings, file paths")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="show only the results and errors: no progress messages, no progress bars")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="intq", description="Post-training quantization of PyTorch CNNs to integer-only inference. "
        "Results go to stdout; progress messages and bars (on a terminal) to stderr.")
    root.add_argument("--version", action="version", version=f"intq {__version__}")
    _add_verbosity(root, lambda value: value)
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
    add_finetune(commands, _add_model, _add_common, _add_json)
    for command in commands.choices.values():
        _add_verbosity(command, lambda value: argparse.SUPPRESS)
    return root


COMMANDS = {"compare": compare_command, "train": train_command, "quantize": quantize_command,
            "eval": eval_command, "verify": verify_command, "run": run_command,
            "sweep": sweep_command, "sensitivity": sensitivity_command, "inspect": inspect_command,
            "explain": explain_command, "export-c": export_c_command, "export-onnx": export_onnx_command,
            "finetune": finetune_command}


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done; 2 a user error (one line naming the file, option or
    layer); 130 interrupted by SIGINT, 143 by SIGTERM (both clean up alike and say what was
    written); 1 an internal error (one line; INTQ_DEBUG=1 re-raises it with its traceback)."""
    args, start = parser().parse_args(argv), time.perf_counter()
    with logging_to_stderr(args), recording_writes() as written:
        try:
            with sigterm_as_interrupt():
                COMMANDS[args.command](args)
        except USER_ERRORS as err:
            print(f"intq: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as interrupt:
            print(f"intq: {interrupted_message(written, getattr(args, 'cache', None))}", file=sys.stderr)
            return 143 if isinstance(interrupt, Terminated) else 130
        except Exception as err:  # the last safety net: every error a user can cause has its own message
            if os.environ.get("INTQ_DEBUG") == "1":
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            print(f"intq: internal error: {type(err).__name__}: {first} (please report; INTQ_DEBUG=1 shows "
                  "the traceback)", file=sys.stderr)
            return 1
        logging.getLogger("intq.cli").debug(f"intq {args.command} took {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
