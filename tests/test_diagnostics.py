"""`intq inspect`: per-layer diagnostics that agree with what they measure."""
import json
import math

import pytest
import torch

from conftest import calibrated, make_pixels, write_image_folder
from intq.cli import main
from intq.graph.config import RECOMMENDED, STUDY
from intq.graph.convert import convert
from intq.workflows.inspect import layer_rows, sqnr_db
from intq.cifar.models import Net


def test_sqnr_worked_values():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + torch.tensor([0.3, 0.4])) == pytest.approx(20.0)  # noise power = signal / 100


@pytest.mark.parametrize("preset", [STUDY, RECOMMENDED], ids=lambda p: p.name)
def test_layer_rows_respect_the_overflow_proof_and_rank_presets(preset):
    torch.manual_seed(0)
    pixels = make_pixels(32)
    graph, stats = calibrated(Net().eval(), pixels)
    rows = layer_rows(graph, convert(graph, stats, preset), pixels)
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    for row in rows:
        assert 0 <= row["accumulator_observed"] <= row["accumulator_bound"] < row["int32_limit"]
        assert 0.0 <= row["clipped_share"] <= 1.0
        assert row["sqnr_fake_quant_db"] > 0


def test_recommended_preset_has_a_better_first_layer_than_the_study():
    torch.manual_seed(0)
    pixels = make_pixels(32)
    graph, stats = calibrated(Net().eval(), pixels)
    study = layer_rows(graph, convert(graph, stats, STUDY), pixels)
    recommended = layer_rows(graph, convert(graph, stats, RECOMMENDED), pixels)
    assert recommended[0]["sqnr_integer_db"] > study[0]["sqnr_integer_db"] + 6  # more than one bit better


def test_inspect_command_writes_its_report(tmp_path):
    data = write_image_folder(tmp_path / "data", train_per_class=8, test_per_class=3)
    out = tmp_path / "inspect"
    assert main(["inspect", "--data", str(data), "--out", str(out), "--cache", str(tmp_path / "c"),
                 "--method", "percentile(99.9)", "--wbits", "4", "--abits", "6", "--images", "20"]) == 0
    results = json.loads((out / "inspect.json").read_text())
    assert results["images"] == 20 and len(results["layers"]) == 5
    assert results["layers"][0]["weight_bits"] == 4
    assert {"inspect.html", "inspect.md", "inspect.png"} <= {p.name for p in out.iterdir()}


def test_activation_summary_has_a_clip_range_for_average_pools(pixels):
    """inspect's activation summary on a model with a global average pool (a KeyError before)."""
    from intq.workflows.study import activation_summary, clip_ranges

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 10)).eval()
    graph, stats = calibrated(model, pixels)
    integer = convert(graph, stats, RECOMMENDED)
    summary = activation_summary(graph, stats, {"recommended": clip_ranges(integer)})
    pool = next(op for op in integer.layers if type(op).__name__ == "QAvgPool")
    assert summary[pool.name]["clip"]["recommended"][1] > 0
