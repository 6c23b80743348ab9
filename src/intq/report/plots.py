"""Figures for the report, drawn from numbers already in results.json.

Every function returns a `matplotlib.figure.Figure` built directly (no pyplot): no global state,
no display needed, safe to call from any thread. `save_png` writes one atomically. Nothing here
computes a statistic: histograms arrive as (edges, counts) and are drawn as they are.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from intq.files import atomic_write

PUBLISHED_COLOR = "0.6"
_PRESET_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
_PRESET_STYLES = (":", "-.", (0, (5, 2)), (0, (1, 3)))
_FILL = "#c9c3e0"  # histogram fill: light lilac, unlike any line colour
_PANEL_COLUMNS = 3
_DPI = 110

Series = tuple[str, str, Sequence[float | None]]  # (legend label, colour, one value per group)


def preset_color(index: int) -> str:
    """The colour of the index-th preset, the same in every figure."""
    return _PRESET_COLORS[index % len(_PRESET_COLORS)]


def plain(text: str) -> str:
    """Text for matplotlib with '$' escaped, so a name can never start mathtext."""
    return str(text).replace("$", r"\$")


def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` to `path` as a PNG, atomically."""
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=_DPI)
    return path


def _panels(count: int, title: str) -> tuple[Figure, list[Axes]]:
    """A figure with `count` panels, _PANEL_COLUMNS per row; unused cells hidden."""
    cols = max(1, min(_PANEL_COLUMNS, count))
    rows = max(1, math.ceil(count / cols))
    height = 3.1 * rows + 1.0
    fig = Figure(figsize=(4.3 * cols, height))
    # fixed margins: a layout engine measures every tick label and costs ~60% of the drawing time
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.55 / height, bottom=0.9 / height, hspace=0.45, wspace=0.28)
    fig.suptitle(plain(title))
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _histogram(ax: Axes, hist: Mapping[str, Any] | None, log_y: bool) -> None:
    """Draw a stored histogram (n+1 edges, n counts) as filled steps."""
    edges = list((hist or {}).get("edges") or [])
    counts = list((hist or {}).get("counts") or [])
    if not counts or len(edges) != len(counts) + 1:
        ax.text(0.5, 0.5, "no histogram", transform=ax.transAxes, ha="center", va="center")
        return
    if log_y:
        # Post-ReLU tensors put most values in the bin at 0; a log axis keeps the rest visible.
        # Empty bins sit at the axis floor (0.5) instead of at log(0).
        ax.set_yscale("log")
        ax.stairs([max(c, 0.5) for c in counts], edges, fill=True, baseline=0.5, color=_FILL)
    else:
        ax.stairs(counts, edges, fill=True, color=_FILL)


def _shape_text(shape: Sequence[int] | None) -> str:
    return "×".join(str(n) for n in shape) if shape else "?"


def weights_figure(model: str, layers: Mapping[str, Mapping[str, Any]]) -> Figure:
    """One panel per layer: the weight histogram, titled with the layer's name and shape."""
    fig, axes = _panels(len(layers), f"{model}: weight histograms")
    for ax, (name, stats) in zip(axes, layers.items()):
        _histogram(ax, stats.get("hist"), log_y=False)
        ax.set_title(plain(f"{name}  [{_shape_text(stats.get('shape'))}]"), fontsize=10)
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
    return fig


def _range_lines(ax: Axes, stats: Mapping[str, Any], presets: Sequence[str]) -> None:
    """Vertical lines: full range (solid), 3-sigma (dashed), each preset's clip (its colour)."""
    lines = [("full range (min/max)", "black", "-", (stats.get("min"), stats.get("max"))),
             ("3-sigma range", "0.55", "--", stats.get("sigma3"))]
    clips = stats.get("clip") or {}
    for index, preset in enumerate(presets):
        style = _PRESET_STYLES[index % len(_PRESET_STYLES)]
        lines.append((f"{preset} clip", preset_color(index), style, clips.get(preset)))
    for label, color, style, pair in lines:
        values = [v for v in (pair or ()) if v is not None]
        for position, value in enumerate(values):
            ax.axvline(value, color=color, linestyle=style, linewidth=1.6,
                       label=plain(label) if position == 0 else None)


def activations_figure(model: str, tensors: Mapping[str, Mapping[str, Any]],
                       presets: Sequence[str]) -> Figure:
    """One panel per tensor: log-count histogram with full, 3-sigma and clip ranges marked."""
    fig, axes = _panels(len(tensors), f"{model}: activation histograms (log count)")
    for ax, (name, stats) in zip(axes, tensors.items()):
        _histogram(ax, stats.get("hist"), log_y=True)
        _range_lines(ax, stats, presets)
        ax.set_title(plain(name), fontsize=10)
        ax.set_xlabel("value")
        ax.set_ylabel("count")
    if axes:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncols=min(4, max(1, len(labels))), fontsize=8)
    return fig


def _grouped_bars(ax: Axes, groups: int, series: Sequence[Series]) -> None:
    width = 0.8 / max(1, len(series))
    for index, (label, color, values) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        xs = [group + offset for group in range(groups)]
        heights = [math.nan if v is None else v for v in values]
        ax.bar(xs, heights, width, label=plain(label), color=color)


def accuracy_figure(labels: Sequence[str], accuracy: Sequence[Series],
                    change: Sequence[Series]) -> Figure:
    """Two rows of grouped bars, one group per (model, stage): accuracy and change vs float."""
    fig = Figure(figsize=(max(7.0, 1.0 * len(labels) + 2.0), 7.5))
    fig.subplots_adjust(left=0.1, right=0.98, top=0.97, bottom=0.2, hspace=0.08)
    top, bottom = fig.subplots(2, 1, sharex=True)
    _grouped_bars(top, len(labels), accuracy)
    known = [v for _, _, values in accuracy for v in values if v is not None]
    if known:
        # Zoomed axis: the differences between presets are a few points out of ~50.
        top.set_ylim(max(0.0, min(known) - 3.0), min(100.0, max(known) + 2.0))
    top.set_ylabel("test accuracy (%) — axis zoomed")
    top.legend(fontsize=8, ncols=min(4, max(1, len(accuracy))))
    _grouped_bars(bottom, len(labels), change)
    bottom.axhline(0.0, color="black", linewidth=0.8)
    bottom.set_ylabel("change vs float (points)")
    bottom.set_xticks(range(len(labels)), [plain(label) for label in labels],
                      rotation=30, ha="right", fontsize=8)
    return fig


def _loss_x(losses: Sequence[Sequence[float]]) -> list[float]:
    """Mini-batches seen at each logged point: (epoch - 1) * E + iteration, E = last logged one."""
    per_epoch = max(int(entry[1]) for entry in losses)
    return [(int(entry[0]) - 1) * per_epoch + int(entry[1]) for entry in losses]


def loss_figure(training: Mapping[str, Mapping[str, Any]]) -> Figure | None:
    """Training loss against mini-batches, one line per model; None when no model logged any."""
    curves = {model: info.get("losses") for model, info in training.items()
              if isinstance(info, Mapping) and info.get("losses")}
    if not curves:
        return None
    fig = Figure(figsize=(7.0, 4.0))
    fig.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.13)
    ax = fig.subplots()
    for model, losses in curves.items():
        ax.plot(_loss_x(losses), [entry[2] for entry in losses], marker="o", markersize=3,
                label=plain(model))
    ax.set_xlabel("mini-batches (at each logged point)")
    ax.set_ylabel("running training loss")
    ax.set_title("Training loss")
    ax.legend()
    return fig


def sweep_figure(float_accuracy: float, panels: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]) -> Figure:
    """Accuracy against weight bits, one panel per activation width, one line per method (a range method
    and granularity with its rounding, bias correction, equalization and fine-tuning)."""
    fig, axes = _panels(len(panels), "integer-only test accuracy against weight bits")
    for ax, (title, lines) in zip(axes, panels.items()):
        for index, (label, points) in enumerate(lines.items()):
            xs, ys = zip(*sorted(points)) if points else ((), ())
            style = ("-", "--", ":", "-.")[index // len(_PRESET_COLORS) % 4]  # colours repeat: the style differs
            ax.plot(xs, ys, marker="o", markersize=4, color=preset_color(index), linestyle=style, label=plain(label))
        ax.axhline(float_accuracy, color="black", linewidth=0.8, linestyle="--", label="float")
        ax.set_title(plain(title), fontsize=10)
        ax.set_xlabel("weight bits")
        ax.set_ylabel("accuracy (%)")
        ax.invert_xaxis()
    if axes:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncols=min(6, max(1, len(labels))), fontsize=8)
    return fig


def sensitivity_figure(rows: Sequence[Mapping[str, Any]], bits: int, reference: float) -> Figure:
    """Horizontal bars per layer: accuracy with only it, and with all but it, at `bits`."""
    fig = Figure(figsize=(7.0, 1.0 + 0.55 * len(rows)))
    fig.subplots_adjust(left=0.15, right=0.97, top=0.88, bottom=0.12 + 0.3 / max(1, len(rows)))
    ax = fig.subplots()
    positions = list(range(len(rows)))
    ax.barh([p + 0.2 for p in positions], [r["only_this_layer"] for r in rows], 0.4,
            color=preset_color(0), label=f"only this layer at {bits} bits")
    ax.barh([p - 0.2 for p in positions], [r["all_but_this_layer"] for r in rows], 0.4,
            color=preset_color(1), label=f"all but this layer at {bits} bits")
    ax.axvline(reference, color="black", linestyle="--", linewidth=0.8, label="all 8-bit")
    ax.set_yticks(positions, [plain(r["layer"]) for r in rows])
    ax.set_xlabel("validation accuracy (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Per-layer sensitivity")
    return fig


_TRADEOFF_METRICS = (("ideal_weight_bytes", "weight bytes"), ("arithmetic_uj", "arithmetic energy"),
                     ("sram_uj", "SRAM energy"), ("mac_area_um2", "MAC area"),
                     ("latency_ms_b1", "latency (batch 1)"), ("throughput_b256", "throughput (batch 256)"))


def tradeoff_figure(model: str, configs: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Each configuration's figures divided by float's, on a log axis (1 = same as float)."""
    fig = Figure(figsize=(8.5, 4.2))
    fig.subplots_adjust(left=0.09, right=0.98, top=0.9, bottom=0.27)
    ax = fig.subplots()
    base = configs["float"]
    series = [(name, preset_color(index), [c[key] / base[key] for key, _ in _TRADEOFF_METRICS])
              for index, (name, c) in enumerate((n, c) for n, c in configs.items() if n != "float")]
    _grouped_bars(ax, len(_TRADEOFF_METRICS), series)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(_TRADEOFF_METRICS)), [label for _, label in _TRADEOFF_METRICS], rotation=20, ha="right")
    ax.set_ylabel("relative to float32 (log)")
    ax.set_title(plain(f"{model}: what int8 buys (below 1 = smaller/cheaper; throughput above 1 = faster)"), fontsize=10)
    ax.legend(fontsize=8)
    return fig
