"""`intq verify`: run executors (executors/registry.py) over a whole image set and count how far each
is from the reference: share of output values that differ, the largest difference in LSB, and the
share of images whose top-1 differs; for the engines that requantize in float, also each op alone on
the reference's own inputs.
"""
from __future__ import annotations

import torch

from intq.executors.encoding import EngineError
from intq.executors.reference import run_integer
from intq.executors.registry import EXECUTORS as REGISTRY
from intq.executors.registry import executor, run
from intq.graph.integer_model import IntegerModel
from intq.progress import progress

EXECUTORS = tuple(name for name in REGISTRY if name != "reference")  # what verify checks by default


class VerifyError(Exception):
    """An executor that cannot run here (names it and why)."""


def run_executor(name: str, model: IntegerModel, pixels: torch.Tensor, engine: str = "onednn"):
    """(output integers, notes, per-op rows) of one executor: the rows are layer_differences' for an
    engine, and for an exact executor one row per op with the path it takes (EXACT_PATHS) and no
    per-op counts (its whole output is compared instead)."""
    chosen = executor(name, engine)
    try:
        forward = chosen.prepare(model)
        output = run(forward, pixels, what=f"verify {name}")
        notes, steps = chosen.notes(model, forward), chosen.op_steps(model, forward)
    except EngineError as err:
        raise VerifyError(str(err)) from None
    if chosen.setting:
        notes = [chosen.setting] + notes
    if steps is None:
        return output, notes, {op.name: {"type": type(op).__name__, "path": EXACT_PATHS.get(name, "exact integers")} for op in model.layers}
    rows = layer_differences(model, steps, pixels)
    return output, notes + [per_op_note(rows)], rows


# The path every op takes on an executor without per-op steps: bit-exact by construction, or (onnx_qdq)
# float ops whose inputs are dequantized values, so only its whole output is compared.
EXACT_PATHS = {"reference": "exact integers (the reference)", "c": "exact integers (generated C)",
               "onnx_exact": "exact integer subgraph (ONNX Runtime)",
               "onnx_qdq": "QDQ node unit (ONNX Runtime; whole model compared, no per-op check)"}


def path_summary(rows: dict[str, dict]) -> list[str]:
    """One line per (op type, path) pair, in first-seen order: how many ops took it and, for an
    engine's rows, how many of their values differ from the reference and by how much."""
    paths = {row["path"] for row in rows.values()}
    if len(paths) == 1 and not any("values" in row for row in rows.values()):
        return [f"all {len(rows)} ops: {paths.pop()}"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows.values():
        groups.setdefault((row["type"], row["path"]), []).append(row)
    lines = []
    for (kind, path), members in groups.items():
        line = f"{len(members)} x {kind}: {path}"
        if "values" in members[0]:
            values, differing = sum(m["values"] for m in members), sum(m["differing"] for m in members)
            line += (f"; {differing:,} of {values:,} values differ"
                     + (f", max {max(m['max_lsb'] for m in members)} LSB" if differing else ""))
        lines.append(line)
    return lines


def layer_differences(model: IntegerModel, steps: list[tuple], pixels: torch.Tensor, batch: int = 500) -> dict[str, dict]:
    """Each engine step, step(*operand integers) -> integers, fed the reference's own inputs, so a
    difference is that op's alone (not one carried from an earlier layer):
    {op: {"type", "path", "values", "differing", "max_lsb"}}, `path` being how the op ran (the
    step's own `path`: a kernel, or the exact integers where the engine has none)."""
    totals = {op.name: {"type": type(op).__name__, "path": getattr(step, "path", "engine"),
                        "values": 0, "differing": 0, "max_lsb": 0} for op, step in steps}
    for start in progress(range(0, len(pixels), batch), "verify per op"):
        values = {}
        run_integer(model, pixels[start : start + batch], visit=lambda name, q: values.__setitem__(name, q))
        for op, step in steps:
            difference = (step(*(values[name] for name in op.inputs)).to(torch.int64) - values[op.name].to(torch.int64)).abs()
            row = totals[op.name]
            row["values"] += difference.numel()
            row["differing"] += int((difference > 0).sum())
            row["max_lsb"] = max(row["max_lsb"], int(difference.max()))
    return totals


def per_op_note(layers: dict[str, dict]) -> str:
    """One line summing layer_differences over every op."""
    differing, values = sum(row["differing"] for row in layers.values()), sum(row["values"] for row in layers.values())
    return (f"each op fed the reference's inputs: {differing:,} of {values:,} values differ ({100 * differing / values:.2g}%), "
            f"max {max(row['max_lsb'] for row in layers.values())} LSB (differences above compound through the network)")


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Share of values that differ, largest |difference| in LSB, share of images whose argmax differs."""
    difference = (reference - other).abs()
    return {"values": reference.numel(), "differing_share": float((difference > 0).double().mean()),
            "max_lsb": int(difference.max()), "top1_differing_share":
            float((reference.argmax(dim=1) != other.argmax(dim=1)).double().mean())}


def verify(model: IntegerModel, pixels: torch.Tensor, executors: tuple[str, ...] = EXECUTORS,
           engine: str = "onednn") -> dict[str, dict]:
    """Every executor against the reference on `pixels`: {executor: compare(...) + notes}; `engine`
    is torch_quantized's PyTorch backend (TorchQuantizedModel)."""
    unknown = [name for name in executors if name not in REGISTRY]
    if unknown:
        raise VerifyError(f"unknown executor {', '.join(map(repr, unknown))}; available: {', '.join(EXECUTORS)}")
    reference = run(REGISTRY["reference"].prepare(model), pixels, what="verify reference")
    results = {}
    for name in progress(executors, "verify"):
        output, notes, ops = run_executor(name, model, pixels, engine)
        row = compare(reference, output)
        results[name] = {**row, "max_real": row["max_lsb"] * float(model.output_qparams().scale), "notes": notes,
                         "ops": ops}
    return results

