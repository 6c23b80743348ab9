"""`intq run` end to end on small synthetic data: no network, no shared data."""
import json

import numpy as np
import pytest

from conftest import write_image_folder
from intq.cli import main

STAGES = {("Net", "float"), ("Net", "weights"), ("Net", "weights+activations"), ("NetWithBias", "float"),
          ("NetWithBias", "weights+bias-float"), ("NetWithBias", "integer+bias")}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"), train_per_class=24, test_per_class=6)


@pytest.fixture(scope="module")
def first_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "study"
    cache = tmp_path_factory.mktemp("cache")
    assert main(["run", "--data", str(image_folder), "--out", str(out), "--cache", str(cache), "--seed", "3"]) == 0
    return out, cache


def test_run_writes_every_output(first_run):
    out, _ = first_run
    names = {path.name for path in out.iterdir()}
    assert {"results.json", "report.html", "report.md", "accuracy.png", "weights_Net.png",
            "activations_NetWithBias.png", "Net-study.npz", "NetWithBias-recommended.npz"} <= names
    assert not [name for name in names if name.startswith(".")]  # no staging or temporary files


def test_results_rows_cover_every_stage_and_preset(first_run):
    results = json.loads((first_run[0] / "results.json").read_text())
    rows = results["rows"]
    assert {(row["model"], row["stage"]) for row in rows} == STAGES
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 100.0
        assert row["preset"] in (None, "study", "recommended")
        assert (row["preset"] is None) == (row["stage"] == "float")
    assert set(results["timings_s"]) == {"data", "train", "calibrate", "evaluate", "report", "total"}
    assert results["training"]["Net"]["cached"] is False
    for model in ("Net", "NetWithBias"):
        assert all(row["differing"] == 0 for preset in results["agreement"][model].values() for row in preset)


def test_integer_models_load_without_pickle(first_run):
    with np.load(first_run[0] / "Net-recommended.npz", allow_pickle=False) as archive:
        assert archive["conv1.weight"].dtype == np.int8
        assert json.loads(archive["__meta__"].tobytes())["metadata"]["preset"] == "recommended"


def test_same_seed_gives_identical_rows_and_the_cache_skips_training(first_run, image_folder, tmp_path):
    out, cache = first_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    fresh = tmp_path / "fresh"
    assert main(["run", "--data", str(image_folder), "--out", str(fresh), "--cache", str(tmp_path / "c"), "--seed", "3"]) == 0
    assert json.loads((fresh / "results.json").read_text())["rows"] == rows
    cached = tmp_path / "cached"
    assert main(["run", "--data", str(image_folder), "--out", str(cached), "--cache", str(cache), "--seed", "3"]) == 0
    results = json.loads((cached / "results.json").read_text())
    assert results["rows"] == rows and results["training"]["Net"]["cached"] is True


def test_missing_data_folder_is_one_clear_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--data", str(tmp_path / "nowhere"), "--out", str(out), "--cache", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "nowhere" in error and "--data" in error
    assert not out.exists() or not any(out.iterdir())


def test_empty_data_folder_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["run", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]) == 2
    assert "empty" in capsys.readouterr().err


def test_unwritable_out_is_named_before_any_work(tmp_path, image_folder, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(["run", "--data", str(image_folder), "--out", str(blocker / "sub"), "--cache", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err
    assert "file.txt" in error and "Traceback" not in error


def test_report_carries_the_tradeoff_table(first_run):
    out, _ = first_run
    results = json.loads((out / "results.json").read_text())
    net = results["tradeoffs"]["Net"]
    assert set(net) == {"float", "study", "recommended"}
    assert net["float"]["macs"] == net["study"]["macs"] == 651_720
    assert net["study"]["arithmetic_uj"] < net["float"]["arithmetic_uj"] / 10
    assert net["recommended"]["throughput_b256"] > 0 and net["float"]["latency_ms_b1"] > 0
    assert "What int8 buys" in (out / "report.md").read_text()
    assert (out / "tradeoffs_Net.png").exists()


def test_sweep_and_run_train_identical_weights_whatever_the_thread_count(tmp_path):
    """Issue 10: `intq sweep` (two threads, in the parent) trained Net to 53.24%, `intq run` (one
    thread per worker) to 54.31%. Both paths now train on the recipe's one thread."""
    import torch

    from intq.cifar.data import CIFAR10_CLASSES, Dataset
    from intq.workflows.pipeline import float_model, trained_model
    from intq.threads import intra_op_threads

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (200,), generator=generator)  # 2 epochs x 50 steps of 4 images
    data = Dataset(pixels, labels, pixels[:8], labels[:8], CIFAR10_CLASSES, "synthetic")
    with intra_op_threads(2):
        _, swept = float_model("Net", data, tmp_path / "sweep-cache")
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    with intra_op_threads(1):
        ran = trained_model("Net", pixels, labels, tmp_path / "run-cache", 0)
    assert not ran.cached
    for (name, a), b in zip(swept.state_dict().items(), ran.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_calib_samples_above_the_training_set_is_refused_and_no_folder_is_left(tmp_path):
    """`intq run --calib-samples` larger than the data used all images silently; now one line, and the
    output folder the run would have created does not exist afterwards."""
    from conftest import write_image_folder
    from hostile import run_cli

    data = write_image_folder(tmp_path / "images", 2, 1)
    result = run_cli(["run", "--data", data, "--cache", tmp_path / "cache", "--out", tmp_path / "out",
                      "--calib-samples", "21"])
    assert result.code == 2 and "--calib-samples 21: the training set has 20 images" in result.err
    assert not (tmp_path / "out").exists()
