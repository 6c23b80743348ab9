"""The model zoo: torchvision's classifiers, random weights, through intq end to end (issue 13).

Each architecture is built with seeded random weights, its BatchNorm statistics warmed on the
calibration images (warm_batchnorm), captured under ImageNet's mean/std, calibrated, converted
(timed), saved as a model file and run integer-only by the reference; then measured against float
(top-1 agreement, SQNR of the logits) and against the other executors (`c` and `onnx_exact` on the
whole output, the engines each op alone as `intq verify` checks them):

    images = zoo_images(data_dir, size=224, calibration=300, evaluation=100, seed=0, cache_dir=".cache/intq")
    row = measure_zoo_model("resnet18", images, out_dir=Path("zoo"))   # a dict: one row of the table

A model intq cannot capture yet gives a row with its one-line refusal, not an exception.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from intq.arith.preprocessing import Preprocessing
from intq.arith.qparams import dequantize
from intq.executors.encoding import EngineError
from intq.executors.registry import executor, run
from intq.executors.verify import compare, layer_differences, path_summary
from intq.extras import require
from intq.files import ensure_writable_dir
from intq.graph.capture import CaptureError, capture
from intq.graph.config import RECOMMENDED, QConfig
from intq.graph.convert import ConversionError, collect_statistics, convert
from intq.graph.integer_model import IntegerModel
from intq.graph.model_file import load, save
from intq.workflows.inspect import sqnr_db

ZOO = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
       "squeezenet1_1", "shufflenet_v2_x1_0", "vgg11_bn", "regnet_y_400mf", "mnasnet0_5")
IMAGENET = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's Normalize for ImageNet
EXACT_EXECUTORS = ("c", "onnx_exact")  # bit-exact with the reference: compared on whole outputs
ENGINES = ("onnx", "torch_quantized")  # within 1 LSB per op: each op fed the reference's inputs
FLOAT_BATCH = 50  # images per float forward pass (BatchNorm warm-up, float logits)
C_MAX_WEIGHTS = 30_000_000  # model.h holds every weight as C source text: ~4.5 bytes and ~1.5 us of gcc each
NOISE_SNR_DB = 40.0  # per-layer noise of the float baseline (perturbed_logits)
REFUSAL_CHARS = 240  # a refusal shown in a table row is clipped to this many characters


@dataclass(frozen=True)
class ZooImages:
    """uint8 pixels (N, 3, H, W): calibration (also warms BatchNorm), evaluation (top-1, SQNR), and
    the first `exact` evaluation images, on which every other executor is compared with the reference."""

    calibration: torch.Tensor
    evaluation: torch.Tensor
    exact: torch.Tensor
    source: str


def zoo_model(name: str, *, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """torchvision's `name` with random weights drawn after torch.manual_seed(seed), in eval mode."""
    models = require("torchvision.models", "the model zoo (pip install torchvision)")
    torch.manual_seed(seed)
    return models.get_model(name, weights=None, num_classes=num_classes).eval()


def warm_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Give random BatchNorm layers the statistics of real inputs: every BatchNorm's running mean and
    variance reset, then set to the cumulative average over the float `batches` (momentum None: the
    average of the batches' means and unbiased variances), the BatchNorm layers alone in train mode
    (dropout and stochastic depth stay off, so every batch sees the network as evaluated); eval after."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval()


def float_batches(pixels: torch.Tensor, preprocessing: Preprocessing) -> Iterable[torch.Tensor]:
    """The uint8 `pixels` preprocessed, FLOAT_BATCH images at a time."""
    return (preprocessing.apply(pixels[start : start + FLOAT_BATCH]) for start in range(0, len(pixels), FLOAT_BATCH))


def float_logits(model: nn.Module, pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """The float model's outputs (N, classes) on uint8 `pixels`, preprocessed as it expects."""
    with torch.no_grad():
        return torch.cat([model(batch) for batch in float_batches(pixels, preprocessing)])


def perturbed_logits(model: nn.Module, pixels: torch.Tensor, preprocessing: Preprocessing, snr_db: float = NOISE_SNR_DB,
                     seed: int = 0) -> torch.Tensor:
    """The float model's outputs with seeded Gaussian noise added to every Conv2d and Linear output:
    y + n, n ~ N(0, sigma^2), sigma = rms(y) 10^(-snr_db/20), so each layer alone has SQNR `snr_db`
    (about what 8-bit quantization leaves per layer). How far the logits move measures how much the
    network itself amplifies small per-layer errors, a baseline for the integer model's SQNR."""
    generator = torch.Generator().manual_seed(seed)

    def add_noise(module, inputs, output):
        sigma = output.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)
        return output + sigma * torch.randn(output.shape, generator=generator)

    hooks = [module.register_forward_hook(add_noise) for module in model.modules()
             if isinstance(module, (nn.Conv2d, nn.Linear))]
    try:
        return float_logits(model, pixels, preprocessing)
    finally:
        for hook in hooks:
            hook.remove()


def top1_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of rows whose argmax is the same in both (N, classes) outputs."""
    return float((reference.argmax(dim=1) == other.argmax(dim=1)).double().mean())


def resized(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, C, h, w) resized to (size, size) bilinearly (half-pixel centres, as PIL's
    upsampling), rounded to whole pixels; unchanged when already that size."""
    if tuple(pixels.shape[2:]) == (size, size):
        return pixels
    scaled = F.interpolate(pixels.to(torch.float32), size=(size, size), mode="bilinear", align_corners=False)
    return scaled.round().clamp(0, 255).to(torch.uint8)


def synthetic_pixels(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` smooth seeded images (3, size, size): uniform random 8x8 pixels upsampled bilinearly,
    so neighbouring pixels correlate as in photographs."""
    coarse = torch.randint(0, 256, (count, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return resized(coarse, size)


def split_images(pixels: torch.Tensor, size: int, calibration: int, evaluation: int, exact: int, seed: int,
                 source: str) -> ZooImages:
    """Disjoint seeded calibration and evaluation subsets of `pixels`, resized to `size`; `exact` of
    the evaluation images are the executors' comparison images. Fewer images than asked: ValueError."""
    if calibration + evaluation > len(pixels):
        raise ValueError(f"{source}: {len(pixels)} images, {calibration} calibration + {evaluation} evaluation asked")
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))
    chosen = resized(pixels[order[: calibration + evaluation]], size)
    evaluated = chosen[calibration:]
    return ZooImages(chosen[:calibration], evaluated, evaluated[: min(exact, evaluation)], source)


def zoo_images(data_dir: str | Path | None, *, size: int, calibration: int, evaluation: int, exact: int = 2,
               seed: int = 0, cache_dir: str | Path = ".cache/intq") -> ZooImages:
    """The zoo's images: from the test split of `data_dir` (CIFAR-10 or an image folder of one size,
    read by workflows/subject.load_data), else, when `data_dir` is None, synthetic_pixels."""
    if data_dir is None:
        pixels = synthetic_pixels(calibration + evaluation, size, seed)
        return split_images(pixels, size, calibration, evaluation, exact, seed, "synthetic images (seeded)")
    from intq.workflows.subject import load_data

    data = load_data(Path(data_dir), cache_dir)
    pixels = data.test_images if len(data.test_images) else data.train_images
    return split_images(pixels, size, calibration, evaluation, exact, seed, f"{data_dir} ({len(pixels):,} images)")


def refusal(err: Exception, limit: int = REFUSAL_CHARS) -> str:
    """The one line of intq's refusal, clipped to `limit` characters."""
    line = " ".join(str(err).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def exact_check(model: IntegerModel, name: str, pixels: torch.Tensor, reference: torch.Tensor,
                c_max_weights: int = C_MAX_WEIGHTS) -> dict:
    """A bit-exact executor's outputs against the reference's: compare() (max_lsb 0 when bit-exact),
    or {"error": its one line} when it cannot run here; `c` is not run on a model of more than
    `c_max_weights` weights ({"not_run": why})."""
    weights = sum(op.weight.size for op in model.quantized_layers())
    if name == "c" and weights > c_max_weights:
        return {"not_run": f"{weights / 1e6:.0f} M weights, over the {c_max_weights / 1e6:.0f} M the C check compiles"}
    try:
        output = run(executor(name).prepare(model), pixels)
    except EngineError as err:
        return {"error": refusal(err)}
    return compare(reference, output)


def engine_check(model: IntegerModel, name: str, pixels: torch.Tensor, reference: torch.Tensor) -> dict:
    """An engine that requantizes in float, as `intq verify` checks it: each op fed the reference's own
    inputs (layer_differences; per_op_max_lsb 1 at most near rounding ties; the path each op type took,
    path_summary), and the whole output (compare); {"error": its one line} when it cannot run here."""
    chosen = executor(name)
    try:
        forward = chosen.prepare(model)
        output = run(forward, pixels)
        layers = layer_differences(model, chosen.op_steps(model, forward), pixels)
    except EngineError as err:
        return {"error": refusal(err)}
    values = sum(row["values"] for row in layers.values())
    return {**compare(reference, output), "per_op_values": values,
            "per_op_differing": sum(row["differing"] for row in layers.values()),
            "per_op_max_lsb": max(row["max_lsb"] for row in layers.values()), "paths": path_summary(layers)}


def measure_zoo_model(name: str, images: ZooImages, *, out_dir: Path, num_classes: int = 1000, seed: int = 0,
                      config: QConfig = RECOMMENDED, executors: tuple[str, ...] = EXACT_EXECUTORS + ENGINES,
                      c_max_weights: int = C_MAX_WEIGHTS) -> dict:
    """One row of the zoo table for torchvision's `name`: the float model (zoo_model, warm_batchnorm),
    capture, statistics and convert (each timed), the model file's size (written to out_dir/<name>.npz
    and read back: the integers measured are the file's), the reference on the evaluation images
    (top-1 agreement with float, SQNR of the dequantized logits, eq. 1; the same for perturbed_logits),
    and each of `executors` against the reference on images.exact (exact_check for c and onnx_exact,
    engine_check for the engines; `c` only up to `c_max_weights`). A capture or conversion intq refuses gives {"model", "refused": one line}."""
    size = tuple(images.calibration.shape[2:])
    row: dict = {"model": name, "input": [3, *size], "num_classes": num_classes,
                 "calibration_images": len(images.calibration)}
    model = zoo_model(name, num_classes=num_classes, seed=seed)
    row["float_parameters"] = sum(parameter.numel() for parameter in model.parameters())
    warm_batchnorm(model, float_batches(images.calibration, IMAGENET))
    try:
        started = time.perf_counter()
        graph = capture(model, images.calibration[:2], IMAGENET)
        row["capture_s"] = time.perf_counter() - started
        started = time.perf_counter()
        stats = collect_statistics(graph, float_batches(images.calibration, IMAGENET))
        row["calibration_s"] = time.perf_counter() - started
        started = time.perf_counter()
        converted = convert(graph, stats, config, {"zoo": name, "calibration_images": len(images.calibration)})
        row["convert_s"] = time.perf_counter() - started
    except (CaptureError, ConversionError) as err:
        return {**row, "refused": refusal(err)}
    path = ensure_writable_dir(out_dir) / f"{name}.npz"
    row["npz_bytes"] = save(converted, path)
    integer_model = load(path)
    started = time.perf_counter()
    integers = run(executor("reference").prepare(integer_model), images.evaluation)
    row["reference_s"] = time.perf_counter() - started
    reference_logits = dequantize(integers, integer_model.output_qparams(), torch.float64)
    expected = float_logits(model, images.evaluation, IMAGENET).double()
    perturbed = perturbed_logits(model, images.evaluation, IMAGENET, seed=seed).double()
    row.update(evaluation_images=len(images.evaluation), top1_agreement=top1_agreement(expected, reference_logits),
               sqnr_db=sqnr_db(expected, reference_logits), noise_top1_agreement=top1_agreement(expected, perturbed),
               noise_sqnr_db=sqnr_db(expected, perturbed))
    exact = integers[: len(images.exact)]
    row["executor_images"] = len(images.exact)
    for other in executors:
        row[other] = (engine_check(integer_model, other, images.exact, exact) if other in ENGINES else
                      exact_check(integer_model, other, images.exact, exact, c_max_weights))
    return row
