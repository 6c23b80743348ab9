"""The seed study's five stages as configurations of the one integer machinery.

Each model (Net, NetWithBias) runs in its own process on one core: train (or load cached weights),
capture, calibrate, convert under each preset, evaluate every stage, check the reference executor
against the float simulation. The parent gathers the results; `run_study` writes results.json and
the integer models, and the caller's `render` writes the report into the same staged output.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from intq import __version__

from intq.graph import model_file
from intq.graph.capture import Graph, run_float
from intq.graph.config import STUDY_PRESETS, QConfig
from intq.graph.convert import observed_tensors
from intq.workflows.costs import layer_costs, measured_speed, model_costs
from intq.cifar.data import load_cifar10, normalize
from intq.files import check_writable, staged_output, write_json
from intq.executors.reference import run_integer
from intq.graph.integer_model import IntegerModel, output_bounds
from intq.cifar.models import MODELS
from intq.calibrate.observers import TensorStats
from intq.workflows.pipeline import Calibrated, calibrated, calibration_images, model_log, trained_model
from intq.arith.qparams import QParams
from intq.executors.simulate import fake_quant_weights, layer_agreement
from intq.cifar.train import Recipe, accuracy, predict
from intq.progress import start_worker_logging, worker_log_level

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr

PUBLISHED = [  # the study's own figures: original CIFAR-10, on a GPU
    {"model": "Net", "stage": "float", "accuracy": 53.22},
    {"model": "Net", "stage": "weights", "accuracy": 52.22},
    {"model": "Net", "stage": "weights+activations", "accuracy": 49.79},
    {"model": "NetWithBias", "stage": "float", "accuracy": 52.55},
    {"model": "NetWithBias", "stage": "weights+bias-float", "accuracy": 48.09},
    {"model": "NetWithBias", "stage": "integer+bias", "accuracy": 49.93},
]
# stage names per model: (weight-only stage, integer-only stage)
STAGES = {"Net": ("weights", "weights+activations"), "NetWithBias": ("weights+bias-float", "integer+bias")}
AGREEMENT_IMAGES = 1000  # the float64 simulation costs ~1.7 s per 1,000 images and preset


@dataclass(frozen=True)
class ModelJob:
    model: str
    data_dir: str | None
    cache_dir: str
    out_dir: str  # where the worker saves the .npz integer models (a staging folder)
    seed: int
    device: str
    calib_samples: int | None  # overrides the recommended preset's calibration set size
    recipe: Recipe = Recipe()


def representable_range(qparams: QParams, bounds: tuple[int, int] | None = None) -> list[float]:
    """[lo, hi] = s*(lower - z), s*(upper - z): the real values a tensor can carry, with `bounds`
    the integer clamp (default: the whole type; a fused ReLU or ReLU6 narrows it, output_bounds)."""
    scale, zero = float(qparams.scale), int(qparams.zero_point)
    lower, upper = bounds or output_bounds(qparams, relu=False)
    return [scale * (lower - zero), scale * (upper - zero)]


def clip_ranges(model: IntegerModel) -> dict[str, list[float]]:
    """{label: representable range} for the input and each requantizing op's output (layers, adds,
    average pools: the tensors observed_tensors labels)."""
    ranges = {"input": representable_range(model.input.qparams)}
    for op in model.requantizing_ops():
        ranges[op.name] = representable_range(op.output_qparams, op.bounds())
    return ranges


def histogram_summary(stats: TensorStats, max_bins: int = 80) -> dict:
    """The observer histogram trimmed to its occupied bins and merged to at most `max_bins`."""
    edges, counts = stats.occupied()
    group = max(1, -(-len(counts) // max_bins))
    padded = np.concatenate([counts, np.zeros((-len(counts)) % group, np.int64)])
    merged = padded.reshape(-1, group).sum(axis=1)  # (B,) -> (B/group,)
    merged_edges = edges[0] + np.arange(len(merged) + 1) * group * stats.bin_width
    return {"edges": merged_edges.tolist(), "counts": merged.tolist()}


def weight_summary(graph: Graph) -> dict:
    """Q1: range, mean, std and a 60-bin histogram of every layer's float weights."""
    summary = {}
    for node in graph.weighted():
        w = node.op.weight.detach().cpu().double().numpy().ravel()
        counts, edges = np.histogram(w, bins=60)
        summary[node.name] = {"shape": list(node.op.weight.shape), "min": float(w.min()), "max": float(w.max()),
                              "mean": float(w.mean()), "std": float(w.std()),
                              "hist": {"edges": edges.tolist(), "counts": counts.tolist()}}
    return summary


def activation_summary(graph: Graph, stats: dict[str, TensorStats], clips: dict[str, dict]) -> dict:
    """Q3: full range, mean/std, 3-sigma range, histogram and each preset's clip range per tensor."""
    summary = {}
    for label, name in observed_tensors(graph).items():
        s = stats[name]
        summary[label] = {"min": s.min, "max": s.max, "mean": s.mean, "std": s.std, "count": s.count,
                          "sigma3": [s.mean - 3 * s.std, s.mean + 3 * s.std], "hist": histogram_summary(s),
                          "clip": {preset: ranges[label] for preset, ranges in clips.items()}}
    return summary


def merged_agreement(model: IntegerModel, pixels: torch.Tensor, batch_size: int = 1000) -> list[dict]:
    """layer_agreement over the whole set in batches, summed per layer."""
    total: dict[str, dict] = {}
    for start in range(0, len(pixels), batch_size):
        for row in layer_agreement(model, pixels[start : start + batch_size]):
            entry = total.setdefault(row["layer"], {"layer": row["layer"], "values": 0, "differing": 0, "max_lsb": 0})
            entry["values"] += row["values"]
            entry["differing"] += row["differing"]
            entry["max_lsb"] = max(entry["max_lsb"], row["max_lsb"])
    return list(total.values())


def preset_for(job: ModelJob, preset: QConfig) -> QConfig:
    """The preset, with the recommended one's calibration size overridden by --calib-samples."""
    if preset.name == "recommended" and job.calib_samples is not None:
        return replace(preset, calibration_samples=job.calib_samples)
    return preset


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def run_model(job: ModelJob) -> dict:
    """Everything for one model, in a worker process on one core."""
    torch.set_num_threads(1)
    clock = _Clock()
    data = load_cifar10(job.data_dir, job.cache_dir)
    clock.lap("data")
    trained = trained_model(job.model, data.train_images, data.train_labels, job.cache_dir, job.seed,
                            recipe=job.recipe, device=job.device)
    model, losses, cached = trained.model, trained.losses, trained.cached
    clock.lap("train")
    test_pixels, labels = data.test_images.to(job.device), data.test_labels
    float_accuracy = accuracy(predict(model, normalize(test_pixels)), labels)
    rows = [{"model": job.model, "stage": "float", "preset": None, "accuracy": float_accuracy}]
    by_size: dict[int | None, Calibrated] = {}
    clips, agreement, files, integers = {}, {}, [], {}
    clock.lap("evaluate")
    for preset in map(lambda p: preset_for(job, p), STUDY_PRESETS.values()):
        size = preset.calibration_samples
        if size not in by_size:
            subset = calibration_images(data.train_images, size, job.seed)
            model_log(job.model)(f"calibrating on {len(subset)} training images ({preset.name})")
            by_size[size] = calibrated(model, subset, device=job.device, example=data.train_images)
        graph = by_size[size].graph
        integer = by_size[size].integer_model(preset, {"model": job.model, "seed": job.seed,
                                                       "calibration_images": size or len(data.train_images)})
        clips[preset.name] = clip_ranges(integer)
        integers[preset.name] = integer
        clock.lap("calibrate")
        rows += evaluate_preset(job, graph, integer, preset, test_pixels, labels)
        agreement[preset.name] = merged_agreement(integer, test_pixels[:AGREEMENT_IMAGES])
        path = Path(job.out_dir) / f"{job.model}-{preset.name}.npz"
        files.append({"model": job.model, "preset": preset.name, "file": path.name,
                      "bytes": model_file.save(integer, path)})
        clock.lap("evaluate")
    largest = max(by_size, key=lambda size: size or len(data.train_images))
    graph = by_size[largest].graph  # every calibration captured the same graph
    tradeoffs = tradeoff_rows(job, model, graph, integers, data.test_images, files)
    clock.lap("evaluate")
    return {"rows": rows, "weights": weight_summary(graph),
            "activations": activation_summary(graph, by_size[largest].stats, clips),
            "activation_images": largest or len(data.train_images),
            "agreement": agreement, "models": files, "timings_s": clock.seconds, "tradeoffs": tradeoffs,
            "layer_costs": [vars(cost) for cost in layer_costs(graph)],
            "training": {"losses": [list(entry) for entry in losses], "cached": cached,
                         "seconds": clock.seconds["train"]}}


def tradeoff_rows(job: ModelJob, model: torch.nn.Module, graph: Graph, integers: dict[str, IntegerModel],
                  pixels: torch.Tensor, files: list[dict]) -> dict[str, dict]:
    """Per configuration (float, then each preset): sizes, MACs, estimated energy and area, and
    measured latency/throughput of the executor that runs it (PyTorch float, reference integer)."""
    costs = layer_costs(graph)
    float_bytes = sum(4 * p.numel() for p in model.parameters())  # float32 parameters, as saved
    rows = {"float": {**model_costs(costs, None, None), "file_bytes": float_bytes, "executor": "PyTorch float32",
                      **measured_speed(lambda p: model(normalize(p)), pixels)}}
    for name, integer in integers.items():
        layers = integer.quantized_layers()
        bits = max(layer.weight_qparams.dtype.bits for layer in layers)
        file_bytes = next(f["bytes"] for f in files if f["preset"] == name)
        rows[name] = {**model_costs(costs, bits, bits), "file_bytes": file_bytes, "executor": "intq reference (integer)",
                      **measured_speed(lambda p, m=integer: run_integer(m, p), pixels)}
    return rows


def evaluate_preset(job: ModelJob, graph: Graph, integer: IntegerModel, preset: QConfig,
                    test_pixels: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """The weight-only stage (fake-quant weights, float activations) and the integer-only stage."""
    weight_stage, integer_stage = STAGES[job.model]
    weights_only = fake_quant_weights(graph, preset.weights)
    test_images = normalize(test_pixels)
    weight_accuracy = accuracy(predict(lambda x: run_float(weights_only, x), test_images), labels)
    integer_accuracy = accuracy(predict(lambda p: run_integer(integer, p), test_pixels), labels)
    model_log(job.model)(f"{preset.name}: {weight_stage} {weight_accuracy:.2f}%, {integer_stage} {integer_accuracy:.2f}%")
    return [{"model": job.model, "stage": weight_stage, "preset": preset.name, "accuracy": weight_accuracy},
            {"model": job.model, "stage": integer_stage, "preset": preset.name, "accuracy": integer_accuracy}]


@dataclass(frozen=True)
class StudyOptions:
    data_dir: str | None
    out_dir: Path
    cache_dir: Path
    seed: int = 0
    calib_samples: int | None = None
    device: str = "cpu"


class StudyError(Exception):
    """A study option that cannot work on this machine (names the option)."""


def machine_description() -> str:
    return (f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def assemble(parts: dict[str, dict], options: StudyOptions, source: str, timings: dict) -> dict:
    """The results dictionary (results.json) from the per-model parts."""
    rows = [row for part in parts.values() for row in part["rows"]]
    phases = ("train", "calibrate", "evaluate")
    timings = {**timings, **{phase: max(p["timings_s"].get(phase, 0.0) for p in parts.values()) for phase in phases}}
    return {
        "intq_version": __version__,
        "config": {"seed": options.seed, "device": options.device, "data_source": source,
                   "machine": machine_description(),
                   "calib_samples": {p.name: p.calibration_samples or "all" for p in STUDY_PRESETS.values()}
                   | ({"recommended": options.calib_samples} if options.calib_samples else {}),
                   "activation_images": max(p["activation_images"] for p in parts.values()),
                   "agreement_images": AGREEMENT_IMAGES,
                   "presets": {p.name: p.description for p in STUDY_PRESETS.values()}},
        "rows": rows,
        "published": PUBLISHED,
        "timings_s": timings,
        "training": {name: part["training"] for name, part in parts.items()},
        "weights": {name: part["weights"] for name, part in parts.items()},
        "activations": {name: part["activations"] for name, part in parts.items()},
        "agreement": {name: part["agreement"] for name, part in parts.items()},
        "models": [entry for part in parts.values() for entry in part["models"]],
        "tradeoffs": {name: part["tradeoffs"] for name, part in parts.items()},
        "layer_costs": {name: part["layer_costs"] for name, part in parts.items()},
    }


def run_models(options: StudyOptions, staging: Path) -> dict[str, dict]:
    """Both models at once, one process each (the two trainings share the two cores)."""
    jobs = [ModelJob(name, options.data_dir, str(options.cache_dir), str(staging), options.seed,
                     options.device, options.calib_samples) for name in MODELS]
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=get_context("spawn"), initializer=start_worker_logging,
                             initargs=(worker_log_level(),)) as pool:
        return dict(zip(MODELS, pool.map(run_model, jobs)))


def check_options(options: StudyOptions) -> None:
    if options.device not in ("cpu", "cuda"):
        raise StudyError(f"--device {options.device}: choose cpu or cuda")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise StudyError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if options.calib_samples is not None and options.calib_samples < 1:
        raise StudyError(f"--calib-samples {options.calib_samples}: must be at least 1")


def run_study(options: StudyOptions, log=_log.info, render: Callable[[dict, Path], None] | None = None) -> dict:
    """Run the study; write results.json and the integer models into options.out_dir, and the
    report through `render(results, folder)` (cli passes report.write_report; None: no report).

    Everything is produced in a staging folder inside out_dir and moved into place (os.replace,
    atomic per file) only when the whole run succeeded: a failed run leaves out_dir as it was.
    """
    start = time.perf_counter()
    check_options(options)
    out_dir = check_writable(options.out_dir, folder=True)  # staged_output creates it; a failed run leaves none
    data = load_cifar10(options.data_dir, options.cache_dir, download=True, progress=log)
    if options.calib_samples is not None and options.calib_samples > len(data.train_images):
        raise StudyError(f"--calib-samples {options.calib_samples}: the training set has {len(data.train_images):,} images")
    log(f"data: {data.source}")
    timings = {"data": time.perf_counter() - start}
    with staged_output(out_dir) as staging:
        results = assemble(run_models(options, staging), options, data.source, timings)
        report_start = time.perf_counter()
        if render is not None:
            render(results, staging)
        results["timings_s"]["report"] = time.perf_counter() - report_start
        results["timings_s"]["total"] = time.perf_counter() - start
        write_json(staging / "results.json", results)
    return results
