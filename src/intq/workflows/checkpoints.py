"""`intq train`, `intq quantize` and `intq eval` for any supported architecture and checkpoint
(`intq compare` is compare.run_compare).

Checkpoints are pickle-free .npz files (train.save_weights, read by pipeline.load_checkpoint);
integer models are IntegerModel .npz. The float -> integer steps are the pipeline's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from intq.graph import model_file
from intq.graph.config import QConfig, RoundingConfig
from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing
from intq.cifar.data import Dataset
from intq.graph.integer_model import IntegerModel
from intq.executors.reference import run_integer
from intq.ptq.reconstruction import LearnedRounding
from intq.workflows.pipeline import build, calibration_images, quantize_model
from intq.cifar.train import ClassifierRecipe, accuracy, predict, save_weights, train_classifier

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr


def float_accuracy(model: torch.nn.Module, data: Dataset, preprocessing: Preprocessing = STUDY_PREPROCESSING) -> float:
    """Top-1 of the float model on the test images, preprocessed as it expects, 500 at a time."""
    return accuracy(predict(lambda p: model(preprocessing.apply(p)), data.test_images, 500), data.test_labels)


def integer_accuracy(model: IntegerModel, data: Dataset) -> float:
    return accuracy(predict(lambda p: run_integer(model, p), data.test_images, 500), data.test_labels)


def train_architecture(arch: str, data: Dataset, recipe: ClassifierRecipe, seed: int, out: Path, log=_log.info) -> dict:
    """Train `arch` from a seeded initialisation, save the checkpoint, return the history."""
    torch.manual_seed(seed)
    model = build(arch)
    start = time.perf_counter()
    history = train_classifier(model, data.train_images, data.train_labels, recipe, seed, log,
                               evaluate=lambda: float_accuracy(model, data))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, [(h["epoch"], 0, h["loss"]) for h in history], out)
    return {"history": history, "seconds": time.perf_counter() - start, "checkpoint": str(out)}


def with_options(config: QConfig, layer_bits: tuple[tuple[str, int], ...], rounding: str, iterations: int | None,
                 seed: int, layer_abits: tuple[tuple[str, int], ...] = ()) -> QConfig:
    """`config` with per-layer weight bits (quantize's --layer-bits: each 2..8, each layer once; convert
    checks the names), per-node activation bits (--layer-abits: the named nodes' outputs, alike) and a
    rounding (--rounding, --rounding-iters: only with a learned one; --seed). ValueError naming the
    option. Example: (("conv", 8),), "brecq", 500, 0, (("pool", 8),) -> conv's weights and pool's
    output at 8 bits, BRECQ."""
    for option, pairs in (("--layer-bits", layer_bits), ("--layer-abits", layer_abits)):
        names = [name for name, _ in pairs]
        bad = [f"{name}={bits}" for name, bits in pairs if not 2 <= bits <= 8]
        if bad or len(set(names)) < len(names):
            raise ValueError(f"{option}: bit widths must be 2..8, each layer named once, got {', '.join(bad or names)}")
    if layer_bits:
        config = replace(config, weights=replace(config.weights, layer_bits=layer_bits))
    if layer_abits:
        config = replace(config, activations=replace(config.activations, layer_bits=layer_abits))
    if rounding == "nearest" and iterations is not None:
        raise ValueError("--rounding-iters: only with a learned --rounding (adaround, brecq)")
    if rounding == "nearest":
        return config
    try:
        options = RoundingConfig(rounding, seed=seed, **({} if iterations is None else {"iterations": iterations}))
    except ValueError as err:
        raise ValueError(f"--rounding-iters: {err}") from None
    return replace(config, rounding=options)


def rounding_figures(config: QConfig, learned: LearnedRounding | None) -> dict:
    """The rounding method and, when learned, its seconds and each unit's reconstruction error (eq. 39)."""
    figures = {"method": config.rounding.method}
    if learned is not None:
        figures.update(iterations=config.rounding.iterations, seed=config.rounding.seed, seconds=learned.seconds,
                       units=[asdict(unit) for unit in learned.units])
    return figures


def quantize_checkpoint(model: torch.nn.Module, data: Dataset, config: QConfig, calib_samples: int, seed: int,
                        out: Path, metadata: dict, preprocessing: Preprocessing = STUDY_PREPROCESSING) -> dict:
    """Calibrate on training images, convert with `config`, save the IntegerModel, measure both
    accuracies on the test images (None without a test split)."""
    pixels = calibration_images(data.train_images, calib_samples, seed)
    quantized = quantize_model(model, pixels, config, metadata=metadata, example=data.train_images,
                               preprocessing=preprocessing)
    integer = quantized.integer_model
    size = model_file.save(integer, out)
    tested = len(data.test_images) > 0
    return {"float_accuracy": float_accuracy(model, data, preprocessing) if tested else None,
            "integer_accuracy": integer_accuracy(integer, data) if tested else None,
            "test_images": len(data.test_images), "bytes": size, "file": str(out), "input": integer.input.shape,
            "preprocessing": {"mean": list(integer.input.preprocessing.mean), "std": list(integer.input.preprocessing.std)},
            "rounding": rounding_figures(config, quantized.rounding)}

