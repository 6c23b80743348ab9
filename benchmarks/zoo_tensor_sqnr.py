"""Why some zoo models track float less closely than others (issue 13): for each architecture, the SQNR
of every op's float output quantized alone on the grid intq calibrated for it (each tensor's own 8-bit
error, nothing accumulated), the SQNR of the integer logits, and the reference against the float64
simulation op by op (each op fed the same integers). Random weights, BatchNorm warmed, CIFAR-10 test
images resized (workflows/zoo.py), the recommended preset. Run by hand:

    .venv/bin/python benchmarks/zoo_tensor_sqnr.py [--data DIR] [--size 32] [--models mobilenet_v2 ...]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from intq.arith.qparams import dequantize, quantize
from intq.executors.reference import run_integer
from intq.executors.simulate import layer_agreement
from intq.graph.capture import capture, run_float
from intq.graph.config import RECOMMENDED
from intq.graph.convert import collect_statistics, convert, fused_relu
from intq.workflows.inspect import sqnr_db
from intq.workflows.zoo import IMAGENET, ZOO, float_batches, warm_batchnorm, zoo_images, zoo_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def tensor_rows(name: str, size: int, data: str | None) -> dict:
    """One architecture: median and lowest per-tensor SQNR (dB), logits SQNR, reference vs simulation."""
    images = zoo_images(data, size=size, calibration=128, evaluation=64, seed=0, cache_dir=".cache/intq")
    model = warm_batchnorm(zoo_model(name, num_classes=10), float_batches(images.calibration, IMAGENET))
    graph = capture(model, IMAGENET.apply(images.calibration[:2]), IMAGENET)
    integer = convert(graph, collect_statistics(graph, [IMAGENET.apply(images.calibration)]), RECOMMENDED)
    floats, integers = {}, {}
    with torch.no_grad():
        run_float(graph, IMAGENET.apply(images.evaluation), lambda op, value: floats.__setitem__(op, value))
        run_integer(integer, images.evaluation, visit=lambda op, value: integers.__setitem__(op, value))
    own, last = [], None
    for op in integer.layers:
        relu = fused_relu(graph, graph.node(op.name)) if op.name in graph.users else None  # its clamp (eq. 10)
        real = floats.get(relu.name if relu else op.name)
        if real is None or not hasattr(op, "output_qparams") or real.shape != integers[op.name].shape:
            continue  # ops that do not requantize (flatten, max-pool, gathers) add no error of their own
        grid = op.output_qparams
        own.append(sqnr_db(real, dequantize(quantize(real, grid), grid)))
        last = sqnr_db(real, dequantize(integers[op.name], grid))
    agreement = layer_agreement(integer, images.evaluation[:16])
    return {"model": name, "tensors": len(own), "median_db": statistics.median(own), "lowest_db": min(own),
            "logits_db": last, "simulation_values": sum(row["values"] for row in agreement),
            "simulation_differ": sum(row["differing"] for row in agreement)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA) if SHARED_DATA.is_dir() else None)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| model | tensors | each tensor on its 8-bit grid: median SQNR | lowest | integer logits SQNR | "
          f"reference = float64 simulation, per op |\n| --- | ---: | ---: | ---: | ---: | --- |")
    for name in args.models:
        row = tensor_rows(name, args.size, args.data)
        print(f"| {name} | {row['tensors']} | {row['median_db']:.1f} dB | {row['lowest_db']:.1f} dB | "
              f"{row['logits_db']:.1f} dB | {row['simulation_differ']} of {row['simulation_values']:,} values differ |",
              flush=True)


if __name__ == "__main__":
    main()
