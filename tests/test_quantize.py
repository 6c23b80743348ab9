"""`intq train`, `intq quantize`, `intq eval` on small synthetic data, and ResNet-20 integer-only."""
import pytest
import torch

from conftest import calibrated, make_pixels, write_image_folder
from intq.cli import main
from intq.graph.config import RECOMMENDED
from intq.graph.convert import convert
from intq.executors.c_export import export_c
from intq.cifar.models import ResNet20
from intq.executors.simulate import layer_agreement


def test_train_quantize_eval_round_trip(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", train_per_class=13, test_per_class=3)
    common = ["--data", str(data), "--cache", str(tmp_path / "cache")]
    checkpoint = tmp_path / "net.npz"
    assert main(["train", "--arch", "Net", "--epochs", "1", "--batch-size", "16", "--out", str(checkpoint), *common]) == 0
    assert main(["quantize", str(checkpoint), "--arch", "Net", "--calib-samples", "50", "--out",
                 str(tmp_path / "net-int.npz"), *common]) == 0
    quantized = capsys.readouterr().out
    assert "integer-only" in quantized
    assert main(["eval", str(tmp_path / "net-int.npz"), *common]) == 0
    reported = capsys.readouterr().out.split("integer-only test accuracy ")[1].split("%")[0]
    assert f"integer-only {reported}%" in quantized  # eval reproduces quantize's measurement


def test_checkpoint_of_another_architecture_is_named(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", train_per_class=2, test_per_class=1)
    checkpoint = tmp_path / "net.npz"
    common = ["--data", str(data), "--cache", str(tmp_path / "cache")]
    assert main(["train", "--arch", "Net", "--epochs", "1", "--batch-size", "8", "--out", str(checkpoint), *common]) == 0
    assert main(["quantize", str(checkpoint), "--arch", "resnet20", *common]) == 2
    assert "net.npz" in capsys.readouterr().err


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = ResNet20()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_resnet20_runs_integer_only_and_matches_the_simulation(resnet):
    pixels = make_pixels(8)
    graph, stats = calibrated(resnet, pixels)
    model = convert(graph, stats, RECOMMENDED)
    assert sum(type(op).__name__ == "QAdd" for op in model.layers) == 9
    rows = layer_agreement(model, pixels)
    assert sum(r["differing"] for r in rows) <= 0.0001 * sum(r["values"] for r in rows)
    assert max(r["max_lsb"] for r in rows) <= 1


def test_resnet20_c_export_is_bit_exact(tmp_path, resnet):
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    pixels = make_pixels(4)
    graph, stats = calibrated(resnet, pixels)
    export_c(convert(graph, stats, RECOMMENDED), pixels[:1], tmp_path)
    subprocess.run([compiler, "-std=c99", "-O2", "main.c", "intq_runtime.c", "-o", "check"], cwd=tmp_path, check=True)
    result = subprocess.run(["./check"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("OK 1 images"), result.stdout


def test_quantize_with_a_sweep_cell_names_the_file_after_it(tmp_path, capsys):
    from conftest import write_image_folder
    from intq.cli import main
    from intq.cifar.models import ARCHITECTURES
    from intq.cifar.train import save_weights

    torch.manual_seed(0)
    data = write_image_folder(tmp_path / "data", train_per_class=3, test_per_class=2)
    checkpoint = tmp_path / "net.npz"
    save_weights(ARCHITECTURES["Net"]().eval(), [(1, 0, 1.0)], checkpoint)
    common = ["--data", str(data), "--cache", str(tmp_path / "cache"), "--calib-samples", "20"]
    assert main(["quantize", str(checkpoint), "--arch", "Net", "--method", "percentile(99.9)", "--wbits", "4",
                 "--abits", "6", *common]) == 0
    written = tmp_path / "net-percentile(99.9)-w4a6-per-channel-int.npz"
    assert written.exists() and "integer-only" in capsys.readouterr().out
    from intq.graph import model_file

    model = model_file.load(written)
    assert model.quantized_layers()[1].weight_qparams.dtype.bits == 4
    assert main(["quantize", str(checkpoint), "--arch", "Net", "--method", "mse", "--wbits", "9", *common]) == 2
