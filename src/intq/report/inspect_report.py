"""Render `intq inspect` results as inspect.html / inspect.md with the histograms and chosen ranges."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from intq.report import plots
from intq.report.document import Heading, Image, Paragraph, Table, integer, num, write_document


def _db(value: float) -> str:
    return "exact" if math.isinf(value) else f"{value:.1f}"


def _range(summary: Mapping[str, float]) -> str:
    if summary["min"] == summary["max"]:
        return num(summary["min"])
    return f"{num(summary['min'])} … {num(summary['max'])}"


def write_inspect_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    layers = results["layers"]
    params = Table(("layer", "input s / z", "weight bits", "weight scale (per channel)", "output s / z (type)",
                    "M0", "shift n"),
                   tuple((r["layer"], f"{num(r['input_scale'])} / {r['input_zero_point']}", str(r["weight_bits"]),
                          _range(r["weight_scale"]), f"{num(r['output_scale'])} / {r['output_zero_point']} ({r['output_type']})",
                          _range(r["mantissa"]), _range(r["shift"])) for r in layers), labels=1)
    errors = Table(("layer", "clipped", "SQNR fake-quant (dB)", "SQNR integer (dB)", "|acc| observed",
                    "|acc| bound", "bound / int32"),
                   tuple((r["layer"], f"{100 * r['clipped_share']:.3f}%", _db(r["sqnr_fake_quant_db"]), _db(r["sqnr_integer_db"]),
                          integer(r["accumulator_observed"]), integer(r["accumulator_bound"]),
                          f"{100 * r['accumulator_bound'] / r['int32_limit']:.2f}%") for r in layers))
    worst = min(layers, key=lambda r: r["sqnr_integer_db"])
    blocks = [
        Heading(f"Inspect: {results['model']} under {results['config']}"),
        Paragraph(f"{results['description'].rstrip('.')}. Diagnosed on {results['images']:,} test images; ranges from "
                  f"{results['calibration_images']:,} training images. SQNR compares with the float model at the "
                  f"layer's output: 'fake-quant' quantizes only that tensor, 'integer' is the whole integer pipeline "
                  f"up to it. The lowest integer SQNR is at {worst['layer']} ({_db(worst['sqnr_integer_db'])} dB)."),
        Heading("Error and overflow budget", level=3), errors,
        Heading("Quantization parameters", level=3), params,
        Image("inspect.png", "histograms with the chosen ranges",
              plots.activations_figure(results["model"], results["activations"], [results["config"]])),
    ]
    return write_document(blocks, out_dir, f"intq inspect — {results['model']}", stem="inspect")
