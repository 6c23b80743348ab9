"""`intq inspect`: per-layer diagnostics of one configuration.

Per weighted layer: scales, zero points, multipliers, the share of values the output range clips,
SQNR of the layer's own output quantization and of the whole integer pipeline against float, and
the observed accumulator against its proven bound and the int32 limit.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from intq.graph.capture import Graph, run_float
from intq.graph.config import QConfig
from intq.graph.convert import fused_relu, observed_tensors
from intq.executors.reference import accumulate, run_integer
from intq.files import check_writable, staged_output, write_json
from intq.graph.integer_model import INT32_LIMIT, IntegerModel
from intq.arith.qparams import dequantize, quantize
from intq.workflows.pipeline import calibration_images, quantize_model
from intq.workflows.subject import InputOptions, load_data, load_float_model
from intq.workflows.study import activation_summary, clip_ranges, representable_range
from intq.workflows.sweep import checked_count

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr

DIAGNOSED_IMAGES = 1000


@dataclass(frozen=True)
class InspectOptions:
    model: str
    data_dir: str | None
    out_dir: Path
    cache_dir: Path
    config: QConfig
    seed: int = 0
    images: int | None = None  # None: DIAGNOSED_IMAGES, or every test image when there are fewer
    calib_samples: int = 10_000  # unless the config fixes its own; at most every training image
    arch: str = "Net"  # the architecture of `model` when it is a checkpoint file
    weights: Path | None = None  # a user model's weights (model = FILE.py:factory or module:attr)
    inputs: InputOptions = InputOptions()  # --size, --channels, --mean/--std


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """10 log10(sum r^2 / sum (r - a)^2) in dB; +inf when the two are identical."""
    noise = float(((reference.double() - approximation.double()) ** 2).sum())
    signal = float((reference.double() ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def _summary(values) -> dict:
    array = np.asarray(values, np.float64).ravel()
    return {"min": float(array.min()), "max": float(array.max()), "median": float(np.median(array))}


def layer_rows(graph: Graph, model: IntegerModel, pixels: torch.Tensor) -> list[dict]:
    """Diagnostics of every QLayer on `pixels`, comparing at the layer's (ReLU-fused) output."""
    floats, integers = {}, {}
    with torch.no_grad():
        run_float(graph, graph.preprocessing.apply(pixels), lambda name, value: floats.__setitem__(name, value))
        run_integer(model, pixels, visit=lambda name, value: integers.__setitem__(name, value))
    rows = []
    for layer in model.quantized_layers():
        relu = fused_relu(graph, graph.node(layer.name))
        real = floats[relu.name if relu else layer.name]
        out = layer.output_qparams
        fake = dequantize(quantize(real, out), out)
        integer = dequantize(integers[layer.name], out)
        lo, hi = representable_range(out, layer.bounds())
        acc = accumulate(layer, integers[layer.inputs[0]])
        rows.append({
            "layer": layer.name, "input_scale": float(layer.input_qparams.scale),
            "input_zero_point": int(layer.input_qparams.zero_point),
            "weight_bits": layer.weight_qparams.dtype.bits, "weight_scale": _summary(layer.weight_qparams.scale),
            "output_scale": float(out.scale), "output_zero_point": int(out.zero_point), "output_type": out.dtype.name,
            "mantissa": _summary(layer.mantissa), "shift": _summary(layer.shift),
            "clipped_share": float(((real < float(lo)) | (real > float(hi))).double().mean()),
            "sqnr_fake_quant_db": sqnr_db(real, fake), "sqnr_integer_db": sqnr_db(real, integer),
            "accumulator_observed": int(acc.abs().max()), "accumulator_bound": int(layer.accumulator_bound),
            "int32_limit": INT32_LIMIT,
            "per_channel": {"weight_scale": np.asarray(layer.weight_qparams.scale).ravel().tolist(),
                            "mantissa": layer.mantissa.tolist(), "shift": layer.shift.tolist()},
        })
    return rows


def run_inspect(options: InspectOptions, log=_log.info, render: Callable[[dict, Path], None] | None = None) -> dict:
    """Calibrate, convert with options.config, diagnose on test images; write inspect.json, and the
    report through `render(results, folder)` (cli: diagnostics_report.write_inspect_report)."""
    start = time.perf_counter()
    out_dir = check_writable(options.out_dir, folder=True)
    data = load_data(options.data_dir, options.cache_dir, options.inputs, download=True, progress=log)
    images = checked_count("--images", options.images, len(data.test_images), "test images", DIAGNOSED_IMAGES)
    size = min(options.config.calibration_samples or options.calib_samples, len(data.train_images))
    name, model = load_float_model(options.model, data, options.cache_dir, seed=options.seed, arch=options.arch,
                                   weights=options.weights)
    quantized = quantize_model(model, calibration_images(data.train_images, size, options.seed), options.config,
                               example=data.train_images, preprocessing=options.inputs.declared)
    graph, stats, integer = quantized.graph, quantized.stats, quantized.integer_model
    log(f"{name} under {options.config.name}: diagnosing {images} test images")
    rows = layer_rows(graph, integer, data.test_images[:images])
    results = {"model": name, "config": options.config.name, "description": options.config.description,
               "images": images, "calibration_images": size, "layers": rows,
               "activations": activation_summary(graph, stats, {options.config.name: clip_ranges(integer)}),
               "observed": observed_tensors(graph), "timings_s": {"total": time.perf_counter() - start}}
    with staged_output(out_dir) as staging:
        if render is not None:
            render(results, staging)
        write_json(staging / "inspect.json", results)
    return results

