"""Render sweep results (sweep.json) as sweep.html / sweep.md with an accuracy-against-bits plot.

Reads numbers only: the best cell per bit-width pair and its margin are looked up, not computed
from models. Rows of a sweep before the PTQ-method axes (rounding, bias correction, equalization,
fine-tuning) lack those fields: absent reads as nearest, off, off, 0 epochs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from intq.report import plots
from intq.report.document import Heading, Image, Paragraph, Table, delta, pct, write_document


AXES = (("rounding", "nearest"), ("bias_correction", False), ("equalization", False), ("finetune_epochs", 0))


def _axes(row: Mapping[str, Any]) -> tuple:
    """The row's PTQ-method combination (rounding, bias correction, equalization, fine-tuning epochs)."""
    return tuple(row.get(name, default) for name, default in AXES)


def _methods(row: Mapping[str, Any]) -> str:
    """'adaround + bias correction + equalization + 1 epoch fine-tuned'; nearest rounding unnamed but
    in the plain cell, 'nearest'."""
    rounding, corrected, equalized, epochs = _axes(row)
    parts = ["" if rounding == "nearest" else rounding, "bias correction" * corrected, "equalization" * equalized,
             f"{epochs} epoch{'s' * (epochs != 1)} fine-tuned" if epochs else ""]
    return " + ".join(filter(None, parts)) or "nearest"


def _label(row: Mapping[str, Any]) -> str:
    """'mse (per-channel)', with its methods when the row has any beyond nearest rounding."""
    plain = _axes(row) == tuple(default for _, default in AXES)
    return f"{row['method']} ({row['granularity']})" + ("" if plain else f" {_methods(row)}")


def _methods_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """One row per cell, the axes as columns; Δ plain: accuracy minus that of the same range method,
    granularity and widths with nearest rounding and nothing else (— when not swept)."""
    plain = {(r["method"], r["granularity"], r["wbits"], r["abits"]): r["accuracy"] for r in rows
             if _axes(r) == tuple(default for _, default in AXES)}
    order = {pair: index for index, pair in enumerate(_bit_pairs(rows))}
    body = []
    for row in sorted(rows, key=lambda r: order[(r["wbits"], r["abits"])]):
        rounding, corrected, equalized, epochs = _axes(row)
        base = plain.get((row["method"], row["granularity"], row["wbits"], row["abits"]))
        gain = None if row["accuracy"] is None or base is None else row["accuracy"] - base
        seconds = row.get("method_seconds")
        body.append((f"W{row['wbits']}A{row['abits']}", f"{row['method']} ({row['granularity']})", rounding,
                     "on" if corrected else "off", "on" if equalized else "off", str(epochs), pct(row["accuracy"]),
                     delta(None if row.get("drop") is None else -row["drop"]), delta(gain),
                     "—" if seconds is None else f"{seconds:.1f}"))
    return Table(("bits", "range method", "rounding", "bias correction", "equalization", "fine-tuning epochs",
                  "accuracy", "Δ float", "Δ plain", "seconds"), tuple(body), labels=6)


def _bit_pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    pairs = {(row["wbits"], row["abits"]) for row in rows}
    return sorted(pairs, key=lambda pair: (-pair[1], -pair[0]))


def _grid_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Rows: method (granularity); columns: WxAy; cells: accuracy."""
    pairs = _bit_pairs(rows)
    by_key = {(_label(r), r["wbits"], r["abits"]): r for r in rows}
    labels = list(dict.fromkeys(_label(r) for r in rows))
    body = tuple((label, *(pct(by_key[(label, w, a)]["accuracy"]) if (label, w, a) in by_key else "—"
                           for w, a in pairs)) for label in labels)
    return Table(("method", *(f"W{w}A{a}" for w, a in pairs)), body)


def _best_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    best = []
    for wbits, abits in _bit_pairs(rows):
        cell = [r for r in rows if (r["wbits"], r["abits"]) == (wbits, abits) and r["accuracy"] is not None]
        if cell:
            best.append(max(cell, key=lambda r: r["accuracy"]))
    return best


def _best_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    body = tuple((f"W{r['wbits']}A{r['abits']}", _label(r), pct(r["accuracy"]), delta(-r["drop"]),
                  f"{r.get('weight_bytes', 0) / 1000:.1f}") for r in _best_rows(rows))
    return Table(("bits", "best method", "accuracy", "Δ float", "weights (KB)"), body, labels=2)


def _method_sentences(rows: Sequence[Mapping[str, Any]]) -> str:
    """Which method wins how often, and its mean margin over the runner-up, from the table."""
    wins: dict[str, list[float]] = {}
    for wbits, abits in _bit_pairs(rows):
        cell = sorted((r for r in rows if (r["wbits"], r["abits"]) == (wbits, abits) and r["accuracy"] is not None),
                      key=lambda r: -r["accuracy"])
        if len(cell) >= 2:
            wins.setdefault(_label(cell[0]), []).append(cell[0]["accuracy"] - cell[1]["accuracy"])
    parts = [f"{label} is best in {len(margins)} of {len(_bit_pairs(rows))} bit-width pairs "
             f"(by {sum(margins) / len(margins):.2f} points on average over the runner-up)"
             for label, margins in sorted(wins.items(), key=lambda item: -len(item[1]))]
    return "; ".join(parts) + "." if parts else ""


def _figure_panels(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        if row["accuracy"] is not None:
            panel = panels.setdefault(f"{row['abits']}-bit activations", {})
            panel.setdefault(_label(row), []).append((row["wbits"], row["accuracy"]))
    return dict(sorted(panels.items(), key=lambda item: -int(item[0].split("-")[0])))


def write_sweep_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """sweep.html, sweep.md and sweep.png from a sweep results dictionary."""
    rows = results["rows"]
    config = results.get("config", {})
    failed = [r for r in rows if r["accuracy"] is None]
    blocks = [
        Heading(f"Sweep: {results['model']}"),
        Paragraph(f"Integer-only top-1 accuracy on {config.get('test_images', '?')} test images; float model "
                  f"{pct(results['float_accuracy'])}%. One calibration pass on {config.get('calibration_images', '?')} "
                  f"training images feeds every method. Weights {config.get('weights', '')}; activations "
                  f"{config.get('activations', '')}; logits {config.get('logits', '')}; biases int32."),
        Paragraph(_method_sentences(rows)),
        Image("sweep.png", "accuracy against weight bits", plots.sweep_figure(results["float_accuracy"], _figure_panels(rows))),
        Heading("Best method per bit-width pair", level=3),
        _best_table(rows),
        Heading("Every cell", level=3),
        _grid_table(rows),
    ]
    if len({_axes(r) for r in rows}) > 1:
        blocks += [Heading("What each method buys", level=3),
                   Paragraph("Each cell with its rounding, bias correction, equalization and fine-tuning; Δ plain is "
                             "the gain over the same range method and widths with nearest rounding alone; seconds: "
                             "making the integer model (conversion, learned rounding or fine-tuning), not its test."),
                   _methods_table(rows)]
    if failed:
        blocks.append(Paragraph("Not convertible: " + "; ".join(f"{_label(r)} W{r['wbits']}A{r['abits']}: {r['error']}"
                                                               for r in failed)))
    return write_document(blocks, out_dir, f"intq sweep — {results['model']}", stem="sweep")
