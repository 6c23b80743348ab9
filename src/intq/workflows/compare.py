"""`intq compare`: intq's integer model against PyTorch's own post-training static quantization
(torch.ao FX mode, x86 engine) on the same float model and the same calibration images.

One table: accuracy, model size, latency at batch 1 and throughput at batch 256, and top-1 agreement
with the intq reference executor, for PyTorch float, torch.ao int8, and the same intq integers on
three executors: the reference, PyTorch's quantized kernels, ONNX Runtime.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.fx

from intq.graph import model_file
from intq.graph.config import QConfig
from intq.workflows.costs import measured_speed
from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing
from intq.cifar.data import Dataset
from intq.executors.registry import EXECUTORS
from intq.graph.integer_model import IntegerModel
from intq.workflows.pipeline import calibration_images, quantize_model
from intq.workflows.subject import load_float_model
from intq.cifar.train import accuracy, predict


def reshape_views(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The model traced with every .view turned into .reshape: torch.ao's quantized convolutions
    return channels-last tensors, on which the study's `x.view(-1, 400)` fails."""
    traced = torch.fx.symbolic_trace(model)
    for node in traced.graph.nodes:
        if node.op == "call_method" and node.target == "view":
            node.target = "reshape"
    traced.recompile()
    return traced


def torch_ao_quantize(model: torch.nn.Module, calibration: torch.Tensor, normalize=STUDY_PREPROCESSING.apply) -> torch.nn.Module:
    """torch.ao FX post-training static quantization with the x86 qconfig, calibrated on uint8 images."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao announces its own deprecation on every call
        example = normalize(calibration[:2])
        prepared = prepare_fx(reshape_views(model.eval()), get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for start in range(0, len(calibration), 500):
                prepared(normalize(calibration[start : start + 500]))
        return convert_fx(prepared)


def on_x86_engine(ao_model: torch.nn.Module, normalize=STUDY_PREPROCESSING.apply):
    """torch.ao's model on uint8 pixels, run under the engine it was converted for (another
    executor may have selected a different one)."""
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = "x86"
        return ao_model(normalize(pixels))
    return forward


def state_bytes(module: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return len(buffer.getvalue())


INTQ_ROWS = {"reference": "intq reference (integer)", "torch_quantized": "intq on PyTorch kernels (onednn)",
             "onnx": "intq on ONNX Runtime"}  # the registered executors compare times, and their rows


def compare(model: torch.nn.Module, integer: IntegerModel, integer_bytes: int, data: Dataset,
            calibration: torch.Tensor) -> list[dict]:
    """Rows for PyTorch float, torch.ao int8 and the intq model on each executor of INTQ_ROWS; the
    float models read the preprocessing the integer model records."""
    normalize = integer.input.preprocessing.apply
    ao_model = torch_ao_quantize(model, calibration, normalize)
    runners = {"PyTorch float32": (lambda p: model(normalize(p)), state_bytes(model), []),
               "torch.ao int8 (x86, FX)": (on_x86_engine(ao_model, normalize), state_bytes(ao_model), [])}
    for name, label in INTQ_ROWS.items():
        forward = EXECUTORS[name].prepare(integer)
        size = len(forward.contents) if hasattr(forward, "contents") else integer_bytes  # an ONNX file's own size
        runners[label] = (forward, size, EXECUTORS[name].notes(integer, forward))
    reference = predict(runners[INTQ_ROWS["reference"]][0], data.test_images, 500)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (forward, size, notes) in runners.items():
            predicted = predict(forward, data.test_images, 500)
            rows.append({"executor": name, "accuracy": accuracy(predicted, data.test_labels), "bytes": size,
                         "top1_agreement_with_intq": accuracy(predicted, reference),
                         **measured_speed(forward, data.test_images), **({"note": "; ".join(notes)} if notes else {})})
    return rows


def run_compare(model: str, data: Dataset, cache_dir: Path, config: QConfig, calib_samples: int, *,
                seed: int = 0, arch: str = "Net", weights: Path | None = None,
                preprocessing: Preprocessing = STUDY_PREPROCESSING) -> dict:
    """intq under `config` against torch.ao PTQ of the same float model (subject.load_float_model: a
    study model, a checkpoint of `arch`, or a user's model with `weights`) on the same `calib_samples`
    training images: compare's rows."""
    name, float_net = load_float_model(model, data, cache_dir, seed=seed, arch=arch, weights=weights)
    pixels = calibration_images(data.train_images, calib_samples, seed)
    integer = quantize_model(float_net, pixels, config, example=data.train_images,
                             preprocessing=preprocessing).integer_model
    rows = compare(float_net, integer, len(model_file.to_bytes(integer)), data, pixels)
    return {"model": name, "calibration_images": len(pixels), "test_images": len(data.test_images), "rows": rows}
