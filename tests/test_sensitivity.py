"""`intq sensitivity`: ranked per-layer table and a greedy mixed-precision model that meets its floor."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import write_image_folder
from intq.cli import main
from intq.graph import model_file
from intq.workflows.sensitivity import BIT_LADDER, greedy_mixed_precision, split_indices


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny image folder and a weights cache that the module's runs share (Net trained once)."""
    return (write_image_folder(tmp_path_factory.mktemp("data"), train_per_class=12, test_per_class=4),
            tmp_path_factory.mktemp("c"))


def _sensitivity(folders, out, *flags):
    data, cache = folders
    argv = ["sensitivity", "--data", str(data), "--out", str(out), "--cache", str(cache), "--bits", "2",
            "--max-drop", "5", *flags]
    assert main(argv) == 0
    return out, json.loads((out / "sensitivity.json").read_text())


@pytest.fixture(scope="module")
def results(folders, tmp_path_factory):
    return _sensitivity(folders, tmp_path_factory.mktemp("sens"))


def test_rows_rank_every_layer(results):
    _, res = results
    assert sorted(r["layer"] for r in res["rows"]) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    only = [r["only_this_layer"] for r in res["rows"]]
    assert only == sorted(only)


def test_mixed_precision_meets_its_floor_and_is_saved(results):
    out, res = results
    mixed = res["mixed"]
    assert set(mixed["layer_bits"].values()) <= set(BIT_LADDER)
    assert mixed["validation_accuracy"] >= res["validation_8bit"] - res["max_drop"]
    assert mixed["weight_bytes"] <= 61_770
    with np.load(out / "Net-mixed.npz", allow_pickle=False) as archive:
        assert "fc1.weight" in archive.files
    assert {"sensitivity.html", "sensitivity.md", "sensitivity.png"} <= {p.name for p in out.iterdir()}


def test_calibration_and_validation_images_are_disjoint():
    calibration, validation = split_indices(1000, 800, seed=0)
    assert not set(calibration.tolist()) & set(validation.tolist())
    assert len(validation) == 500 and len(calibration) == 500


def test_bad_bits_are_named(tmp_path, capsys):
    assert main(["sensitivity", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--bits", "1"]) == 2
    assert "--bits" in capsys.readouterr().err


class StubEvaluator:
    """What greedy_mixed_precision asks of an evaluator: the layers, a graph whose weighted nodes give
    each layer's weight count, and a validation accuracy per assignment (80 minus a known cost per
    layer and width)."""

    SIZES = {"a": 100, "b": 1000, "c": 10}
    COSTS = {"a": {8: 0, 6: 0, 4: 1, 3: 3, 2: 10},
             "b": {8: 0, 6: 0, 4: 0.5, 3: 0.5, 2: 5},
             "c": {8: 0, 6: 2, 4: 4, 3: 6, 2: 8}}

    def __init__(self):
        self.layers = list(self.SIZES)
        nodes = [SimpleNamespace(name=name, op=SimpleNamespace(weight=torch.zeros(size))) for name, size in self.SIZES.items()]
        self.graph = SimpleNamespace(weighted=lambda: nodes)
        self.asked = []

    def accuracy(self, layer_bits):
        self.asked.append(dict(layer_bits))
        return 80 - sum(self.COSTS[layer][bits] for layer, bits in layer_bits.items())


def test_greedy_search_takes_the_best_move_until_the_floor():
    """By hand, floor 78: b 8->6 (80, ties a 8->6 and saves more bits), a 8->6 (80), b 6->4 (79.5),
    b 4->3 (79.5), a 6->4 (78.5); then every move falls below 78."""
    lines = []
    chosen, accuracy = greedy_mixed_precision(StubEvaluator(), 78, lines.append)
    assert chosen == {"a": 4, "b": 3, "c": 8} and accuracy == 78.5
    assert lines == ["  a=8, b=6, c=8: validation 80.00%", "  a=6, b=6, c=8: validation 80.00%",
                     "  a=6, b=4, c=8: validation 79.50%", "  a=6, b=3, c=8: validation 79.50%",
                     "  a=4, b=3, c=8: validation 78.50%"]


def test_greedy_search_with_no_feasible_move_keeps_every_layer_at_8_bits():
    evaluator = StubEvaluator()
    assert greedy_mixed_precision(evaluator, 80.5, lambda line: None) == ({"a": 8, "b": 8, "c": 8}, 80)
    assert len(evaluator.asked) == 4  # the 8-bit start, then one trial per layer


def test_greedy_search_lowers_every_layer_to_the_last_rung_when_nothing_costs():
    evaluator = StubEvaluator()
    evaluator.COSTS = {layer: dict.fromkeys(BIT_LADDER, 0) for layer in evaluator.layers}
    chosen, accuracy = greedy_mixed_precision(evaluator, 80, lambda line: None)
    assert chosen == dict.fromkeys(evaluator.layers, BIT_LADDER[-1]) and accuracy == 80


def test_the_methods_apply_to_every_evaluated_model_and_the_chosen_mix_learns_its_rounding(folders, results, tmp_path):
    out, res = _sensitivity(folders, tmp_path / "learned", "--bias-correction", "--equalization", "--rounding",
                            "adaround", "--rounding-iters", "5")
    assert (res["rounding"], res["bias_correction"], res["equalization"]) == ("adaround", True, True)
    assert res["rows"] != results[1]["rows"]  # the search's models are corrected and equalized
    learned = res["mixed"]["learned"]
    assert learned["rounding"] == "adaround" and 0 <= learned["validation_accuracy"] <= 100
    assert set(res["test_accuracy"]) == {"float", "8-bit", "mixed", "mixed, adaround", "all 2-bit"}
    saved = model_file.load(out / "Net-mixed.npz")
    assert saved.metadata["rounding"] == "adaround" and saved.metadata["rounding_iterations"] == 5
    assert "adaround rounding was then learned on the chosen mix" in (out / "sensitivity.md").read_text()


def test_rounding_iters_without_a_learned_rounding_is_refused(tmp_path, capsys):
    assert main(["sensitivity", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--rounding-iters", "5"]) == 2
    assert "--rounding-iters: only with a learned --rounding" in capsys.readouterr().err
