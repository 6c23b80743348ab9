"""Learned rounding and bias correction against nearest rounding (issue 14, docs/math.md eqs. 37-40):
integer-only accuracy on every test image and the seconds each method takes, for each weight/activation
width, on the same calibration images with the same seed; the table of README's "Four bits and below".
Run by hand:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_rounding.py --model runs/resnet20/resnet20.npz \
        --arch resnet20 --data DIR --cells 4,4 3,8 2,8 --layer-bits conv=8,fc=8 --calib-samples 1000 \
        [--roundings nearest adaround brecq] [--bias-correction off on] [--json rows.json]
    PYTHONPATH=src .venv/bin/python benchmarks/bench_rounding.py --table rows-a.json rows-b.json \
        [--extra finetuned-rows.json] [--plot docs/images/rounding.png]

--model is a study model name (Net, NetWithBias), a checkpoint from `intq train` with --arch, or a model file
with --weights (and its --mean/--std). One calibration (seed 0, the `intq quantize` subset of
--calib-samples training images) serves every row; each row is what `intq quantize ... --method M --wbits W
--abits A --layer-bits L --rounding R [--bias-correction]` gives (learned rounding on the first 1,024 of those
images, 2,000 iterations per layer or block, one thread, seed 0). --json appends each row as it is measured,
so that cells can run in separate processes (one core each) and --table prints their rows as one table.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing
from intq.command_checks import layer_bits
from intq.ptq.reconstruction import learned_integer_model
from intq.workflows.checkpoints import float_accuracy, integer_accuracy, with_options
from intq.workflows.pipeline import calibrated, calibration_images
from intq.workflows.subject import load_data, load_float_model
from intq.workflows.sweep import SweepCell, cell_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Net")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--data")
    parser.add_argument("--cache", type=Path, default=Path(".cache/intq"))
    parser.add_argument("--mean", type=float, nargs="+")
    parser.add_argument("--std", type=float, nargs="+")
    parser.add_argument("--method", default="mse")
    parser.add_argument("--granularity", default="per-channel")
    parser.add_argument("--cells", nargs="+", default=["4,4", "3,8", "2,8"], help="WBITS,ABITS pairs")
    parser.add_argument("--layer-bits", default="", help="e.g. conv=8,fc=8 (first and last layers)")
    parser.add_argument("--roundings", nargs="+", default=["nearest", "adaround", "brecq"])
    parser.add_argument("--bias-correction", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--calib-samples", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=None, help="learned rounding steps (default 2,000)")
    parser.add_argument("--json", type=Path, help="append each row to this file (JSON lines)")
    parser.add_argument("--table", type=Path, nargs="+", help="print the rows of these files as one table")
    parser.add_argument("--extra", type=Path, nargs="*", default=[],
                        help="with --table: JSON files of further rows (e.g. intq finetune --json results, as rows)")
    parser.add_argument("--plot", type=Path, help="with --table: also draw the rows as a PNG (needs matplotlib)")
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(line) for path in args.table for line in path.read_text().splitlines() if line]
        rows += [row for path in args.extra for row in json.loads(path.read_text())]
        print_table(rows)
        if args.plot:
            plot(rows, args.plot)
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_data(args.data, args.cache)
    preprocessing = Preprocessing(tuple(args.mean), tuple(args.std)) if args.mean else STUDY_PREPROCESSING
    _, model = load_float_model(args.model, data, args.cache, seed=0, arch=args.arch or "Net", weights=args.weights)
    pixels = calibration_images(data.train_images, args.calib_samples, 0)
    reference = float_accuracy(model, data, preprocessing)
    start = time.perf_counter()
    calibration = calibrated(model, pixels, example=data.train_images, preprocessing=preprocessing)
    print(f"{args.model}: float {reference:.2f}% on {len(data.test_images):,} test images; calibration on "
          f"{len(pixels):,} images {time.perf_counter() - start:.0f} s", flush=True)
    per_layer = layer_bits(args.layer_bits)
    rows = []
    for text in args.cells:
        wbits, abits = (int(word) for word in text.split(","))
        cell = SweepCell(args.method, args.granularity, wbits, abits)
        for rounding in args.roundings:
            for bias_correction in args.bias_correction:
                config = with_options(cell_config(cell), per_layer, rounding,
                                      None if rounding == "nearest" else args.iterations, 0)
                config = replace(config, bias_correction=bias_correction == "on")
                images = calibration.graph.preprocessing.apply(pixels[: config.rounding.images])
                start = time.perf_counter()
                integer, _ = learned_integer_model(calibration.graph, calibration.stats, config, images)
                seconds = time.perf_counter() - start
                accuracy = integer_accuracy(integer, data)
                row = {"model": args.model, "cell": f"W{wbits}A{abits}", "layer_bits": args.layer_bits,
                       "rounding": rounding, "bias_correction": bias_correction == "on", "float": reference,
                       "accuracy": accuracy, "seconds": round(seconds, 1), "calibration_images": len(pixels)}
                rows.append(row)
                print(f"  W{wbits}A{abits} {rounding}, bias correction {bias_correction}: {accuracy:.2f}% "
                      f"({accuracy - reference:+.2f}) in {seconds:.0f} s", flush=True)
                if args.json:
                    with args.json.open("a") as out:
                        out.write(json.dumps(row) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """One Markdown row per cell, one column per (rounding, bias correction): accuracy (drop), seconds."""
    columns = sorted(dict.fromkeys((row["rounding"], row["bias_correction"]) for row in rows), key=method_rank)
    cells = list(dict.fromkeys((row["model"], row["cell"]) for row in rows))
    found = {(row["model"], row["cell"], row["rounding"], row["bias_correction"]): row for row in rows}
    names = [rounding + (" + bias correction" if correction else "") for rounding, correction in columns]
    print("\n| model | cell | " + " | ".join(names) + " |")
    print("| --- | --- |" + " ---: |" * len(columns))
    for model, cell in cells:
        entries = []
        for rounding, correction in columns:
            row = found.get((model, cell, rounding, correction))
            entries.append("" if row is None else
                           f"{row['accuracy']:.2f} ({row['accuracy'] - row['float']:+.2f}), {row['seconds']:.0f} s")
        print(f"| {Path(model).stem} | {cell} | " + " | ".join(entries) + " |")


def method_rank(method: tuple[str, bool]) -> tuple[int, bool]:
    """Columns from the cheapest method to the dearest: nearest, adaround, brecq, then anything else (fine-tuning)."""
    order = ("nearest", "adaround", "brecq")
    return (order.index(method[0]) if method[0] in order else len(order), method[1])


def label(row: dict) -> str:
    return row["rounding"] + (" + bias correction" if row["bias_correction"] else "")


def plot(rows: list[dict], target: Path) -> None:
    """One panel per model: integer-only accuracy of each cell (x) for each method (bars), float as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    methods = [label({"rounding": r, "bias_correction": b}) for r, b in
               sorted(dict.fromkeys((row["rounding"], row["bias_correction"]) for row in rows), key=method_rank)]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.6), layout="constrained", squeeze=False)
    legend: set[str] = set()
    for ax, model in zip(axes[0], models):
        mine = [row for row in rows if row["model"] == model]
        cells = list(dict.fromkeys(row["cell"] for row in mine))
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            found = {row["cell"]: row["accuracy"] for row in mine if label(row) == method}
            xs = [i + (k - (len(methods) - 1) / 2) * width for i, cell in enumerate(cells) if cell in found]
            if xs:  # one colour per method in every panel
                ax.bar(xs, [found[cell] for cell in cells if cell in found], width, color=f"C{k}",
                       label=method if method not in legend else None)
                legend.add(method)
        ax.axhline(mine[0]["float"], color="black", linestyle="--", linewidth=1,
                   label="float" if model == models[0] else None)
        ax.set_xticks(range(len(cells)), cells)
        ax.set(title=Path(model).stem, ylabel="integer-only top-1 % (10,000 test images)")
        low = min(row["accuracy"] for row in mine)
        ax.set_ylim(max(0, low - 5), mine[0]["float"] + 3)
    fig.legend(loc="outside lower center", ncols=4, fontsize=8)
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
