"""Render sensitivity results as sensitivity.html / .md with a ranked bar chart."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from intq.report import plots
from intq.report.document import Heading, Image, Paragraph, Table, pct, write_document


def _methods(results: Mapping[str, Any]) -> str:
    """', with bias correction and equalization in every evaluated model' (or ''), from the results
    (absent in results written before these options: off)."""
    used = [name for key, name in (("bias_correction", "bias correction"), ("equalization", "equalization"))
            if results.get(key)]
    return f", with {' and '.join(used)} in every evaluated model" if used else ""


def _learned(results: Mapping[str, Any]) -> str:
    """The learned rounding of the chosen mix, when there was one: its validation accuracy and seconds."""
    learned = results["mixed"].get("learned")
    if not learned:
        return ""
    return (f" The search rounds to nearest; {learned['rounding']} rounding was then learned on the chosen mix "
            f"({learned['seconds']:.0f} s): validation {pct(learned['validation_accuracy'])}%; that model is saved.")


def write_sensitivity_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    bits, rows, mixed = results["bits"], results["rows"], results["mixed"]
    test = results["test_accuracy"]
    ranked = Table(("layer", f"only this layer at {bits} bits", f"all but this layer at {bits} bits"),
                   tuple((r["layer"], pct(r["only_this_layer"]), pct(r["all_but_this_layer"])) for r in rows))
    chosen = ", ".join(f"{layer}={b}" for layer, b in mixed["layer_bits"].items())
    outcome = Table(("model", "test accuracy"), tuple((label, pct(value)) for label, value in test.items()))
    worst = rows[0]
    blocks = [
        Heading(f"Sensitivity: {results['model']} at {bits}-bit weights"),
        Paragraph(f"Integer-only, per-channel {results['method']} ranges, {results['abits']}-bit activations"
                  f"{_methods(results)}; "
                  f"validation on {results['validation_images']:,} training images not used for calibration "
                  f"(8-bit: {pct(results['validation_8bit'])}%). Layers ranked by accuracy with only that "
                  f"layer at {bits} bits: {worst['layer']} is the most sensitive "
                  f"({pct(worst['only_this_layer'])}%)."),
        Image("sensitivity.png", "accuracy with one layer at low bits",
              plots.sensitivity_figure(rows, bits, results["validation_8bit"])),
        ranked,
        Heading("Mixed precision (greedy)", level=3),
        Paragraph(f"Lowering one layer one step at a time (8, 6, 4, 3, 2 bits) while validation accuracy "
                  f"stays within {results['max_drop']:.2f} points of 8-bit chose {chosen}: "
                  f"{mixed['weight_bytes'] / 1000:.1f} KB of weights (ideal bits/8), a {mixed['file_bytes'] / 1000:.1f} KB "
                  f".npz, validation {pct(mixed['validation_accuracy'])}%.{_learned(results)}"),
        outcome,
    ]
    return write_document(blocks, out_dir, f"intq sensitivity — {results['model']}", stem="sensitivity")
