"""ONNX Runtime's own models of a float model, the peers of intq's ONNX paths in
benchmarks/bench_executors.py: the float model in ONNX Runtime, and ONNX Runtime's own post-training
static quantization of it, each a `Peer` (workflows/peer.py) on uint8 pixels.

- "ONNX Runtime float": torch.onnx.export (the TorchScript exporter, opset FLOAT_OPSET, batch dimension
  dynamic, constant folding, eval mode: BatchNorm folded into the convolutions) of the float model,
  whose input is the preprocessed float32 image; ONNX Runtime's CPU provider, all graph optimisations
  (its default), `threads` intra-op threads.
- "ONNX Runtime quantize_static QDQ (...)": that float graph through onnxruntime.quantization's
  quant_pre_process (symbolic and ONNX shape inference, ORT's basic graph optimisations: the
  pre-processing ORT's documentation recommends before quantizing), then quantize_static with
  quant_format=QDQ, per_channel=True, weight_type=QInt8 (symmetric), reduce_range=False,
  calibrate_method=MinMax (its default), every op type it quantizes, no extra_options, and
  activation_type QInt8 (S8S8, its default) in one row, QUInt8 (U8S8) in another: with S8S8, ONNX
  Runtime 1.32's CPU optimiser leaves 12 of ResNet-20's 21 convolutions (the first, and those that
  read a residual block's output) and the residual adds as float ops between DequantizeLinear and
  QuantizeLinear, while with U8S8 it fuses every node unit into QLinearConv, QLinearAdd, QGemm
  (measured on the optimised graphs). Calibration on the same uint8 images as intq,
  preprocessed as the float model expects and fed through a CalibrationDataReader in batches of
  CALIBRATION_BATCH.
"""
from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from intq.extras import require
from intq.workflows.peer import Peer

ORT_FLOAT_ROW = "ONNX Runtime float"
ORT_QDQ_ROW = "ONNX Runtime quantize_static QDQ"
FLOAT_OPSET = 17
CALIBRATION_BATCH = 100
# quantize_static's activation_type -> the row's label (QInt8 is its default)
ACTIVATION_TYPES = {"QInt8": "S8S8, its default", "QUInt8": "U8S8"}


def quantize_options(activation_type: str) -> str:
    """Every option ort_qdq_model passes quantize_static (the rows' notes say them)."""
    return (f"quant_format=QDQ, per_channel=True, activation_type={activation_type}, weight_type=QInt8, "
            f"reduce_range=False, calibrate_method=MinMax")


Normalize = Callable[[torch.Tensor], torch.Tensor]


def float_onnx(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The float `model` as an ONNX graph (torch.onnx.export, TorchScript exporter, opset FLOAT_OPSET):
    input `input` float32 (N, C, H, W) preprocessed, output `logits`, N dynamic; `example` is one
    preprocessed batch of the calibrated shape."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model.eval(), (example,), buffer, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=FLOAT_OPSET,
                          do_constant_folding=True, dynamo=False)
    return buffer.getvalue()


def calibration_reader(calibration: torch.Tensor, normalize: Normalize):
    """An onnxruntime.quantization.CalibrationDataReader over the uint8 `calibration` images, each batch
    of CALIBRATION_BATCH preprocessed by `normalize` into {"input": float32 array}."""
    quantization = require("onnxruntime.quantization", "ONNX Runtime's quantize_static")

    class ImageReader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            if start is None:
                return None
            batch = calibration[start : start + CALIBRATION_BATCH]
            return {"input": normalize(batch).contiguous().numpy().astype(np.float32)}

    return ImageReader()


def ort_qdq_model(float_contents: bytes, calibration: torch.Tensor, normalize: Normalize,
                  activation_type: str = "QInt8") -> bytes:
    """ONNX Runtime's own QDQ model of the float graph: quant_pre_process, then quantize_static with
    quantize_options(activation_type), calibrated on `calibration` (uint8) preprocessed by `normalize`."""
    quantization = require("onnxruntime.quantization", "ONNX Runtime's quantize_static")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        float_path, prepared, quantized = (Path(folder) / name for name in ("float.onnx", "prepared.onnx", "qdq.onnx"))
        float_path.write_bytes(float_contents)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(float_path), str(prepared))
            quantization.quantize_static(str(prepared), str(quantized), calibration_reader(calibration, normalize),
                                         quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                         activation_type=quantization.QuantType[activation_type],
                                         weight_type=quantization.QuantType.QInt8, reduce_range=False,
                                         calibrate_method=quantization.CalibrationMethod.MinMax)
        return quantized.read_bytes()


def ort_forward(contents: bytes, normalize: Normalize, threads: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 pixels -> float logits (torch) through the ONNX graph `contents` in an ONNX Runtime CPU
    session with `threads` intra-op threads (executors/onnx_runtime.session_options)."""
    onnxruntime = require("onnxruntime", "running ONNX Runtime")
    from intq.executors.onnx_runtime import session_options

    session = onnxruntime.InferenceSession(contents, session_options(threads), providers=["CPUExecutionProvider"])

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(["logits"], {"input": normalize(pixels).contiguous().numpy().astype(np.float32)})
        return torch.from_numpy(logits)

    return forward


def ort_peers(model: torch.nn.Module, calibration: torch.Tensor, normalize: Normalize,
              threads: int | None = None) -> list[Peer]:
    """[ONNX Runtime float, then its quantize_static QDQ model for each of ACTIVATION_TYPES] of the float
    `model`, calibrated on the uint8 `calibration` images; each Peer's bytes is its ONNX file's size."""
    session = f"ONNX Runtime CPU, {threads or 'default'} threads"
    float_contents = float_onnx(model, normalize(calibration[:2]))
    peers = [Peer(ORT_FLOAT_ROW, ort_forward(float_contents, normalize, threads), len(float_contents),
                  [f"torch.onnx.export (TorchScript exporter, opset {FLOAT_OPSET}); {session}"])]
    for activation_type, label in ACTIVATION_TYPES.items():
        contents = ort_qdq_model(float_contents, calibration, normalize, activation_type)
        peers.append(Peer(f"{ORT_QDQ_ROW} ({label})", ort_forward(contents, normalize, threads), len(contents),
                          [f"quant_pre_process, then quantize_static({quantize_options(activation_type)}) on "
                           f"{len(calibration)} calibration images; {session}"]))
    return peers
