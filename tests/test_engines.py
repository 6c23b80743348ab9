"""The same integers on PyTorch's quantized kernels (torch_quantized) and in ONNX Runtime (onnx).

Both requantize with a float multiplier, so a layer may differ from the reference by 1 LSB near a
rounding tie; fbgemm without VNNI also saturates int16 pair sums unless activations have 7 bits."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import Residual, Strided, calibrated, make_pixels
from intq.cli import main
from intq.graph import model_file
from intq.graph.config import RECOMMENDED, STUDY, X86
from intq.graph.convert import convert
from intq.executors.encoding import EngineError, uint8_offset
from intq.executors.onnx_export import export_onnx
from intq.executors.onnx_runtime import OnnxModel, onnx_op_steps
from intq.executors.reference import run_integer
from intq.executors.torch_quantized import TorchQuantizedModel, to_integers, to_quantized
from intq.cifar.models import NetWithBias
from intq.arith.qparams import INT8, QParams
from intq.executors.verify import layer_differences, verify

W3A5 = replace(X86, weights=replace(X86.weights, bits=3), activations=replace(X86.activations, bits=5))
MODELS = {"NetWithBias": NetWithBias, "Strided": Strided, "Residual": Residual}


def integer_model_of(model_name: str, config, count: int = 48):
    torch.manual_seed(0)
    pixels = make_pixels(count)
    graph, stats = calibrated(MODELS[model_name]().eval(), pixels)
    return convert(graph, stats, config), pixels


def test_uint8_encoding_is_lossless_for_a_signed_type():
    qparams = QParams(np.float64(0.5), np.int64(-3), INT8)
    q = torch.arange(-128, 128, dtype=torch.int8)
    encoded = to_quantized(q, qparams)
    assert uint8_offset(qparams) == 128 and encoded.q_zero_point() == 125
    assert torch.equal(encoded.dequantize(), (q.double() + 3).float() * 0.5)
    assert torch.equal(to_integers(encoded, qparams), q)


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (int32 u8 x s8 dot products, no int16 pair sums to saturate)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def assert_within_one_lsb(model, op_steps, pixels, batch=20):
    """Every op, fed the reference's inputs, within 1 LSB of the reference on at most 0.5% of its values."""
    for name, row in layer_differences(model, op_steps, pixels, batch=batch).items():
        assert row["max_lsb"] <= 1 and row["differing"] <= 0.005 * row["values"], (name, row)


@pytest.mark.parametrize("config", [X86, W3A5], ids=["x86", "w3a5"])
@pytest.mark.parametrize("model_name", MODELS)
def test_torch_quantized_layers_are_within_one_lsb(model_name, config):
    model, pixels = integer_model_of(model_name, config)
    engine = TorchQuantizedModel(model)
    assert engine.saturating_layers == []  # 7 or 5-bit activations: pair sums fit int16
    assert_within_one_lsb(model, engine.op_steps(), pixels)
    output = engine(pixels)
    assert output.dtype == run_integer(model, pixels).dtype


@pytest.mark.parametrize("model_name", MODELS)
def test_torch_quantized_study_preset_may_saturate_every_layer(model_name):
    """The study preset's signed int8 activations use all 8 bits: encoded as uint8 they reach 255, so
    2 * 255 * max|q_w| > 32767 on every layer (max|q_w| >= 65), and every layer is named. The engine
    still runs the model; with VNNI (no int16 pair sums) its layers stay within 1 LSB."""
    model, pixels = integer_model_of(model_name, STUDY)
    engine = TorchQuantizedModel(model)
    layers = model.quantized_layers()
    assert all(2 * 255 * int(np.abs(np.asarray(op.weight, np.int64)).max()) > 32767 for op in layers)
    assert engine.saturating_layers == [op.name for op in layers]
    assert engine.saturation_note().startswith(f"{len(layers)} layers ({layers[0].name}, ")
    output, reference = engine(pixels), run_integer(model, pixels)
    assert output.shape == reference.shape and output.dtype == reference.dtype
    if cpu_has_vnni():
        assert_within_one_lsb(model, engine.op_steps(), pixels)


def test_torch_quantized_names_layers_that_may_saturate():
    model, _ = integer_model_of("NetWithBias", RECOMMENDED)
    assert TorchQuantizedModel(model).saturating_layers == ["conv2", "fc1", "fc2"]  # conv1 reads the folded input, exactly
    model, _ = integer_model_of("NetWithBias", X86)
    assert TorchQuantizedModel(model).saturating_layers == []


@pytest.mark.parametrize("config", [STUDY, RECOMMENDED, W3A5], ids=["study", "recommended", "w3a5"])
@pytest.mark.parametrize("model_name", MODELS)
def test_onnx_runtime_matches_the_reference(model_name, config):
    model, pixels = integer_model_of(model_name, config)
    reference = run_integer(model, pixels).to(torch.int64)
    output = OnnxModel(model, pixels[:1])(pixels).to(torch.int64)
    assert output.shape == reference.shape
    assert float((output != reference).double().mean()) <= 0.01
    assert torch.equal(output.argmax(dim=1), reference.argmax(dim=1))
    assert_within_one_lsb(model, onnx_op_steps(model, pixels[:1]), pixels)


def test_onnx_model_uses_standard_quantized_operators():
    model, pixels = integer_model_of("Residual", RECOMMENDED)
    proto = onnx.load_from_string(export_onnx(model, pixels[:1]))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QLinearConv", "QLinearAdd", "ReduceSum"} <= ops
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    folded_first = next(node for node in proto.graph.node if node.name.startswith("stem/"))
    assert folded_first.name == "stem/centred"  # the folded input's first layer runs as exact integers


def test_verify_reports_every_executor():
    model, pixels = integer_model_of("NetWithBias", X86, 40)
    rows = verify(model, pixels, ("torch_quantized", "onnx"))
    assert set(rows) == {"torch_quantized", "onnx"}
    for row in rows.values():
        assert row["values"] == 400 and row["top1_differing_share"] == 0.0
    for name in rows:
        assert "each op fed the reference's inputs" in rows[name]["notes"][-1]
    saturating = verify(convert(*calibrated(NetWithBias().eval(), pixels), RECOMMENDED), pixels, ("torch_quantized",))
    assert "conv2, fc1, fc2" in saturating["torch_quantized"]["notes"][1]


def test_export_onnx_command(tmp_path, capsys):
    model, pixels = integer_model_of("Strided", X86)
    model_file.save(model, tmp_path / "m.npz")
    assert main(["export-onnx", str(tmp_path / "m.npz"), "--out", str(tmp_path / "onnx" / "m.onnx")]) == 0
    assert "m.onnx" in capsys.readouterr().out
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "m.onnx"), providers=["CPUExecutionProvider"])
    (output,) = session.run(["output"], {"pixels": pixels[:3].numpy()})
    assert output.shape == (3, 5)
    assert main(["export-onnx", str(tmp_path / "m.npz"), "--out", str(tmp_path / "exact.onnx"), "--exact"]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "exact.onnx"), providers=["CPUExecutionProvider"])
    (exact,) = session.run(["output"], {"pixels": pixels[:3].numpy()})
    assert np.array_equal(exact, run_integer(model, pixels[:3]).numpy())
    assert main(["export-onnx", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_engine_error_names_the_layer():
    model, _ = integer_model_of("Strided", X86)
    model.layers[0].accumulator_bound = 2**25  # the folded first layer runs as an exact float32 Conv
    with pytest.raises(EngineError, match="onnx: layer conv1: accumulator bound 33554432"):
        export_onnx(model, make_pixels(1))


@pytest.mark.parametrize("engine", ["x86", "fbgemm"])
def test_torch_quantized_other_engines_agree_with_the_reference(engine):
    model, pixels = integer_model_of("Residual", X86)
    engine_model = TorchQuantizedModel(model, engine)
    assert_within_one_lsb(model, engine_model.op_steps(), pixels, batch=24)


def test_torch_quantized_refuses_an_unknown_engine():
    model, _ = integer_model_of("Strided", X86)
    with pytest.raises(EngineError, match="engine 'tpu' is not in this PyTorch build"):
        TorchQuantizedModel(model, "tpu")


@pytest.mark.parametrize("config", [STUDY, RECOMMENDED, W3A5], ids=["study", "recommended", "w3a5"])
@pytest.mark.parametrize("model_name", MODELS)
def test_exact_onnx_model_is_bit_exact(model_name, config):
    model, pixels = integer_model_of(model_name, config)
    exact = OnnxModel(model, pixels[:1], exact=True)
    assert torch.equal(exact(pixels), run_integer(model, pixels))
    ops = {node.op_type for node in onnx.load_from_string(exact.contents).graph.node}
    assert "QLinearConv" not in ops and "QLinearAdd" not in ops


def test_exact_onnx_add_of_a_value_with_itself():
    class Doubling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 30 * 30, 3)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.fc(torch.flatten(y + y, 1))

    torch.manual_seed(0)
    pixels = make_pixels(8)
    model = convert(*calibrated(Doubling().eval(), pixels), X86)
    assert torch.equal(OnnxModel(model, pixels[:1], exact=True)(pixels), run_integer(model, pixels))


def test_verify_command_prints_one_line_per_executor(tmp_path, capsys):
    from conftest import write_image_folder

    model, _ = integer_model_of("Strided", X86)
    model_file.save(model, tmp_path / "m.npz")
    data = write_image_folder(tmp_path / "data", train_per_class=1, test_per_class=3)
    common = ["--data", str(data), "--cache", str(tmp_path / "cache")]
    assert main(["verify", str(tmp_path / "m.npz"), "--executors", "onnx_exact", "torch_quantized", *common]) == 0
    out = capsys.readouterr().out
    assert "onnx_exact: 150 output values on 30 images; differing 0.0000%, max 0 LSB" in out
    assert "torch_quantized:" in out and "each op fed the reference's inputs" in out and "engine onednn" in out
    assert main(["verify", str(tmp_path / "m.npz"), "--executors", "torch_quantized", "--engine", "x86", *common]) == 0
    out = capsys.readouterr().out
    assert "note: engine x86" in out and "differing 0.0000%" in out
    assert main(["verify", str(tmp_path / "m.npz"), "--executors", "tpu", *common]) == 2
    assert "unknown executor 'tpu'" in capsys.readouterr().err


def test_exact_onnx_keeps_the_integer_requantizer_where_ties_are_possible():
    """M0 = 2^30 makes rounding ties common; eq. 24 refuses such layers, and the exact ONNX graph
    then uses the int64 requantizer (eq. 21): still the reference's integers bit for bit."""
    model, pixels = integer_model_of("Residual", X86)
    assert "Floor" in _op_types(export_onnx(model, pixels[:1], exact=True))  # every layer passes eq. 24 here
    for layer in model.quantized_layers():
        layer.mantissa = np.full_like(layer.mantissa, 2**30)
    ops = _op_types(export_onnx(model, pixels[:1], exact=True))
    assert "Floor" not in ops and "Div" in ops
    assert torch.equal(OnnxModel(model, pixels[:1], exact=True)(pixels), run_integer(model, pixels))


def _op_types(contents: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_from_string(contents).graph.node}
