"""`intq verify`: run an executor over a whole image set and count how far it is from the reference.

Executors: `c` (the exported C99 model, compiled with the system compiler), `torch_quantized` (PyTorch's
quantized kernels), `onnx` (QLinearConv in ONNX Runtime) and `onnx_exact` (integer subgraphs in ONNX
Runtime). For each: share of output values that differ, the
largest difference in LSB, and the share of images whose top-1 differs.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from intq.executors.c_export import export_c
from intq.executors.encoding import EngineError
from intq.executors.reference import run_integer
from intq.integer_model import IntegerModel
from intq.model_check import check_model


EXECUTORS = ("c", "torch_quantized", "onnx", "onnx_exact")


class VerifyError(Exception):
    """An executor that cannot run here (names it and why)."""


COMPILE_TIMEOUT_S = 300
C_MACS_PER_SECOND = 2e7  # the plain C loop nest ran ResNet-20 at ~3e8 MAC/s here; 15x slack


def run_timeout_s(model: IntegerModel, images: int) -> float:
    """A generous limit for the C executor on `images` images: 60 s plus the MACs at C_MACS_PER_SECOND."""
    shapes = check_model(model)
    macs = sum(op.weight.size * int(np.prod(shapes[op.name][1:])) for op in model.quantized_layers())
    return 60 + images * macs / C_MACS_PER_SECOND


def _run_step(command: list[str], folder: Path, timeout: float, what: str) -> None:
    """One subprocess (an argument list, no shell) with a time limit; VerifyError naming the step."""
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VerifyError(f"executor c: {what} did not finish within {timeout:.0f} s") from None
    except OSError as err:
        raise VerifyError(f"executor c: {what} could not start ({err.strerror or err})") from None
    if result.returncode != 0:
        detail = next((line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()), "")
        raise VerifyError(f"executor c: {what} failed (exit {result.returncode}): {detail[:200]}")


def run_c(model: IntegerModel, pixels: torch.Tensor) -> torch.Tensor:
    """The output integers of the exported C model for every image, (N, outputs) int64. Built and run
    in a temporary folder with time limits; the export is numbers only (c_export), checked first."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise VerifyError("executor c: no C compiler (cc or gcc) on this machine")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        export_c(model, pixels[:1], folder)
        shutil.copyfile(resources.files("intq.executors.c_runtime").joinpath("verify.c"), folder / "verify.c")
        _run_step([compiler, "-std=c99", "-O2", "verify.c", "intq_runtime.c", "-o", "verify"], folder,
                  COMPILE_TIMEOUT_S, "the C compiler")
        (folder / "pixels.bin").write_bytes(pixels.contiguous().numpy().tobytes())
        _run_step([str(folder / "verify"), str(len(pixels))], folder, run_timeout_s(model, len(pixels)), "the C model")
        outputs = np.fromfile(folder / "outputs.bin", dtype=np.int32)
    return torch.from_numpy(outputs.astype(np.int64)).reshape(len(pixels), -1)


def run_batched(forward, pixels: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """forward over `pixels` in batches, outputs as (N, outputs) int64."""
    outputs = [forward(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
    return torch.cat([out.to(torch.int64).reshape(len(out), -1) for out in outputs])


def run_executor(name: str, model: IntegerModel, pixels: torch.Tensor, engine: str = "onednn") -> tuple[torch.Tensor, list[str]]:
    """(output integers, notes) of one executor on every image; `engine` is torch_quantized's PyTorch
    backend. The engines that requantize in float (torch_quantized, onnx) also run each op on the
    reference's own inputs (layer_differences)."""
    if name == "c":
        return run_c(model, pixels), []
    try:
        if name == "torch_quantized":
            from intq.executors.torch_quantized import TorchQuantizedModel

            kernels = TorchQuantizedModel(model, engine)
            notes = [f"engine {engine}"] + [note for note in (kernels.saturation_note(),) if note]
            return run_batched(kernels, pixels), notes + [per_op_note(layer_differences(model, kernels.op_steps(), pixels))]
        if name == "onnx":
            from intq.executors.onnx_export import OnnxModel, onnx_op_steps

            per_op = layer_differences(model, onnx_op_steps(model, pixels[:1]), pixels)
            return run_batched(OnnxModel(model, pixels[:1]), pixels), [per_op_note(per_op)]
        if name == "onnx_exact":
            from intq.executors.onnx_export import OnnxModel

            return run_batched(OnnxModel(model, pixels[:1], exact=True), pixels), []
    except EngineError as err:
        raise VerifyError(str(err)) from None
    raise VerifyError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")


def layer_differences(model: IntegerModel, steps: list[tuple], pixels: torch.Tensor, batch: int = 500) -> dict[str, dict]:
    """Each engine step, step(*operand integers) -> integers, fed the reference's own inputs, so a
    difference is that op's alone (not one carried from an earlier layer):
    {op: {"values", "differing", "max_lsb"}}."""
    totals = {op.name: {"values": 0, "differing": 0, "max_lsb": 0} for op, _ in steps}
    for start in range(0, len(pixels), batch):
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
    unknown = [name for name in executors if name not in EXECUTORS]
    if unknown:
        raise VerifyError(f"unknown executor {', '.join(map(repr, unknown))}; available: {', '.join(EXECUTORS)}")
    reference = run_batched(lambda p: run_integer(model, p), pixels)
    results = {}
    for name in executors:
        output, notes = run_executor(name, model, pixels, engine)
        row = compare(reference, output)
        results[name] = {**row, "max_real": row["max_lsb"] * float(model.output_qparams().scale), "notes": notes}
    return results

