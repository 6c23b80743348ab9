"""Timing of the default `intq sweep` on Net (5 methods x W{8,6,4,3,2} x A{8,6,4}, per-channel):
the issue's bar is 5 minutes on 2 cores. Run by hand:

    .venv/bin/python benchmarks/bench_sweep.py [--data DIR] [--repeats N]

Trained weights and decoded data come from the cache (train once with `intq run`).
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

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("INTQ_DATA", str(ROOT.parent / "shared/data/cifar10-jpeg")))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    walls = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "intq.cli", "sweep", "--data", args.data, "--out", out],
                           check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - start)
            cells = len(json.loads((Path(out) / "sweep.json").read_text())["rows"])
    wall = statistics.median(walls)
    print(f"default sweep: {cells} cells, median {wall:.1f} s over {len(walls)} run(s) "
          f"({wall / cells:.2f} s per cell); bar 300 s: {wall / 300:.2f}x of it")


if __name__ == "__main__":
    main()
