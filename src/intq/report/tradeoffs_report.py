"""The report section "What int8 buys": size, MACs, estimated energy and area, measured speed.

Reads results["tradeoffs"] and results["layer_costs"] (written by the study) and the accuracy
rows; computes only ratios of numbers already there.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from intq.report import plots
from intq.workflows.costs import SOURCE
from intq.report.document import Block, Heading, Image, Paragraph, Table, integer, num, pct

INTEGER_STAGES = ("weights+activations", "integer+bias")
ASSUMPTIONS = ("Estimates, not measurements: one MAC is a multiply at the operand width plus an add at the "
               "accumulator width (int8 x int8 + int32, or fp32 x fp32 + fp32); weights and activations sit in "
               "on-chip SRAM, each weight read once per image and each layer output written once and read once; "
               "the DRAM column is the cost of fetching the weights from DRAM instead. Latency and throughput are "
               "measured on this machine, one thread per model, both models at once. Source: " + SOURCE + ".")


def _accuracy(rows: Sequence[Mapping[str, Any]], model: str, config: str) -> float | None:
    for row in rows:
        if row["model"] == model and ((config == "float" and row["stage"] == "float")
                                      or (row["preset"] == config and row["stage"] in INTEGER_STAGES)):
            return row["accuracy"]
    return None


def _table(model: str, configs: Mapping[str, Mapping[str, Any]], rows) -> Table:
    body = tuple((name, c["executor"], pct(_accuracy(rows, model, name)), f"{c['file_bytes'] / 1000:.1f}",
                  f"{c['ideal_weight_bytes'] / 1000:.1f}", integer(c["macs"]), num(c["arithmetic_uj"]),
                  num(c["sram_uj"]), num(c["dram_weights_uj"]), integer(c["mac_area_um2"]),
                  f"{c['latency_ms_b1']:.2f}", f"{c['throughput_b256']:,.0f}") for name, c in configs.items())
    return Table(("configuration", "executor", "accuracy %", "file KB", "ideal weights KB", "MACs/image",
                  "arithmetic µJ", "SRAM µJ", "DRAM weights µJ", "MAC area µm²", "latency ms (batch 1)",
                  "images/s (batch 256)"), body, labels=2)


def _sentence(model: str, configs: Mapping[str, Mapping[str, Any]], rows) -> str:
    base = configs["float"]
    parts = []
    for name, c in configs.items():
        if name == "float":
            continue
        loss = (_accuracy(rows, model, "float") or 0) - (_accuracy(rows, model, name) or 0)
        verdict = f"gives up {loss:.2f} points" if loss > 0 else f"loses nothing ({-loss:+.2f} points)"
        parts.append(
            f"{model} under {name} {verdict} for {base['ideal_weight_bytes'] / c['ideal_weight_bytes']:.1f}x "
            f"smaller weights ({base['ideal_weight_bytes'] / 1000:.1f} → {c['ideal_weight_bytes'] / 1000:.1f} KB), "
            f"{base['arithmetic_uj'] / c['arithmetic_uj']:.1f}x less arithmetic energy per image "
            f"({num(base['arithmetic_uj'])} → {num(c['arithmetic_uj'])} µJ), {base['sram_uj'] / c['sram_uj']:.1f}x less SRAM "
            f"energy and {base['mac_area_um2'] / c['mac_area_um2']:.0f}x less MAC area; on this CPU its integer reference "
            f"executor runs at {c['throughput_b256'] / base['throughput_b256']:.2f}x PyTorch float's throughput "
            f"({c['throughput_b256']:,.0f} vs {base['throughput_b256']:,.0f} images/s) and "
            f"{c['latency_ms_b1'] / base['latency_ms_b1']:.1f}x its batch-1 latency")
    return ". ".join(parts) + "."


def _layer_table(costs: Sequence[Mapping[str, Any]]) -> Table:
    body = tuple((c["name"], integer(c["params"]), integer(c["macs"]), integer(c["activations"])) for c in costs)
    total = ("total", integer(sum(c["params"] for c in costs)), integer(sum(c["macs"] for c in costs)),
             integer(sum(c["activations"] for c in costs)))
    return Table(("layer", "parameters", "MACs/image", "outputs/image"), body + (total,))


def tradeoff_section(results: Mapping[str, Any], files: Mapping[str, str]) -> list[Block]:
    tradeoffs = results.get("tradeoffs") or {}
    if not tradeoffs:
        return []
    rows = results.get("rows") or []
    blocks: list[Block] = [Heading("What int8 buys: size, operations, energy, area, speed", anchor="tradeoffs"),
                           Paragraph(ASSUMPTIONS)]
    for model, configs in tradeoffs.items():
        blocks += [Heading(model, level=3), _table(model, configs, rows), Paragraph(_sentence(model, configs, rows)),
                   Image(f"tradeoffs_{files.get(model, model)}.png", f"{model}: each configuration relative to float",
                         plots.tradeoff_figure(model, configs))]
        costs = (results.get("layer_costs") or {}).get(model)
        if costs:
            blocks.append(_layer_table(costs))
    return blocks
