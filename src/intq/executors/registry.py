"""Every executor of an IntegerModel behind one small protocol, and the registry of them.

An executor has a `name` and `prepare(model)`, which returns a callable from uint8 pixels
(N, C, H, W) to the model's output integers (N, outputs) int64, built once (a compiled C program, an
ONNX Runtime session, PyTorch quantized modules) and then called on any number of batches.
`setting` names a choice it runs under (PyTorch's engine), `notes(model, forward)` what a reader of its
figures should know about this model (layers that may saturate); an engine that requantizes in float
also gives `op_steps(model, forward)`, each op alone as a step on integers, so that `intq verify` can feed
every op the reference's own inputs. verify, compare and the benchmarks iterate over EXECUTORS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from intq.executors.reference import run_integer
from intq.graph.integer_model import IntegerModel
from intq.progress import progress

Forward = Callable[[torch.Tensor], torch.Tensor]


class Executor(Protocol):
    name: str
    setting: str | None

    def prepare(self, model: IntegerModel) -> Forward: ...

    def notes(self, model: IntegerModel, forward: Forward) -> list[str]: ...

    def op_steps(self, model: IntegerModel, forward: Forward) -> list[tuple] | None: ...


def run(forward: Forward, pixels: torch.Tensor, batch: int = 1000, what: str = "running") -> torch.Tensor:
    """forward over `pixels` in batches, outputs as (N, outputs) int64; a progress bar labelled `what`."""
    outputs = [forward(pixels[i : i + batch]) for i in progress(range(0, len(pixels), batch), what)]
    return torch.cat([out.to(torch.int64).reshape(len(out), -1) for out in outputs])


def _example(model: IntegerModel) -> torch.Tensor:
    return torch.zeros((1, *model.input.shape), dtype=torch.uint8)


class Exact:
    """An executor bit-exact with the reference: nothing to note, no per-op check needed."""

    setting: str | None = None

    def notes(self, model: IntegerModel, forward: Forward) -> list[str]:
        return []

    def op_steps(self, model: IntegerModel, forward: Forward) -> None:
        return None


@dataclass(frozen=True)
class Reference(Exact):
    """Exact integer arithmetic (executors/reference.py): the ground truth."""

    name: str = "reference"

    def prepare(self, model: IntegerModel) -> Forward:
        return lambda pixels: run_integer(model, pixels)


@dataclass(frozen=True)
class C(Exact):
    """The exported C99 model, compiled with the system compiler (executors/c_runner.py): bit-exact."""

    name: str = "c"

    def prepare(self, model: IntegerModel) -> Forward:
        from intq.executors.c_runner import CProgram

        return CProgram(model)


@dataclass(frozen=True)
class TorchQuantized:
    """PyTorch's quantized kernels on `engine` (onednn, x86, fbgemm): within 1 LSB per op. Its forward
    is a TorchQuantizedModel, which also says which layers may saturate and runs each op alone."""

    engine: str = "onednn"
    name: str = "torch_quantized"

    @property
    def setting(self) -> str:
        return f"engine {self.engine}"

    def prepare(self, model: IntegerModel) -> Forward:
        from intq.executors.torch_quantized import TorchQuantizedModel

        return TorchQuantizedModel(model, self.engine)

    def notes(self, model: IntegerModel, forward) -> list[str]:
        note = forward.saturation_note()
        return [note] if note else []

    def op_steps(self, model: IntegerModel, forward) -> list[tuple]:
        return forward.op_steps()


@dataclass(frozen=True)
class Onnx:
    """ONNX Runtime: QLinearConv/QLinearAdd (within 1 LSB per op) or, `exact`, integer subgraphs (bit-exact)."""

    exact: bool = False
    setting: str | None = None
    threads: int | None = None  # ONNX Runtime's intra-op threads (None: its default)

    @property
    def name(self) -> str:
        return "onnx_exact" if self.exact else "onnx"

    def prepare(self, model: IntegerModel) -> Forward:
        from intq.executors.onnx_runtime import OnnxModel

        return OnnxModel(model, _example(model), threads=self.threads, exact=self.exact)

    def notes(self, model: IntegerModel, forward: Forward) -> list[str]:
        return []

    def op_steps(self, model: IntegerModel, forward: Forward) -> list[tuple] | None:
        from intq.executors.onnx_runtime import onnx_op_steps

        return None if self.exact else onnx_op_steps(model, _example(model), threads=self.threads)


@dataclass(frozen=True)
class OnnxQdq:
    """ONNX Runtime on the QDQ export (executors/onnx_qdq.py): float ops between QuantizeLinear and
    DequantizeLinear, fused by ONNX Runtime into its QLinear kernels; requantizes in float, so not
    bit-exact. No per-op steps: its ops read float values, so verify compares the whole model only."""

    name: str = "onnx_qdq"
    setting: str | None = None
    threads: int | None = None  # ONNX Runtime's intra-op threads (None: its default)

    def prepare(self, model: IntegerModel) -> Forward:
        from intq.executors.onnx_qdq import QdqModel

        return QdqModel(model, threads=self.threads)

    def notes(self, model: IntegerModel, forward: Forward) -> list[str]:
        return ["QDQ graph: float ops requantized by QuantizeLinear (round half to even), whole model compared only"]

    def op_steps(self, model: IntegerModel, forward: Forward) -> None:
        return None


EXECUTORS: dict[str, Executor] = {executor.name: executor for executor in
                                  (Reference(), C(), TorchQuantized(), Onnx(), Onnx(exact=True), OnnxQdq())}


def executor(name: str, engine: str = "onednn") -> Executor:
    """The registered executor `name` (torch_quantized on `engine`); KeyError for an unknown name."""
    return TorchQuantized(engine) if name == "torch_quantized" else EXECUTORS[name]
