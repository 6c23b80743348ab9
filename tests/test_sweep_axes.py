"""`intq sweep`'s PTQ-method axes (rounding, bias correction, equalization, fine-tuning): every
combination a row, the sweep's cells the same integers as `intq quantize` of the cell, bad values
refused in one line, and results written before the axes still rendered."""
import json

import numpy as np
import pytest

from conftest import write_image_folder
from intq.cli import main
from intq.graph import model_file
from intq.workflows.pipeline import calibration_images
from intq.workflows.subject import load_data, load_float_model
from intq.workflows.sweep import SweepCell, SweepOptions, cell_inputs, cell_model, check_options

GRID = ["--methods", "mse", "--wbits", "3", "--abits", "8", "--calib-samples", "60", "--rounding", "nearest,adaround",
        "--rounding-iters", "5", "--bias-correction", "off,on", "--equalization", "off", "on", "--finetune-epochs", "0,1"]
CELL = ["--method", "mse", "--wbits", "3", "--abits", "8", "--calib-samples", "60"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    data = write_image_folder(tmp_path_factory.mktemp("data"), train_per_class=12, test_per_class=4)
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("sweep")
    assert main(["sweep", "--data", str(data), "--cache", str(cache), "--out", str(out), *GRID]) == 0
    return data, cache, out, json.loads((out / "sweep.json").read_text())


def _row(results, rounding="nearest", bias_correction=False, equalization=False, finetune_epochs=0):
    return next(r for r in results["rows"] if (r["rounding"], r["bias_correction"], r["equalization"],
                                               r["finetune_epochs"]) == (rounding, bias_correction, equalization,
                                                                         finetune_epochs))


def _quantized(swept, tmp_path, *flags):
    """`intq quantize --model Net` of the sweep's cell with `flags`: (its figures, its integer model)."""
    data, cache, _, _ = swept
    out, figures = tmp_path / "q.npz", tmp_path / "q.json"
    assert main(["quantize", "--model", "Net", "--data", str(data), "--cache", str(cache), "--out", str(out),
                 "--json", str(figures), *CELL, *flags]) == 0
    return json.loads(figures.read_text()), model_file.load(out)


def _cell_models(swept, *cells):
    """The sweep's own cell_model of each cell, from the sweep's calibration inputs (cell_inputs)."""
    data_dir, cache, out, _ = swept
    options = SweepOptions("Net", str(data_dir), out, cache, calib_samples=60, rounding_iters=5)
    data = load_data(str(data_dir), cache)
    _, model = load_float_model("Net", data, cache)
    inputs = cell_inputs(options, list(cells), model, data, calibration_images(data.train_images, 60, 0))
    return [cell_model(cell, inputs)[0] for cell in cells]


def _same_integers(a, b) -> bool:
    return all(np.array_equal(x.weight, y.weight) and np.array_equal(x.bias, y.bias)
               for x, y in zip(a.quantized_layers(), b.quantized_layers(), strict=True))


def test_every_combination_is_a_row_with_its_axes_and_seconds(swept):
    _, _, out, results = swept
    combos = {(r["rounding"], r["bias_correction"], r["equalization"], r["finetune_epochs"]) for r in results["rows"]}
    plain = {(r, bc, eq, 0) for r in ("nearest", "adaround") for bc in (False, True) for eq in (False, True)}
    # a fine-tuned cell learns its weights and biases itself: nearest, no bias correction, once per equalization
    assert combos == plain | {("nearest", False, eq, 1) for eq in (False, True)}
    assert len(results["rows"]) == len(combos) == 10
    for row in results["rows"]:
        assert 0 <= row["accuracy"] <= 100 and row["method_seconds"] >= 0
    assert results["config"]["rounding_iterations"] == 5
    report = (out / "sweep.md").read_text()
    assert "What each method buys" in report and "adaround + bias correction + equalization" in report
    assert "1 epoch fine-tuned" in report and (out / "sweep.png").stat().st_size > 0


def test_learned_rounding_cell_is_intq_quantize_of_the_cell_and_differs_from_nearest(swept, tmp_path):
    figures, quantized = _quantized(swept, tmp_path, "--rounding", "adaround", "--rounding-iters", "5",
                                    "--bias-correction")
    assert figures["integer_accuracy"] == _row(swept[3], "adaround", bias_correction=True)["accuracy"]
    learned, nearest = _cell_models(swept, SweepCell("mse", "per-channel", 3, 8, "adaround", True),
                                    SweepCell("mse", "per-channel", 3, 8, "nearest", True))
    assert _same_integers(learned, quantized)
    assert not _same_integers(learned, nearest)


def test_equalization_cell_is_intq_quantize_equalization_and_bias_correction_changes_the_biases(swept, tmp_path):
    figures, quantized = _quantized(swept, tmp_path, "--equalization")
    assert figures["integer_accuracy"] == _row(swept[3], equalization=True)["accuracy"]
    equalized, corrected, plain = _cell_models(swept, SweepCell("mse", "per-channel", 3, 8, equalization=True),
                                               SweepCell("mse", "per-channel", 3, 8, bias_correction=True),
                                               SweepCell("mse", "per-channel", 3, 8))
    assert _same_integers(equalized, quantized)
    assert not _same_integers(equalized, plain)
    assert all(np.array_equal(a.weight, b.weight) for a, b in zip(corrected.quantized_layers(), plain.quantized_layers()))
    assert any(not np.array_equal(a.bias, b.bias) for a, b in zip(corrected.quantized_layers(), plain.quantized_layers()))


def test_fine_tuned_cell_is_intq_finetune_of_the_cell(swept, tmp_path):
    data, cache, _, results = swept
    out, figures = tmp_path / "ft.npz", tmp_path / "ft.json"
    assert main(["finetune", "--model", "Net", "--data", str(data), "--cache", str(cache), "--out", str(out),
                 "--json", str(figures), *CELL, "--epochs", "1"]) == 0
    assert json.loads(figures.read_text())["after_accuracy"] == _row(results, finetune_epochs=1)["accuracy"]
    tuned, plain = _cell_models(swept, SweepCell("mse", "per-channel", 3, 8, finetune_epochs=1),
                                SweepCell("mse", "per-channel", 3, 8))
    assert _same_integers(tuned, model_file.load(out))
    assert not _same_integers(tuned, plain)


@pytest.mark.parametrize("flags, named", [
    (["--rounding", "foo"], "--rounding foo: choose from nearest, adaround, brecq"),
    (["--bias-correction", "maybe"], "--bias-correction maybe: choose off or on"),
    (["--equalization", "off,yes"], "--equalization yes: choose off or on"),
    (["--finetune-epochs", "0,-1"], "--finetune-epochs -1:"),
    (["--finetune-epochs", "x"], "--finetune-epochs takes numbers"),
    (["--rounding-iters", "5"], "--rounding-iters: only with a learned --rounding"),
    (["--rounding", "brecq", "--rounding-iters", "0"], "--rounding-iters must be at least 1, got 0"),
    (["--finetune-lr", "0.1"], "--finetune-lr: only with --finetune-epochs above 0"),
    (["--rounding", "brecq", "--finetune-epochs", "2"], "--rounding brecq: no cell uses it"),
    (["--bias-correction", "off,on", "--finetune-epochs", "1"], "--bias-correction on: no cell uses it"),
    (["--finetune-epochs", "1", "--finetune-lr", "-1"], "--finetune-lr: fine-tuning lr must be"),
    (["--finetune-distill", "0.5"], "--finetune-distill: only with --finetune-epochs above 0"),
    (["--finetune-epochs", "1", "--finetune-distill", "2"], "--finetune-distill: fine-tuning distill must be"),
    (["--finetune-optimizer", "adam"], "--finetune-optimizer: only with --finetune-epochs above 0"),
    (["--finetune-epochs", "1", "--finetune-optimizer", "rmsprop"], "--finetune-optimizer: fine-tuning optimizer must be one of sgd, adam, got 'rmsprop'"),
    (["--layer-abits", "conv1=9"], "--layer-abits: bit widths must be 2..8, got conv1=9"),
    (["--layer-abits", "fc2=8,fc2=4"], "--layer-abits: layer fc2 named more than once"),
    (["--layer-abits", "view=8"], "--layer-abits: per-layer activation bits name unknown layers view"),
])
def test_bad_axis_values_are_refused_in_one_line(tmp_path, capsys, flags, named):
    assert main(["sweep", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_fine_tuned_cells_take_nearest_rounding_and_no_bias_correction_once(tmp_path):
    options = SweepOptions("Net", None, tmp_path, tmp_path, methods=("mse",), wbits=(4,), abits=(8,),
                           roundings=("brecq",), bias_corrections=(True,), finetune_epochs=(0, 2))
    assert check_options(options) == [SweepCell("mse", "per-channel", 4, 8, "brecq", True),
                                      SweepCell("mse", "per-channel", 4, 8, finetune_epochs=2)]


def test_results_written_before_the_axes_still_render(swept, tmp_path):
    from intq.report.sweep_report import write_sweep_report

    _, _, _, results = swept
    old_fields = ("method", "granularity", "wbits", "abits", "accuracy", "drop", "weight_bytes", "worst_accumulator")
    old = {**results, "rows": [{key: row[key] for key in old_fields} for row in results["rows"]
                               if row["rounding"] == "nearest" and not row["bias_correction"]
                               and not row["equalization"] and not row["finetune_epochs"]]}
    write_sweep_report(old, tmp_path)
    report = (tmp_path / "sweep.md").read_text()
    assert "mse (per-channel)" in report and "W3A8" in report and "What each method buys" not in report


def test_layer_abits_distill_and_optimizer_reach_the_fine_tuned_cell_as_in_intq_finetune(swept, tmp_path):
    """sweep --layer-abits fc2=4 --finetune-distill 0.5 --finetune-optimizer adam (an A8 cell): the cell's
    model is intq finetune's with the same flags (fc3 reads 4-bit integers, fc2 8-bit ones), and another
    than the cell without them."""
    data_dir, cache, out, _ = swept
    model_out = tmp_path / "ft.npz"
    assert main(["finetune", "--model", "Net", "--data", str(data_dir), "--cache", str(cache), "--out", str(model_out),
                 *CELL, "--epochs", "1", "--layer-abits", "fc2=4", "--distill", "0.5", "--optimizer", "adam"]) == 0
    options = SweepOptions("Net", str(data_dir), out, cache, calib_samples=60, layer_abits=(("fc2", 4),),
                           finetune_distill=0.5, finetune_optimizer="adam")
    data = load_data(str(data_dir), cache)
    _, model = load_float_model("Net", data, cache)
    cell = SweepCell("mse", "per-channel", 3, 8, finetune_epochs=1)
    inputs = cell_inputs(options, [cell], model, data, calibration_images(data.train_images, 60, 0))
    tuned = cell_model(cell, inputs)[0]
    assert _same_integers(tuned, model_file.load(model_out))
    assert tuned.layer("fc3").input_qparams.dtype.bits == 4 and tuned.layer("fc2").input_qparams.dtype.bits == 8
    plain = _cell_models(swept, cell)[0]
    assert not _same_integers(tuned, plain)
