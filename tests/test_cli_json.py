"""--json FILE on the commands that print figures: the same numbers, as JSON, written atomically;
an unwritable FILE is refused before any work."""
import json

import torch

from conftest import calibrated, make_pixels, write_image_folder
from hostile import run_cli
from intq.graph.config import RECOMMENDED
from intq.graph.convert import convert
from intq.graph.model_file import save
from intq.cifar.models import NetWithBias


def _model_and_data(tmp_path):
    torch.manual_seed(0)
    graph, stats = calibrated(NetWithBias().eval(), make_pixels(8))
    save(convert(graph, stats, RECOMMENDED), tmp_path / "m.npz")
    return tmp_path / "m.npz", write_image_folder(tmp_path / "images", 1, 3)


def test_eval_and_verify_write_their_figures_as_json(tmp_path):
    model, data = _model_and_data(tmp_path)
    common = ["--data", data, "--cache", tmp_path / "cache"]
    result = run_cli(["eval", model, *common, "--json", tmp_path / "eval.json"])
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert result.code == 0 and figures["test_images"] == 30
    assert f"integer-only test accuracy {figures['integer_accuracy']:.2f}%" in result.out
    result = run_cli(["verify", model, *common, "--executors", "onnx_exact", "--json", tmp_path / "verify.json"])
    figures = json.loads((tmp_path / "verify.json").read_text())
    assert result.code == 0 and figures["images"] == 30
    assert figures["executors"]["onnx_exact"]["differing_share"] == 0.0 and figures["executors"]["onnx_exact"]["values"] == 300


def test_an_unwritable_json_target_is_refused_before_any_work(tmp_path):
    model, data = _model_and_data(tmp_path)
    (tmp_path / "taken").mkdir()
    result = run_cli(["eval", model, "--data", data, "--cache", tmp_path / "cache", "--json", tmp_path / "taken"])
    assert result.code == 2 and "taken is a folder; expected a file" in result.err
    assert not (tmp_path / "cache").exists()
