"""ONNX Runtime sessions of intq's ONNX export: the whole model (OnnxModel, the `onnx` and `onnx_exact`
executors) and each op alone (onnx_op_steps, for checking every op on the reference's own inputs)."""
from __future__ import annotations

import functools

import torch

from intq.extras import require
from intq.executors.encoding import from_codes, to_uint8
from intq.executors.onnx_export import export_onnx, export_op_onnx, value_shapes
from intq.graph.integer_model import IntegerModel
from intq.arith.qparams import torch_dtype


def session_options(threads: int | None):
    """ONNX Runtime CPU session options with `threads` intra-op threads (None: its default)."""
    onnxruntime = require("onnxruntime", "running ONNX Runtime")

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return options


def onnx_op_steps(model: IntegerModel, example: torch.Tensor, threads: int | None = None) -> list[tuple]:
    """[(op, step)] with step(*operand integers) -> the op's output integers, each op run alone in
    ONNX Runtime as in the `onnx` executor (export_op_onnx)."""
    onnxruntime = require("onnxruntime", "running ONNX Runtime")

    options = session_options(threads)
    shapes, qparams, steps = value_shapes(model, example), model.value_qparams(), []
    for op in model.layers:
        contents = export_op_onnx(op, model, shapes)
        session = onnxruntime.InferenceSession(contents, options, providers=["CPUExecutionProvider"])
        step = functools.partial(_run_op_session, session, op, qparams)
        step.path = onnx_path(contents)
        steps.append((op, step))
    return steps


def onnx_path(contents: bytes) -> str:
    """How `intq verify` says one op ran in ONNX Runtime, from the node types it was exported as: its
    quantized kernels (QLinearConv, QLinearAdd, ...; MaxPool, Concat, Flatten on the uint8 codes), or
    an exact integer subgraph (Cast, Mul, Gather, ...; values wider than 8 bits, lookups, pools)."""
    onnx = require("onnx", "checking ONNX ops")
    kinds = list(dict.fromkeys(node.op_type for node in onnx.load_from_string(contents).graph.node
                                if node.op_type != "Identity"))  # the output's name
    kernels = [kind for kind in kinds if kind.startswith("QLinear")]
    if kernels:
        return "ONNX Runtime kernel " + " + ".join(kernels)
    if "Cast" not in kinds:
        return "ONNX Runtime " + " + ".join(kinds) + " on the integer codes"
    return f"exact integer subgraph ({len(kinds)} node types: {', '.join(kinds[:4])}{', ...' if len(kinds) > 4 else ''})"


def _run_op_session(session, op, qparams: dict, *operands: torch.Tensor) -> torch.Tensor:
    feeds = {}
    for name, value in zip(op.inputs, operands):
        encoded = to_uint8(value, qparams[name]) if qparams[name].dtype.bits <= 8 else value.to(torch.int64)
        feeds[f"in/{name}"] = encoded.contiguous().numpy()
    (output,) = session.run(["output"], feeds)
    return from_codes(torch.from_numpy(output), _output_offset(session), torch_dtype(qparams[op.name].dtype))


def _output_offset(session) -> int:
    return int(session.get_modelmeta().custom_metadata_map["output_offset"])


class OnnxModel:
    """Callable: uint8 pixels -> the model's output integers, run in an ONNX Runtime CPU session."""

    def __init__(self, model: IntegerModel, example: torch.Tensor, threads: int | None = None, exact: bool = False) -> None:
        onnxruntime = require("onnxruntime", "running ONNX Runtime")

        options = session_options(threads)
        self.contents = export_onnx(model, example, exact)
        self.session = onnxruntime.InferenceSession(self.contents, options, providers=["CPUExecutionProvider"])
        out = model.value_qparams()[model.output_name]
        self.offset, self.dtype = _output_offset(self.session), torch_dtype(out.dtype)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (output,) = self.session.run(["output"], {"pixels": pixels.contiguous().numpy()})
        return from_codes(torch.from_numpy(output), self.offset, self.dtype)
