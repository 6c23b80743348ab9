"""Timing of the CIFAR-10 study: the whole `intq run` with an empty weights cache, calibration over
all 50,000 training images, and the training step. Prints medians and ratios; run by hand:

    .venv/bin/python benchmarks/bench_study.py [--data DIR] [--repeats N] [--skip-run]

The decoded-data cache is reused (decoding is a one-time cost the bar excludes); trained weights
go to a fresh temporary cache so both models really train.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from intq.graph.capture import capture
from intq.cifar.data import load_cifar10, normalize
from intq.cifar.models import Net
from intq.workflows.pipeline import statistics as calibration_statistics
from intq.cifar.train import Recipe, train

ROOT = Path(__file__).resolve().parents[1]


def bench_run(data: str, cache: Path) -> dict:
    """`intq run` once with a fresh weights cache that links to the decoded data."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "cache"
        fresh.mkdir()
        for entry in cache.glob("cifar10-*"):
            (fresh / entry.name).symlink_to(entry.resolve())
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "intq.cli", "run", "--data", data, "--out", str(Path(tmp) / "out"),
                        "--cache", str(fresh)], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        results = json.loads((Path(tmp) / "out" / "results.json").read_text())
    return {"wall_s": wall, **results["timings_s"], "train_per_model_s": {m: t["seconds"] for m, t in results["training"].items()}}


def bench_calibration(images: torch.Tensor, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    graph = capture(Net().eval(), normalize(images[:2]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        calibration_statistics(graph, images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_train_step(images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Median-free estimate: mean ms per step of the study's recipe over `steps` mini-batches."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = Recipe(epochs=1, log_every=10**9)
    count = steps * recipe.batch_size
    start = time.perf_counter()
    train(Net(), normalize(images[:count]), labels[:count], recipe, seed=0, log=lambda line: None)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("INTQ_DATA", str(ROOT.parent / "shared/data/cifar10-jpeg")))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("INTQ_CACHE", ROOT / ".cache/intq")))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-run", action="store_true", help="only the calibration and step benchmarks")
    args = parser.parse_args()
    data = load_cifar10(args.data, args.cache)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}")
    step_ms = [bench_train_step(data.train_images, data.train_labels, 2000) for _ in range(args.repeats)]
    print(f"training step (batch 4, 1 thread): median {statistics.median(step_ms):.2f} ms "
          f"-> {statistics.median(step_ms) * 25:.1f} s per model (25,000 steps)")
    for threads in (1, 2):
        seconds = bench_calibration(data.train_images, threads, args.repeats)
        print(f"calibration, all {len(data.train_images):,} training images, {threads} thread(s): "
              f"median {seconds:.2f} s (bar 5 s: {seconds / 5:.2f}x of it)")
    if not args.skip_run:
        runs = [bench_run(args.data, args.cache) for _ in range(args.repeats)]
        for key in ("wall_s", "data", "train", "calibrate", "evaluate", "report", "total"):
            values = [run[key] for run in runs]
            print(f"intq run, empty weights cache: {key:9s} median {statistics.median(values):6.1f} s  "
                  f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
        total = statistics.median(run["total"] for run in runs)
        print(f"total / 90 s bar = {total / 90:.2f}; total / 60 s = {total / 60:.2f}")


if __name__ == "__main__":
    main()
