"""The one pipeline: its steps give what the five steps written out give, byte for byte, and every
workflow's integer model is the pipeline's for the same inputs."""
import ast
from pathlib import Path

import pytest
import torch

from intq.graph import model_file

from intq.workflows import pipeline
from intq.graph.capture import capture
from intq.graph.config import RECOMMENDED, STUDY
from intq.graph.convert import collect_statistics, convert
from intq.cifar.data import CIFAR10_CLASSES, Dataset, normalize
from intq.cifar.models import Net, NetWithBias
from intq.cifar.train import save_weights

WORKFLOWS = ("pipeline", "study", "sweep", "sensitivity", "inspect", "checkpoints", "compare", "peer", "explain",
             "costs")
REPORTS = {"intq.report.study_report", "intq.report.sweep_report", "intq.report.sensitivity_report", "intq.report.inspect_report",
           "intq.report.tradeoffs_report", "intq.report.document", "intq.report.plots"}


@pytest.fixture(scope="module")
def data() -> Dataset:
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (60,), generator=generator)
    return Dataset(pixels[:48], labels[:48], pixels[48:], labels[48:], CIFAR10_CLASSES, "synthetic")


@pytest.fixture(scope="module", params=[Net, NetWithBias])
def network(request) -> torch.nn.Module:
    torch.manual_seed(1)
    return request.param().eval()


def written_out(model, pixels, example, config, metadata=None):
    """The five steps as every command wrote them before the pipeline (the oracle)."""
    graph = capture(model, normalize(example[:2]))
    stats = collect_statistics(graph, [normalize(pixels[start : start + 1000]) for start in range(0, len(pixels), 1000)])
    return convert(graph, stats, config, metadata)


@pytest.mark.parametrize("config", [STUDY, RECOMMENDED], ids=lambda c: c.name)
def test_quantize_model_is_the_five_steps_byte_for_byte(network, data, config):
    pixels = pipeline.calibration_images(data.train_images, 30, seed=0)
    got = pipeline.quantize_model(network, pixels, config, metadata={"model": "x"}, example=data.train_images)
    want = written_out(network, pixels, data.train_images, config, {"model": "x"})
    assert model_file.to_bytes(got.integer_model) == model_file.to_bytes(want)


def test_one_calibration_converts_like_a_fresh_pipeline_under_each_config(network, data):
    calibration = pipeline.calibrated(network, data.train_images)
    for config in (STUDY, RECOMMENDED):
        fresh = pipeline.quantize_model(network, data.train_images, config).integer_model
        assert model_file.to_bytes(calibration.integer_model(config)) == model_file.to_bytes(fresh)


def test_calibration_images_are_a_seeded_subset_or_all_in_order(data):
    images = data.train_images
    assert torch.equal(pipeline.calibration_images(images, None, 0), images)
    assert torch.equal(pipeline.calibration_images(images, 500, 0), images)
    picked = pipeline.calibration_images(images, 10, 7)
    assert len(picked) == 10 and torch.equal(picked, pipeline.calibration_images(images, 10, 7))
    assert not torch.equal(picked, images[:10])


def test_quantize_command_saves_the_pipelines_model(tmp_path, network, data):
    from intq.workflows.checkpoints import quantize_checkpoint

    result = quantize_checkpoint(network, data, RECOMMENDED, 20, 5, tmp_path / "q.npz", {"model": "Net"})
    pixels = pipeline.calibration_images(data.train_images, 20, 5)
    want = pipeline.quantize_model(network, pixels, RECOMMENDED, metadata={"model": "Net"}).integer_model
    assert (tmp_path / "q.npz").read_bytes() == model_file.to_bytes(want)
    assert result["bytes"] == len(model_file.to_bytes(want))


def test_sensitivity_evaluator_converts_the_pipelines_calibration(network, data):
    from intq.workflows.sensitivity import Evaluator
    from intq.workflows.sweep import SweepCell, cell_config

    calibration = pipeline.calibrated(network, data.train_images[:20])
    evaluator = Evaluator(calibration, "mse", 8, data.test_images, data.test_labels)
    bits = {layer: 4 if layer == "conv1" else 8 for layer in evaluator.layers}
    config = cell_config(SweepCell("mse", "per-channel", 8, 8), tuple(bits.items()))
    want = written_out(network, data.train_images[:20], data.train_images[:20], config)
    assert model_file.to_bytes(evaluator.model(bits)) == model_file.to_bytes(want)


def test_float_model_reads_a_checkpoint_named_by_its_stem(tmp_path, data):
    torch.manual_seed(2)
    saved = Net()
    save_weights(saved, [], tmp_path / "mine.npz")
    name, loaded = pipeline.float_model(str(tmp_path / "mine.npz"), data, tmp_path / "cache", arch="Net")
    assert name == "mine"
    for (key, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key


def test_trained_model_comes_from_the_cache_the_second_time(tmp_path, data):
    lines = []
    first = pipeline.trained_model("Net", data.train_images, data.train_labels, tmp_path, 0, log=lines.append)
    second = pipeline.trained_model("Net", data.train_images, data.train_labels, tmp_path, 0, log=lines.append)
    assert not first.cached and second.cached
    assert lines[-1].startswith("trained weights loaded from cache")
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("module", WORKFLOWS)
def test_no_workflow_imports_a_report_module(module):
    """Workflows return results; cli hands them the renderer (issue 11, part 1)."""
    path = Path(pipeline.__file__).with_name(f"{module}.py")
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert not imported & REPORTS
