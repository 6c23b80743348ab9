"""The whole study on the shared CIFAR-10 copy, when it is present: the issue's accuracy bars."""
import json
import os
from pathlib import Path

import pytest

from intq.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
DATA = Path(os.environ.get("INTQ_DATA") or SHARED)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"no CIFAR-10 image folder at {DATA}")]


def accuracy(rows, model, stage, preset=None):
    return next(r["accuracy"] for r in rows if (r["model"], r["stage"], r["preset"]) == (model, stage, preset))


def test_study_meets_the_accuracy_bars(tmp_path):
    out = tmp_path / "study"
    _run_study_and_check(tmp_path, out)
    _check_executors_on_real_images(out / "Net-recommended.npz", tmp_path / "cache")


def _check_executors_on_real_images(model_file: Path, cache: Path) -> None:
    """The study's integer model on 1,000 real test images: exact executors exact, engines' top-1 equal."""
    from intq.cifar.data import load_cifar10
    from intq.graph.model_file import load
    from intq.executors.verify import verify

    pixels = load_cifar10(str(DATA), cache).test_images[:1000]
    rows = verify(load(model_file), pixels, ("onnx", "onnx_exact", "torch_quantized"))
    assert rows["onnx_exact"]["differing_share"] == 0.0
    assert rows["onnx"]["top1_differing_share"] <= 0.001
    assert rows["torch_quantized"]["top1_differing_share"] <= 0.01  # 8-bit activations: fbgemm may saturate


def _run_study_and_check(tmp_path: Path, out: Path) -> None:
    assert main(["run", "--data", str(DATA), "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    net_float = accuracy(rows, "Net", "float")
    bias_float = accuracy(rows, "NetWithBias", "float")
    assert net_float >= 50.0
    assert net_float - accuracy(rows, "Net", "weights+activations", "recommended") <= 0.2
    assert bias_float - accuracy(rows, "NetWithBias", "integer+bias", "recommended") <= 0.2
    # the study preset keeps the study's pattern: each quantization step costs accuracy
    assert accuracy(rows, "Net", "weights+activations", "study") < accuracy(rows, "Net", "weights", "study") <= net_float + 0.5
    assert accuracy(rows, "NetWithBias", "integer+bias", "study") < bias_float
