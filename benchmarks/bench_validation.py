"""What checking a model file costs, against what `intq eval` does with it: ResNet-20 (CIFAR-10 shape,
the recommended preset), timed in one run. Run by hand:

    .venv/bin/python benchmarks/bench_validation.py [--data DIR] [--checkpoint runs/resnet20/resnet20.npz] [--repeats 5]

Without --checkpoint the network keeps its seeded initial weights: the cost of checking depends on the
sizes, not the values. Prints the median seconds of: reading the archive with every format rule
(model_file, rules 1-3 of docs/format.md), check_model (rules 4-7: multipliers, shapes, the
recomputed accumulator bound), the whole `load`, and `intq eval`'s work (load + integer-only
accuracy on the 10,000 test images), and the share of the last that checking takes.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import zipfile
from pathlib import Path

import torch

from intq.graph.config import RECOMMENDED
from intq.workflows.costs import median_seconds
from intq.cifar.data import load_cifar10
from intq.graph.model_check import check_model
from intq.graph.model_file import _read_model, load, save
from intq.workflows.pipeline import build, calibration_images, load_checkpoint, quantize_model
from intq.workflows.checkpoints import integer_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("INTQ_DATA", "../shared/data/cifar10-jpeg"))
    parser.add_argument("--cache", default=".cache/intq")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_cifar10(args.data, args.cache)
    network = load_checkpoint(args.checkpoint, "resnet20") if args.checkpoint else build("resnet20").eval()
    calibration = calibration_images(data.train_images, 1000, 0)
    model = quantize_model(network, calibration, RECOMMENDED, example=data.train_images).integer_model
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resnet20.npz"
        size = save(model, path)

        def read_archive():
            with zipfile.ZipFile(path) as archive:
                return _read_model(archive)

        parsed = read_archive()
        rows = {"read the archive (rules 1-3)": median_seconds(read_archive, args.repeats),
                "check_model (rules 4-7)": median_seconds(lambda: check_model(parsed), args.repeats),
                "load = both": median_seconds(lambda: load(path), args.repeats)}
        rows["intq eval: load + 10,000 test images"] = median_seconds(
            lambda: integer_accuracy(load(path), data), 1)
    print(f"ResNet-20, {sum(op.weight.size for op in model.quantized_layers()):,} weights, {len(model.layers)} ops, "
          f"{size:,} bytes; torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} after a warm-up call (eval: one call after one)")
    for label, seconds in rows.items():
        print(f"  {label:<40}{seconds * 1000:>10.1f} ms")
    share = rows["load = both"] / rows["intq eval: load + 10,000 test images"]
    print(f"  checking a model file costs {100 * share:.2f}% of intq eval (bar: under 5%)")


if __name__ == "__main__":
    main()
