"""The drop from float of fine-tuned models, from the --json files of `intq finetune` (issue 14): one bar per
model, the issue's bar as a line; README's "Four bits and below: quantization-aware fine-tuning" figure.
Run by hand:

    PYTHONPATH=src .venv/bin/python benchmarks/plot_finetune.py --bar 0.3 --out docs/images/finetune.png \
        "BRECQ, no fine-tuning=brecq-ft1.json:before" "SGD, KD=sgd-kd.json" "Adam, CE=adam.json" ...

Each LABEL=FILE.json reads FILE's after_accuracy (":before": its before_accuracy, the post-training model the
fine-tuning started from) against its float_accuracy, and prints the rows it drew.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def drop(spec: str) -> tuple[str, float, float]:
    """(label, accuracy, float accuracy) of one LABEL=FILE.json[:before]; SystemExit naming the file when bad."""
    label, _, source = spec.rpartition("=")
    path, _, which = source.partition(":")
    if not label or which not in ("", "before"):
        sys.exit(f"plot_finetune: {spec!r}: write LABEL=FILE.json or LABEL=FILE.json:before")
    try:
        figures = json.loads(Path(path).read_text())
        values = figures[f"{which or 'after'}_accuracy"], figures["float_accuracy"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        sys.exit(f"plot_finetune: {path}: not an intq finetune --json file ({err})")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 100 for v in values):
        sys.exit(f"plot_finetune: {path}: accuracies must be percentages, got {values}")
    return label, float(values[0]), float(values[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", metavar="LABEL=FILE.json[:before]")
    parser.add_argument("--bar", type=float, default=0.3, help="the drop to stay within, in points (default: 0.3)")
    parser.add_argument("--title", default="ResNet-20 W4A4, drop from float")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    rows = [drop(spec) for spec in args.rows]
    for label, accuracy, float_accuracy in rows:
        print(f"{label:<60} {accuracy:6.2f}  {accuracy - float_accuracy:+.2f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4), layout="constrained")
    drops = [accuracy - float_accuracy for _, accuracy, float_accuracy in rows]
    colours = ["C2" if d >= -args.bar else "C0" for d in drops]
    ax.barh(range(len(rows)), drops, color=colours)
    for y, d in enumerate(drops):
        ax.text(d, y, f" {d:+.2f} ", va="center", ha="right" if d < 0 else "left", fontsize=8)  # beyond the bar
    ax.axvline(-args.bar, color="black", linestyle="--", linewidth=1, label=f"within {args.bar:g} point")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(min(drops), -args.bar) * 1.15, max(max(drops), 0) + 0.2)
    ax.set(title=args.title, xlabel="integer-only top-1 minus float, points (10,000 test images)")
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
