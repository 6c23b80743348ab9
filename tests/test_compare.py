"""`intq compare`: the same float model through torch.ao's PTQ and through intq."""
import torch

from conftest import calibrated, make_pixels, write_image_folder
from intq.cli import main
from intq.workflows.compare import compare, reshape_views, torch_ao_quantize
from intq.graph.config import RECOMMENDED
from intq.graph.convert import convert
from intq.cifar.data import Dataset
from intq.cifar.models import Net


def test_view_becomes_reshape_and_computes_the_same():
    torch.manual_seed(0)
    model = Net().eval()
    traced = reshape_views(model)
    assert "reshape" in traced.code and ".view(" not in traced.code
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(traced(x), model(x))


def test_compare_rows_cover_float_torch_ao_and_intq():
    torch.manual_seed(0)
    model = Net().eval()
    pixels = make_pixels(64)
    labels = torch.randint(0, 10, (64,))
    data = Dataset(pixels, labels, pixels, labels, tuple(f"c{i}" for i in range(10)), "synthetic")
    graph, stats = calibrated(model, pixels)
    rows = compare(model, convert(graph, stats, RECOMMENDED), 1000, data, pixels)
    assert [row["executor"] for row in rows] == ["PyTorch float32", "torch.ao int8 (x86, FX)", "intq reference (integer)",
                                                 "intq on PyTorch kernels (onednn)", "intq on ONNX Runtime"]
    assert rows[2]["top1_agreement_with_intq"] == 100.0
    assert rows[4]["top1_agreement_with_intq"] >= 98.0
    assert rows[1]["bytes"] < rows[0]["bytes"]
    assert all(row["throughput_b256"] > 0 and row["latency_ms_b1"] > 0 for row in rows)


def test_torch_ao_model_runs_on_uint8_batches():
    torch.manual_seed(0)
    quantized = torch_ao_quantize(Net().eval(), make_pixels(16))
    assert quantized((make_pixels(4).float() / 255 - 0.5) / 0.5).shape == (4, 10)


def test_compare_command(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", train_per_class=6, test_per_class=2)
    assert main(["compare", "--data", str(data), "--cache", str(tmp_path / "c"), "--calib-samples", "30"]) == 0
    out = capsys.readouterr().out
    assert "torch.ao int8" in out and "intq reference" in out and "intq on ONNX Runtime" in out
