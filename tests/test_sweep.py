"""`intq sweep` on small synthetic data: every cell evaluated, files written, bad options named."""
import json

import pytest

from conftest import write_image_folder
from intq.cli import main
from intq.workflows.sweep import SweepCell, cell_config


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory):
    data = write_image_folder(tmp_path_factory.mktemp("data"), train_per_class=12, test_per_class=4)
    out = tmp_path_factory.mktemp("sweep")
    argv = ["sweep", "--data", str(data), "--out", str(out), "--cache", str(tmp_path_factory.mktemp("cache")),
            "--methods", "minmax,mse", "entropy", "--wbits", "8", "2", "--abits", "8,4", "--calib-samples", "60"]
    assert main(argv) == 0
    return out


def test_every_cell_is_a_row(sweep_out):
    results = json.loads((sweep_out / "sweep.json").read_text())
    cells = {(r["method"], r["granularity"], r["wbits"], r["abits"]) for r in results["rows"]}
    assert cells == {(m, "per-channel", w, a) for m in ("minmax", "mse", "entropy") for w in (8, 2) for a in (8, 4)}
    for row in results["rows"]:
        assert 0 <= row["accuracy"] <= 100
        assert row["drop"] == pytest.approx(results["float_accuracy"] - row["accuracy"])
        assert row["worst_accumulator"] < 2**31
        assert row["weight_bytes"] == pytest.approx(61_770 * row["wbits"] / 8)
    assert results["config"]["calibration_images"] == 60


def test_report_files_are_written(sweep_out):
    assert {"sweep.json", "sweep.html", "sweep.md", "sweep.png"} <= {p.name for p in sweep_out.iterdir()}
    assert "W2A4" in (sweep_out / "sweep.md").read_text()


def test_cell_config_applies_the_method_to_weights_and_activations():
    config = cell_config(SweepCell("percentile(99.9)", "per-tensor", 4, 6))
    assert str(config.weights.method) == "percentile(99.9)" and not config.weights.per_channel
    assert config.weights.bits == 4 and config.activations.bits == 6
    assert str(cell_config(SweepCell("entropy", "per-channel", 8, 8)).weights.method) == "mse"


@pytest.mark.parametrize("option, value, named", [("--wbits", "9", "--wbits"), ("--methods", "kl", "kl"),
                                                  ("--granularity", "per-row", "--granularity")])
def test_bad_options_are_named(tmp_path, capsys, option, value, named):
    argv = ["sweep", "--data", str(tmp_path), "--out", str(tmp_path / "o"), option, value]
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_sweep_takes_a_checkpoint(tmp_path):
    data = write_image_folder(tmp_path / "data", train_per_class=8, test_per_class=2)
    common = ["--data", str(data), "--cache", str(tmp_path / "cache")]
    checkpoint = tmp_path / "mine.npz"
    assert main(["train", "--arch", "Net", "--epochs", "1", "--batch-size", "16", "--out", str(checkpoint), *common]) == 0
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(checkpoint), "--arch", "Net", "--methods", "mse", "--wbits", "4",
                 "--abits", "8", "--calib-samples", "40", "--out", str(out), *common]) == 0
    results = json.loads((out / "sweep.json").read_text())
    assert results["model"] == "mine" and len(results["rows"]) == 1


def test_checked_count_refuses_what_it_cannot_honour_and_defaults_to_what_there_is():
    from intq.workflows.sweep import SweepError, checked_count

    assert checked_count("--images", None, 20, "test images") == 20
    assert checked_count("--calib-samples", None, 40, "training images", 10_000) == 40
    assert checked_count("--calib-samples", 40, 40, "training images") == 40
    with pytest.raises(SweepError, match="--calib-samples must be at least 1, got -5"):
        checked_count("--calib-samples", -5, 40, "training images")
    with pytest.raises(SweepError, match="--images 21: there are only 20 test images"):
        checked_count("--images", 21, 20, "test images")


def test_failed_cells_summarises_the_errors():
    from intq.workflows.sweep import failed_cells

    ok = {"method": "mse", "granularity": "per-channel", "wbits": 8, "abits": 8, "accuracy": 50.0}
    bad = {**ok, "wbits": 2, "accuracy": None, "error": "overflow"}
    assert failed_cells([ok]) is None
    assert failed_cells([ok, bad]) == "1 of 2 cells failed; first mse per-channel W2A8: overflow"
