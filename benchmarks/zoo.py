"""The model zoo table (issue 13): torchvision's classifiers with seeded random weights through intq,
one row per architecture (workflows/zoo.py measures each). Run by hand:

    .venv/bin/python benchmarks/zoo.py [--data DIR | --synthetic] [--size 224] [--calibration 300]
        [--evaluation 100] [--exact-images 2] [--models resnet18 mobilenet_v2 ...] [--out runs/zoo]

--data defaults to the shared CIFAR-10 copy ../shared/data/cifar10-jpeg when it exists (its test
images, resized to --size), else synthetic images. Prints the Markdown table and writes it to
OUT/zoo.md, the figures to OUT/zoo.json and each model file to OUT/<model>.npz. With --models, the
rows of the other models already in OUT/zoo.json are kept (so a model can be measured again alone).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from intq.files import atomic_write_text, ensure_writable_dir, write_json
from intq.workflows.zoo import ENGINES, EXACT_EXECUTORS, NOISE_SNR_DB, ZOO, measure_zoo_model, zoo_images

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
HEADER = ("model", "parameters", "`.npz`", "convert", "top-1 = float", "logits SQNR",
          f"float, {NOISE_SNR_DB:.0f} dB noise per layer", "`c`, `onnx_exact`", "per op: `onnx`, `torch_quantized`")


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def exact_cell(row: dict) -> str:
    """'bit-exact (2 images)' when both exact executors are; else each one's result or why it did not run."""
    results = {name: row[name] for name in EXACT_EXECUTORS if name in row}
    if results and all(result.get("max_lsb") == 0 and result["differing_share"] == 0 for result in results.values()):
        return f"bit-exact ({row['executor_images']} images)"
    return "; ".join(f"{name}: {exact_result(result, row['executor_images'])}" for name, result in results.items())


def exact_result(result: dict, images: int) -> str:
    if "not_run" in result:
        return f"not run ({result['not_run']})"
    if "error" in result:
        return result["error"]
    if result["max_lsb"] == 0:
        return f"bit-exact ({images} images)"
    return f"{100 * result['differing_share']:.2f}% of values differ, max {result['max_lsb']} LSB"


def engine_cell(result: dict) -> str:
    """'≤ 1 LSB (3 of 565,200)': the largest per-op difference and how many op outputs differ."""
    if "error" in result:
        return result["error"]
    return f"≤ {result['per_op_max_lsb']} LSB ({result['per_op_differing']:,} of {result['per_op_values']:,})"


def table_row(row: dict) -> tuple[str, ...]:
    parameters = f"{row['float_parameters'] / 1e6:.1f} M"
    if "refused" in row:
        return (row["model"], parameters, f"refused: {row['refused']}", *[""] * (len(HEADER) - 3))
    engines = "; ".join(engine_cell(row[name]) for name in ENGINES if name in row)
    return (row["model"], parameters, megabytes(row["npz_bytes"]), f"{row['convert_s']:.1f} s",
            f"{100 * row['top1_agreement']:.0f}%", f"{row['sqnr_db']:.1f} dB",
            f"{100 * row['noise_top1_agreement']:.0f}%, {row['noise_sqnr_db']:.1f} dB", exact_cell(row), engines)


def markdown_table(rows: list[dict]) -> str:
    lines = [HEADER, tuple("---" if index == 0 else "---:" if index < 7 else "---" for index in range(len(HEADER)))]
    lines += [tuple(cell.replace("|", "\\|") for cell in table_row(row)) for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def machine() -> str:
    import torchvision

    return (f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"{torch.get_num_threads()} threads")


def previous_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {row["model"]: row for row in json.loads(path.read_text())["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA) if SHARED_DATA.is_dir() else None,
                        help="CIFAR-10 or an image folder (default: the shared CIFAR-10 copy if present)")
    parser.add_argument("--synthetic", action="store_true", help="seeded synthetic images instead of --data")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--calibration", type=int, default=300, help="calibration images (default 300)")
    parser.add_argument("--evaluation", type=int, default=100, help="evaluation images (default 100)")
    parser.add_argument("--exact-images", type=int, default=2, help="images for c, onnx_exact and the engines")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--models", nargs="+", choices=ZOO, default=list(ZOO))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/zoo"))
    parser.add_argument("--cache", default=os.environ.get("INTQ_CACHE", ".cache/intq"))
    args = parser.parse_args()
    out = ensure_writable_dir(args.out)
    data = None if args.synthetic else args.data
    images = zoo_images(data, size=args.size, calibration=args.calibration, evaluation=args.evaluation,
                        exact=args.exact_images, seed=args.seed, cache_dir=args.cache)
    rows = previous_rows(out / "zoo.json") if args.models != list(ZOO) else {}
    for name in args.models:
        started = time.perf_counter()
        rows[name] = {**measure_zoo_model(name, images, out_dir=out, num_classes=args.num_classes, seed=args.seed),
                      "total_s": time.perf_counter() - started,
                      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        table = write_results(out, [rows[model] for model in ZOO if model in rows], images, args)  # after each model
    print(table)


def write_results(out: Path, rows: list[dict], images, args: argparse.Namespace) -> str:
    """OUT/zoo.json and OUT/zoo.md for `rows`; returns the Markdown table."""
    summary = {"command": "benchmarks/zoo.py " + shlex.join(sys.argv[1:]), "machine": machine(),
               "images": images.source, "size": args.size, "calibration_images": len(images.calibration),
               "evaluation_images": len(images.evaluation), "executor_images": len(images.exact), "rows": rows}
    table = markdown_table(rows)
    write_json(out / "zoo.json", summary)
    atomic_write_text(out / "zoo.md", f"{summary['command']}\n\n{summary['machine']}; {summary['images']}, "
                                      f"{args.size}x{args.size}\n\n{table}")
    return table


if __name__ == "__main__":
    main()
