"""`intq compare`: intq's integer model against PyTorch's own post-training static quantization
(torchao pt2e with X86InductorQuantizer, compiled to int8 kernels; torch.ao FX mode only where pt2e
cannot run: workflows/peer.py) on the same float model and the same calibration images.

One table: accuracy, model size, latency at batch 1 and throughput at batch 256, and top-1 agreement
with the intq reference executor, for PyTorch float, PyTorch's int8 model, and the same intq integers
on four executors: the reference, PyTorch's quantized kernels, ONNX Runtime's QLinear kernels (the
QOperator graph) and ONNX Runtime on the QDQ graph (executors/onnx_qdq.py).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from intq.graph import model_file
from intq.graph.config import QConfig
from intq.workflows.costs import measured_speed
from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing
from intq.workflows.peer import peer_quantize, state_bytes
from intq.cifar.data import Dataset
from intq.executors.registry import EXECUTORS
from intq.graph.integer_model import IntegerModel
from intq.workflows.pipeline import calibration_images, quantize_model
from intq.workflows.subject import load_float_model
from intq.cifar.train import accuracy, predict
from intq.progress import progress


INTQ_ROWS = {"reference": "intq reference (integer)", "torch_quantized": "intq on PyTorch kernels (onednn)",
             "onnx": "intq on ONNX Runtime", "onnx_qdq": "intq QDQ on ONNX Runtime"}  # the registered executors compare times, and their rows


PREDICT_BATCH = 500
SPEED_BATCHES = (1, 256)  # costs.measured_speed's latency and throughput batches


def batch_sizes(images: int) -> set[int]:
    """Every batch size compare runs a model on: predict's PREDICT_BATCH chunks of `images` (and the
    rest) and measured_speed's batches, each at most `images`."""
    sizes = {min(size, images) for size in (*SPEED_BATCHES, PREDICT_BATCH)}
    return sizes | ({images % PREDICT_BATCH} - {0})


def compare(model: torch.nn.Module, integer: IntegerModel, integer_bytes: int, data: Dataset,
            calibration: torch.Tensor, compile_peer: bool = True) -> list[dict]:
    """Rows for PyTorch float, PyTorch's int8 model (peer.peer_quantize: torchao pt2e, compiled when
    `compile_peer`, else FX) and the intq model on each executor of INTQ_ROWS; the float models read
    the preprocessing the integer model records."""
    normalize = integer.input.preprocessing.apply
    peer = peer_quantize(model, calibration, normalize, batch_sizes(len(data.test_images)), compile_peer)
    runners = {"PyTorch float32": (lambda p: model(normalize(p)), state_bytes(model), []),
               peer.row: (peer.forward, peer.bytes, peer.notes)}
    for name, label in INTQ_ROWS.items():
        forward = EXECUTORS[name].prepare(integer)
        size = len(forward.contents) if hasattr(forward, "contents") else integer_bytes  # an ONNX file's own size
        runners[label] = (forward, size, EXECUTORS[name].notes(integer, forward))
    reference = predict(runners[INTQ_ROWS["reference"]][0], data.test_images, PREDICT_BATCH)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (forward, size, notes) in progress(runners.items(), "compare"):
            predicted = predict(forward, data.test_images, PREDICT_BATCH)
            rows.append({"executor": name, "accuracy": accuracy(predicted, data.test_labels), "bytes": size,
                         "top1_agreement_with_intq": accuracy(predicted, reference),
                         **measured_speed(forward, data.test_images), **({"note": "; ".join(notes)} if notes else {})})
    return rows


def run_compare(model: str, data: Dataset, cache_dir: Path, config: QConfig, calib_samples: int, *,
                seed: int = 0, arch: str = "Net", weights: Path | None = None,
                preprocessing: Preprocessing = STUDY_PREPROCESSING, compile_peer: bool = True) -> dict:
    """intq under `config` against PyTorch's PTQ (torchao pt2e, else torch.ao FX) of the same float
    model (subject.load_float_model: a study model, a checkpoint of `arch`, or a user's model with
    `weights`) on the same `calib_samples` training images: compare's rows."""
    name, float_net = load_float_model(model, data, cache_dir, seed=seed, arch=arch, weights=weights)
    pixels = calibration_images(data.train_images, calib_samples, seed)
    integer = quantize_model(float_net, pixels, config, example=data.train_images,
                             preprocessing=preprocessing).integer_model
    rows = compare(float_net, integer, len(model_file.to_bytes(integer)), data, pixels, compile_peer)
    return {"model": name, "calibration_images": len(pixels), "test_images": len(data.test_images), "rows": rows}
