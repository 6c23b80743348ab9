"""Command line: `intq run` (the CIFAR-10 study). The only module that reads argv or the environment."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from intq.capture import CaptureError
from intq.convert import ConversionError
from intq.data import DataError
from intq.executors.reference import ExecutionError
from intq.files import OutputError
from intq.integer_model import ModelFileError
from intq.study import StudyError, StudyOptions, run_study

USER_ERRORS = (DataError, CaptureError, ConversionError, ExecutionError, OutputError, ModelFileError, StudyError)


def _add_run(commands) -> None:
    run = commands.add_parser(
        "run", help="run the five-stage CIFAR-10 quantization study end to end",
        description="Train the study's Net and NetWithBias (or load them from the cache), quantize them "
        "under the 'study' and 'recommended' presets, evaluate every stage on the 10,000 test images "
        "and write results.json, report.html/report.md, PNG plots and each integer model (.npz).")
    run.add_argument("--data", metavar="DIR", default=os.environ.get("INTQ_DATA"),
                     help="CIFAR-10: a cifar-10-batches-py folder, its .tar.gz, or an image folder "
                     "train|test/<class>/*.jpg|png (default: $INTQ_DATA, else ./data)")
    run.add_argument("--out", metavar="DIR", type=Path, default=Path("runs/study"),
                     help="output folder (default: runs/study)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and calibration subsets (default: 0)")
    run.add_argument("--calib-samples", type=int, metavar="N", default=None,
                     help="training images that calibrate the recommended preset (default: all 50,000; "
                     "the study preset keeps the study's 400)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where tensors run (default: cpu)")
    run.add_argument("--cache", metavar="DIR", type=Path, default=Path(os.environ.get("INTQ_CACHE", ".cache/intq")),
                     help="decoded data and trained weights (default: $INTQ_CACHE, else .cache/intq)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="intq", description="Post-training quantization of PyTorch CNNs to integer-only inference.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(commands)
    return root


def _run(args: argparse.Namespace) -> None:
    options = StudyOptions(args.data, args.out, args.cache, args.seed, args.calib_samples, args.device)
    results = run_study(options)
    print(f"\nresults written to {args.out}/ (results.json, report.html, report.md)")
    for row in results["rows"]:
        preset = row["preset"] or "-"
        print(f"  {row['model']:<12} {row['stage']:<20} {preset:<12} {row['accuracy']:6.2f}%")
    print(f"  total {results['timings_s']['total']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _run(args)
    except USER_ERRORS as err:
        print(f"intq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("intq: interrupted; nothing was written to the output folder", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
