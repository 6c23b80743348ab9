"""`intq finetune`: calibrate, convert (the post-training starting point), fine-tune with fake
quantization and learned step sizes (qat/finetune.py), convert again, save the integer model, and
measure float, before and after accuracy integer-only on the test images."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing
from intq.cifar.data import Dataset
from intq.cifar.train import accuracy, predict
from intq.graph import model_file
from intq.graph.captured_graph import run_float
from intq.graph.config import QConfig
from intq.qat.finetune import FineTuned, FinetuneOptions, finetune, finetune_float
from intq.workflows.checkpoints import float_accuracy, integer_accuracy
from intq.workflows.pipeline import calibrated, calibration_images, capture_graph

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr


def finetune_metadata(metadata: dict, options: FinetuneOptions) -> dict:
    """The model file's provenance: `metadata` and the fine-tuning options, as flat `finetune_*` entries."""
    return {**metadata, **{f"finetune_{key}": value for key, value in asdict(options).items()}}


def finetune_model(model: torch.nn.Module, data: Dataset, config: QConfig, calib_samples: int, seed: int,
                   options: FinetuneOptions, metadata: dict | None = None,
                   preprocessing: Preprocessing = STUDY_PREPROCESSING) -> FineTuned:
    """Calibrate `model` on `calib_samples` seeded training images, then fine-tune on all of `data`'s
    training images (options.images of them per epoch) from that conversion (qat.finetune.finetune)."""
    pixels = calibration_images(data.train_images, calib_samples, seed)
    calibration = calibrated(model, pixels, example=data.train_images, preprocessing=preprocessing)
    rounding_images = (calibration.graph.preprocessing.apply(pixels[: config.rounding.images])
                       if config.rounding.learned else None)
    return finetune(calibration.graph, calibration.stats, config, data.train_images, data.train_labels, options,
                    finetune_metadata(metadata or {}, options), log=_log.info, rounding_images=rounding_images)


def float_control_accuracy(model: torch.nn.Module, data: Dataset, options: FinetuneOptions,
                           preprocessing: Preprocessing = STUDY_PREPROCESSING) -> float:
    """Test top-1 of the float model after the same fine-tuning with nothing quantized (qat.finetune_float):
    what the extra training alone buys, the yardstick for a fine-tuned model that ends above float."""
    graph = capture_graph(model, data.train_images[:1], preprocessing=preprocessing)
    trained, _ = finetune_float(graph, data.train_images, data.train_labels, options, log=_log.info)
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return run_float(trained, trained.preprocessing.apply(pixels))
    return accuracy(predict(forward, data.test_images, 500), data.test_labels)


def finetune_checkpoint(model: torch.nn.Module, data: Dataset, config: QConfig, calib_samples: int, seed: int,
                        options: FinetuneOptions, out: Path, metadata: dict,
                        preprocessing: Preprocessing = STUDY_PREPROCESSING, control: bool = False) -> dict:
    """finetune_model, the fine-tuned integer model saved to `out`, and the accuracies on the test images
    (None without a test split): float, before (the post-training conversion) and after fine-tuning, and
    with `control` the float model after the same fine-tuning unquantized (float_control_accuracy)."""
    start = time.perf_counter()
    result = finetune_model(model, data, config, calib_samples, seed, options, metadata, preprocessing)
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    size = model_file.save(result.after, out)
    tested = len(data.test_images) > 0
    controlled = control and tested
    return {"float_accuracy": float_accuracy(model, data, preprocessing) if tested else None,
            "float_control_accuracy": (float_control_accuracy(model, data, options, preprocessing)
                                       if controlled else None),
            "before_accuracy": integer_accuracy(result.before, data) if tested else None,
            "after_accuracy": integer_accuracy(result.after, data) if tested else None,
            "test_images": len(data.test_images), "history": result.history, "finetune_seconds": seconds,
            "bytes": size, "file": str(out), "options": asdict(options)}
