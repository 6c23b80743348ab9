"""The `c` executor: the exported C99 model compiled with the system compiler and run on pixels.

The export is numbers and generated names only (c_export) and the model passes model_check first;
the compiler and the program run with an argument list (no shell) and time limits, and any failure
is one EngineError naming the step.
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
from intq.graph.integer_model import IntegerModel
from intq.graph.model_check import check_model

COMPILE_TIMEOUT_S = 300
C_MACS_PER_SECOND = 2e7  # the plain C loop nest ran ResNet-20 at ~3e8 MAC/s here; 15x slack


def macs_per_image(model: IntegerModel, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one image: each weight once per output position."""
    return sum(op.weight.size * int(np.prod(shapes[op.name][1:])) for op in model.quantized_layers())


def run_timeout_s(macs: int, images: int) -> float:
    """A generous limit for the C executor on `images` images: 60 s plus the MACs at C_MACS_PER_SECOND."""
    return 60 + images * macs / C_MACS_PER_SECOND


def _run_step(command: list[str], folder: Path, timeout: float, what: str) -> None:
    """One subprocess (an argument list, no shell) with a time limit; EngineError naming the step."""
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EngineError(f"executor c: {what} did not finish within {timeout:.0f} s") from None
    except OSError as err:
        raise EngineError(f"executor c: {what} could not start ({err.strerror or err})") from None
    if result.returncode != 0:
        detail = next((line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()), "")
        raise EngineError(f"executor c: {what} failed (exit {result.returncode}): {detail[:200]}")


class CProgram:
    """The model compiled once in a private temporary folder; calling it runs the program on uint8
    pixels (N, C, H, W) and returns the output integers (N, outputs) int64."""

    def __init__(self, model: IntegerModel) -> None:
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise EngineError("executor c: no C compiler (cc or gcc) on this machine")
        self.macs = macs_per_image(model, check_model(model))
        self._folder = tempfile.TemporaryDirectory()
        folder = Path(self._folder.name)
        export_c(model, torch.zeros((1, *model.input.shape), dtype=torch.uint8), folder)
        shutil.copyfile(resources.files("intq.executors.c_runtime").joinpath("verify.c"), folder / "verify.c")
        _run_step([compiler, "-std=c99", "-O2", "verify.c", "intq_runtime.c", "-o", "verify"], folder,
                  COMPILE_TIMEOUT_S, "the C compiler")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        folder = Path(self._folder.name)
        (folder / "pixels.bin").write_bytes(pixels.contiguous().numpy().tobytes())
        _run_step([str(folder / "verify"), str(len(pixels))], folder, run_timeout_s(self.macs, len(pixels)), "the C model")
        outputs = np.fromfile(folder / "outputs.bin", dtype=np.int32)
        return torch.from_numpy(outputs.astype(np.int64)).reshape(len(pixels), -1)


def run_c(model: IntegerModel, pixels: torch.Tensor) -> torch.Tensor:
    """The output integers of the exported C model for every image, (N, outputs) int64."""
    return CProgram(model)(pixels)
