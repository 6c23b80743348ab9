"""`intq verify`: run an executor over a whole image set and count how far it is from the reference.

Executors today: `c` (the exported C99 model, compiled with the system compiler). For each: share of
output values that differ, the largest difference in LSB, and the share of images whose top-1 differs.
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
from intq.executors.reference import run_integer
from intq.integer_model import IntegerModel


class VerifyError(Exception):
    """An executor that cannot run here (names it and why)."""


def run_c(model: IntegerModel, pixels: torch.Tensor) -> torch.Tensor:
    """The output integers of the exported C model for every image, (N, outputs) int64."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise VerifyError("executor c: no C compiler (cc or gcc) on this machine")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        export_c(model, pixels[:1], folder)
        shutil.copyfile(resources.files("intq.executors.c_runtime").joinpath("verify.c"), folder / "verify.c")
        subprocess.run([compiler, "-std=c99", "-O2", "verify.c", "intq_runtime.c", "-o", "verify"], cwd=folder,
                       check=True, capture_output=True)
        (folder / "pixels.bin").write_bytes(pixels.contiguous().numpy().tobytes())
        subprocess.run(["./verify", str(len(pixels))], cwd=folder, check=True, capture_output=True)
        outputs = np.fromfile(folder / "outputs.bin", dtype=np.int32)
    return torch.from_numpy(outputs.astype(np.int64)).reshape(len(pixels), -1)


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Share of values that differ, largest |difference| in LSB, share of images whose argmax differs."""
    difference = (reference - other).abs()
    return {"values": reference.numel(), "differing_share": float((difference > 0).double().mean()),
            "max_lsb": int(difference.max()), "top1_differing_share":
            float((reference.argmax(dim=1) != other.argmax(dim=1)).double().mean())}


def verify(model: IntegerModel, pixels: torch.Tensor, executors: tuple[str, ...] = ("c",)) -> dict[str, dict]:
    """Every executor against the reference on `pixels`: {executor: compare(...)}."""
    batches = [run_integer(model, pixels[i : i + 1000]) for i in range(0, len(pixels), 1000)]
    reference = torch.cat([b.to(torch.int64).reshape(len(b), -1) for b in batches])  # (N, ...) -> (N, outputs)
    results = {}
    for name in executors:
        if name != "c":
            raise VerifyError(f"executor {name!r} is not built yet; available: c")
        results[name] = compare(reference, run_c(model, pixels))
    return results

