"""Cross-layer equalization and bias correction (issue 14, docs/math.md eq. 36-37): float accuracy, then the
integer-only accuracy of sweep cells without them, with equalization, with bias correction and with both,
on every test image; the table of README's "Equalization and bias correction". Run by hand:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_equalization.py --model examples/mobilenet_v2.py:cifar \
        --weights runs/mobilenet_v2.pt --data DIR --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616 \
        [--methods mse minmax] [--granularity per-tensor per-channel] [--wbits 8 6 4] [--abits 8]
        [--calib-samples 10000]

One calibration per equalization setting (seed 0, the `intq quantize` default subset) serves every cell and
both bias-correction settings; each row is what `intq quantize ... --method M --granularity G
[--equalization] [--bias-correction]` gives. Prints a Markdown table and the time of each step.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from intq.arith.preprocessing import Preprocessing
from intq.graph.capture import run_float
from intq.workflows.checkpoints import float_accuracy, integer_accuracy
from intq.workflows.pipeline import calibrated, calibration_images
from intq.workflows.subject import load_data, load_float_model
from intq.workflows.sweep import CALIBRATION_IMAGES, SweepCell, cell_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", default=".cache/intq")
    parser.add_argument("--mean", type=float, nargs="+", required=True)
    parser.add_argument("--std", type=float, nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["mse"])
    parser.add_argument("--granularity", nargs="+", default=["per-tensor"])
    parser.add_argument("--wbits", type=int, nargs="+", default=[8])
    parser.add_argument("--abits", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=CALIBRATION_IMAGES)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_data(args.data, args.cache)
    preprocessing = Preprocessing(tuple(args.mean), tuple(args.std))
    _, model = load_float_model(args.model, data, args.cache, weights=args.weights)
    pixels = calibration_images(data.train_images, args.calib_samples, 0)
    start = time.perf_counter()
    reference = float_accuracy(model, data, preprocessing)
    print(f"float {reference:.2f}% on {len(data.test_images):,} test images ({time.perf_counter() - start:.0f} s)")
    rows = []
    for equalization in (False, True):
        start = time.perf_counter()
        calibration = calibrated(model, pixels, example=data.train_images, preprocessing=preprocessing,
                                 equalization=equalization)
        print(f"calibration on {len(pixels):,} images{' (equalized graph)' if equalization else ''}: "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if equalization:
            print(f"float, equalized graph: {graph_accuracy(calibration.graph, data):.2f}%", flush=True)
        cells = [SweepCell(method, granularity, wbits, args.abits)
                 for method in args.methods for granularity in args.granularity for wbits in args.wbits]
        for cell in cells:
            for bias_correction in (False, True):
                config = replace(cell_config(cell), equalization=equalization, bias_correction=bias_correction)
                start = time.perf_counter()
                integer = calibration.integer_model(config)
                converted = time.perf_counter() - start
                accuracy = integer_accuracy(integer, data)
                rows.append((config.name, equalization, bias_correction, accuracy, converted))
                print(f"  {config.name}, equalization {equalization}, bias correction {bias_correction}: "
                      f"{accuracy:.2f}% (convert {converted:.1f} s)", flush=True)
    print(f"\n| cell | equalization | bias correction | integer-only % | vs float (points) | convert s |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name, equalization, bias_correction, accuracy, seconds in sorted(rows, key=lambda row: row[0]):
        print(f"| {name} | {'yes' if equalization else 'no'} | {'yes' if bias_correction else 'no'} | "
              f"{accuracy:.2f} | {accuracy - reference:+.2f} | {seconds:.1f} |")


def graph_accuracy(graph, data) -> float:
    """Top-1 of the captured float graph on the test images (the equalized one computes the same function)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.test_images), 500):
            logits = run_float(graph, graph.preprocessing.apply(data.test_images[start : start + 500]))
            correct += int((logits.argmax(1) == data.test_labels[start : start + 500]).sum())
    return 100 * correct / len(data.test_images)


if __name__ == "__main__":
    main()
