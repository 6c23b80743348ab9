"""`intq sensitivity`: ranked per-layer table and a greedy mixed-precision model that meets its floor."""
import json

import numpy as np
import pytest

from conftest import write_image_folder
from intq.cli import main
from intq.sensitivity import BIT_LADDER, split_indices


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    data = write_image_folder(tmp_path_factory.mktemp("data"), train_per_class=12, test_per_class=4)
    out = tmp_path_factory.mktemp("sens")
    argv = ["sensitivity", "--data", str(data), "--out", str(out), "--cache", str(tmp_path_factory.mktemp("c")),
            "--bits", "2", "--max-drop", "5"]
    assert main(argv) == 0
    return out, json.loads((out / "sensitivity.json").read_text())


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
