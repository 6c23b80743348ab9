"""Throughput and top-1 accuracy of every executor of one intq integer model against PyTorch float,
PyTorch's int8 (torchao pt2e compiled to int8 kernels, torch.ao FX where pt2e cannot run:
workflows/peer.py), ONNX Runtime float and ONNX Runtime's own quantize_static QDQ models of the same
float model on the same calibration images (workflows/ort_peer.py, every option in its docstring and
in the rows' notes), at batch 256, the executors timed in turn round after round so that the machine's drifting speed
reaches every row alike, and latency at batch 1 (each executor's calls in a row: at that size the
switch between frameworks would dominate), measured in one run. Run by hand:

    .venv/bin/python benchmarks/bench_executors.py --model runs/resnet20/resnet20-e10.npz --arch resnet20 \
        [--preset x86] [--calib-samples 2000] [--eval-samples N] [--repeats 9] [--threads 2] [--json FILE]

--model is a study model name (Net, NetWithBias) or a checkpoint from `intq train` with --arch. The
integer model is converted here from --calib-samples training images, with the same images as
PyTorch's calibration. "intq on PyTorch kernels" uses the onednn engine (the default), "x86" the
engine torch.ao's x86 qconfig uses. Prints each row's top-1 accuracy on --eval-samples seeded random test
images (all by default) and its top-1 agreement with the intq reference, the median seconds per batch,
images per second and the ratio to PyTorch float, the bars of issue 5 (reference >= 0.5x float;
PyTorch kernels >= 2x float) and of issue 15 (intq's fastest path >= the faster of ONNX Runtime's
own QDQ models).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from dataclasses import replace

import torch

from intq.cifar.train import accuracy, predict
from intq.workflows.compare import PREDICT_BATCH, batch_sizes
from intq.workflows.ort_peer import ORT_QDQ_ROW, ort_peers
from intq.workflows.peer import peer_quantize
from intq.graph.config import PRESETS
from intq.workflows.costs import median_seconds
from intq.cifar.data import load_cifar10, normalize
from intq.executors.registry import EXECUTORS, TorchQuantized
from intq.workflows.pipeline import calibration_images, calibration_indices, float_model, quantize_model


def interleaved_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run() over `repeats` rounds, every round timing each run once in turn,
    so a drift in the machine's speed reaches every row alike. An untimed call before each timed one
    absorbs the switch between frameworks (ONNX Runtime's and PyTorch's idle threads spin for a while
    after a run, taking the cores from whichever runs next)."""
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            run()
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def intq_executors(threads: int) -> dict:
    """{row label: executor} for every registered executor but `c` (a program per call: not a kernel to
    time), torch_quantized on both engines, ONNX Runtime on `threads` threads."""
    rows = {"reference": "intq reference", "torch_quantized": "intq on PyTorch kernels", "onnx": "intq on ONNX Runtime",
            "onnx_exact": "intq on ONNX Runtime, exact", "onnx_qdq": "intq QDQ on ONNX Runtime"}
    chosen = {rows[name]: executor for name, executor in EXECUTORS.items() if name in rows}
    chosen["intq on PyTorch x86"] = TorchQuantized("x86")
    for label in ("intq on ONNX Runtime", "intq on ONNX Runtime, exact", "intq QDQ on ONNX Runtime"):
        chosen[label] = replace(chosen[label], threads=threads)
    return chosen


def scored(runners: dict, images: torch.Tensor, labels: torch.Tensor) -> dict[str, dict]:
    """{row: accuracy (%) on `images` and top-1 agreement (%) with the intq reference}."""
    predictions = {label: predict(forward, images, PREDICT_BATCH) for label, forward in runners.items()}
    return {label: {"accuracy": accuracy(predicted, labels),
                    "top1_agreement_with_intq": accuracy(predicted, predictions["intq reference"])}
            for label, predicted in predictions.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Net")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="x86")
    parser.add_argument("--calib-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=None, help="test images scored, a seeded random subset (default: all)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=os.environ.get("INTQ_DATA"))
    parser.add_argument("--cache", default=os.environ.get("INTQ_CACHE", ".cache/intq"))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    data = load_cifar10(args.data, args.cache)
    name, model = float_model(args.model, data, args.cache, arch=args.arch)
    calibration = calibration_images(data.train_images, args.calib_samples, 0)
    integer = quantize_model(model, calibration, PRESETS[args.preset], example=data.train_images).integer_model
    evaluation = calibration_indices(len(data.test_images), args.eval_samples, 0)
    peers = [peer_quantize(model, calibration, normalize, batch_sizes(len(evaluation))),
             *ort_peers(model, calibration, normalize, args.threads)]
    runners = {"PyTorch float32": lambda p: model(normalize(p))}
    for peer in peers:
        print(f"{peer.row}: {'; '.join(peer.notes)}")
        runners[peer.row] = peer.forward
    for label, executor in intq_executors(args.threads).items():
        runners[label] = executor.prepare(integer)
    with torch.no_grad():
        scores = scored(runners, data.test_images[evaluation], data.test_labels[evaluation])
    batch, single = data.test_images[:256], data.test_images[:1]
    with torch.no_grad():
        seconds = interleaved_medians({label: lambda f=forward: f(batch) for label, forward in runners.items()}, args.repeats)
        latency = {label: median_seconds(lambda f=forward: f(single), 5 * args.repeats) for label, forward in runners.items()}
    rows = {label: {**scores[label], "batch256_s": seconds[label], "images_per_s": len(batch) / seconds[label],
                    "latency_ms_b1": latency[label] * 1e3} for label in runners}
    float_rate = rows["PyTorch float32"]["images_per_s"]
    evaluated = len(evaluation)
    print(f"{name}, preset {args.preset}, {len(calibration)} calibration images, accuracy on {evaluated} test images, "
          f"{args.threads} threads, batch 256, median of {args.repeats}")
    print(f"  {'executor':<50}{'top-1 %':>8}{'= intq':>8}{'s/batch':>9}{'img/s':>9}{'x float':>9}{'ms (b1)':>9}")
    for label, row in rows.items():
        row["ratio_to_float"] = row["images_per_s"] / float_rate
        print(f"  {label:<50}{row['accuracy']:>8.2f}{row['top1_agreement_with_intq']:>8.2f}{row['batch256_s']:>9.3f}"
              f"{row['images_per_s']:>9.0f}{row['ratio_to_float']:>9.2f}{row['latency_ms_b1']:>9.2f}")
    ort_qdq = max(row["images_per_s"] for label, row in rows.items() if label.startswith(ORT_QDQ_ROW))
    fastest = max((row["images_per_s"], label) for label, row in rows.items() if label.startswith("intq"))
    print(f"bars: reference >= 0.5x float: {rows['intq reference']['ratio_to_float']:.2f}; "
          f"PyTorch kernels >= 2x float: {rows['intq on PyTorch kernels']['ratio_to_float']:.2f}; "
          f"intq's fastest path ({fastest[1]}) / ONNX Runtime's faster QDQ model: {fastest[0] / ort_qdq:.2f}")
    result = {"model": name, "preset": args.preset, "threads": args.threads, "calibration_images": len(calibration),
              "evaluation_images": evaluated, "notes": {peer.row: peer.notes for peer in peers}, "rows": rows}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
