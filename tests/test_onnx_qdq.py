"""The QDQ ONNX export (executors/onnx_qdq.py, `intq export-onnx --format qdq`, the `onnx_qdq` executor):
ONNX Runtime runs it within a few LSB of the reference with the same top-1, its QuantizeLinear /
DequantizeLinear nodes carry intq's own scales and zero points, and ONNX Runtime fuses its node units
into QLinear kernels."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from conftest import Residual
from intq.arith.qparams import IntType
from intq.cifar.models import Net
from intq.cli import main
from intq.executors.encoding import EngineError
from intq.executors.onnx_qdq import FUSED_OPS, QdqModel, container, export_qdq, float_node_units, fusion_note
from intq.executors.reference import run_integer
from intq.executors.verify import verify
from intq.graph.config import STUDY, X86
from intq.graph.integer_model import QLayer
from intq.graph.model_file import save
from test_channel_gather import Shuffled
from test_concat import TwoBranches
from test_lookup import Gated, at_bits, converted
from test_mul import ScaleTimesInput

MAX_LSB = 3  # of the 8-bit logits: one float requantization per op, each within 1 LSB of intq's (0-1 measured)
MIN_TOP1_AGREEMENT = 0.95  # of 32 random-pixel images (1.0 measured on seeds 0-2; such logits lie closer together than real ones)

MODELS = {
    "residual (conv, add, avgpool, linear)": Residual, "concat": TwoBranches, "product and hardsigmoid": ScaleTimesInput,
    "channel gather": Shuffled, "maxpool (study Net)": Net, "sigmoid lookup": lambda: Gated(nn.Sigmoid()),
    "leaky relu lookup": lambda: Gated(nn.LeakyReLU(0.1)),
}


def _converted(factory, config=None):
    """(graph, model, pixels) of a freshly seeded `factory()` calibrated on 32 random images."""
    torch.manual_seed(0)
    return converted(factory(), config or at_bits(8))


def _initializers(contents: bytes) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load_from_string(contents).graph.initializer}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_runtime_runs_the_qdq_model_within_a_few_lsb_and_the_same_top1(name):
    _, model, pixels = _converted(MODELS[name])
    reference = run_integer(model, pixels).to(torch.int64)
    output = QdqModel(model)(pixels)
    assert output.shape == reference.shape
    assert int((output - reference).abs().max()) <= MAX_LSB, name
    assert float((output.argmax(1) == reference.argmax(1)).float().mean()) >= MIN_TOP1_AGREEMENT, name


def test_the_study_nets_int8_input_and_the_recommended_int9_input_quantize_in_8_and_16_bits():
    _, study, pixels = _converted(Net, STUDY)
    _, recommended, _ = _converted(Net)
    for model, box in ((study, "int8"), (recommended, "int16")):
        assert container(model.input.qparams.dtype).name == box
        first = onnx.load_from_string(export_qdq(model)).graph.node[0]
        assert first.op_type in ("QuantizeLinear", "Clip") and first.input[0] == "input"
        assert int((QdqModel(model)(pixels) - run_integer(model, pixels).to(torch.int64)).abs().max()) <= MAX_LSB


def test_the_graph_carries_intqs_exact_scales_zero_points_weights_and_biases():
    _, model, _ = _converted(Residual)
    contents = export_qdq(model)
    stored, qparams = _initializers(contents), model.value_qparams()
    kinds = [node.op_type for node in onnx.load_from_string(contents).graph.node]
    assert kinds.count("QuantizeLinear") == len(model.layers) + 1 and "DequantizeLinear" in kinds
    for name in ["input", *(op.name for op in model.layers)]:
        qp = qparams[model.input_name if name == "input" else name]
        assert stored[f"{name}/q/scale"] == np.float32(qp.scale), name
        assert int(stored[f"{name}/q/zero_point"]) == int(qp.zero_point), name
        assert stored[f"{name}/q/zero_point"].dtype.name == container(qp.dtype).name, name
    for layer in (op for op in model.layers if isinstance(op, QLayer)):
        np.testing.assert_array_equal(stored[f"{layer.name}/weight_q"], layer.weight)
        np.testing.assert_array_equal(stored[f"{layer.name}/w/scale"], np.asarray(layer.weight_qparams.scale, np.float32))
        np.testing.assert_array_equal(stored[f"{layer.name}/w/zero_point"], layer.weight_qparams.zero_point)
        if layer.bias is not None:
            assert stored[f"{layer.name}/bias_q"].dtype == np.int32
            np.testing.assert_array_equal(stored[f"{layer.name}/bias_q"], layer.bias)
            expected = np.broadcast_to(float(layer.input_qparams.scale) * np.asarray(layer.weight_qparams.scale), layer.bias.shape)
            np.testing.assert_array_equal(stored[f"{layer.name}/b/scale"], expected.astype(np.float32))


def test_onnx_runtime_fuses_the_8_bit_node_units_into_its_qlinear_kernels(tmp_path):
    _, model, pixels = _converted(Residual)
    optimized = tmp_path / "optimized.onnx"
    QdqModel(model, optimized_path=str(optimized))(pixels[:1])
    kinds = {node.op_type for node in onnx.load(optimized).graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearAveragePool"} <= kinds, kinds


def test_the_graph_says_its_input_preprocessing_and_outputs_float_logits():
    _, model, pixels = _converted(Net)
    proto = onnx.load_from_string(export_qdq(model))
    assert "(p/255 - mean)/std, mean 0.5, 0.5, 0.5, std 0.5, 0.5, 0.5" in proto.graph.doc_string
    assert {prop.key: prop.value for prop in proto.metadata_props}["mean"] == "[0.5, 0.5, 0.5]"
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": model.input.preprocessing.apply(pixels[:4]).numpy()})
    out = model.output_qparams()
    steps = run_integer(model, pixels[:4]).to(torch.int64).numpy() - int(out.zero_point)
    assert logits.dtype == np.float32 and np.abs(logits - steps * float(out.scale)).max() <= MAX_LSB * float(out.scale)


def test_a_value_wider_than_16_bits_is_refused_in_one_line():
    with pytest.raises(EngineError, match="int20 value is wider than QuantizeLinear's 16-bit types"):
        container(IntType(20, True))
    assert container(IntType(4, False)).name == "uint8" and container(IntType(11, True)).name == "int16"


def test_the_cli_exports_qdq_and_verify_compares_the_whole_model(tmp_path, capsys):
    _, model, pixels = _converted(Net)
    save(model, tmp_path / "net.npz")
    assert main(["export-onnx", str(tmp_path / "net.npz"), "--out", str(tmp_path / "net.onnx"), "--format", "qdq"]) == 0
    out = capsys.readouterr().out
    assert "preprocessed x = (p/255 - mean)/std" in out
    assert "note: 1 of 5 convolutions, linears and adds (conv1) read or write a 16-bit value" in out  # the int9 input
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert main(["export-onnx", str(tmp_path / "net.npz"), "--out", str(tmp_path / "x.onnx"), "--format", "qdq", "--exact"]) != 0
    assert "--exact applies to --format qoperator only" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    row = verify(model, pixels, ("onnx_qdq",))["onnx_qdq"]
    assert row["max_lsb"] <= MAX_LSB and all("QDQ node unit" in op["path"] for op in row["ops"].values())


@pytest.mark.parametrize("config", ["8-bit activations", "x86 preset (7-bit)", "study preset (int8, ReLU at zero point 0)"])
def test_the_ops_said_to_run_as_float_are_left_unfused_by_onnx_runtime(tmp_path, config):
    """float_node_units against ONNX Runtime's own optimised graph: none of them becomes a QLinearConv,
    QGemm or QLinearAdd; with uint8 activations every other conv, linear and add does. With int8
    activations ORT leaves more unfused than float_node_units names (here `project`, whose input also
    feeds an unfused conv): the note's count is a lower bound there."""
    configs = {"8": at_bits(8), "x": X86, "s": STUDY}
    _, model, pixels = _converted(Residual, configs[config[0]])
    optimized = tmp_path / "optimized.onnx"
    QdqModel(model, optimized_path=str(optimized))(pixels[:1])
    fused = {node.name.split("/")[0] for node in onnx.load(optimized).graph.node
             if node.op_type in ("QLinearConv", "QGemm", "QLinearAdd")}
    total = sum(isinstance(op, FUSED_OPS) for op in model.layers)
    unfused = float_node_units(model)
    assert fused.isdisjoint(unfused) and fused <= {op.name for op in model.layers}
    if config.startswith("8"):
        assert unfused == ["stem"] and len(fused) == total - 1  # stem reads the int9 input (16-bit)
        assert fusion_note(model).startswith(f"note: 1 of {total} convolutions, linears and adds (stem) read or write")
    elif config.startswith("x"):
        assert len(unfused) == total and fused == set()  # every 7-bit clamp is a Clip
    else:  # a Relu before an int8 QuantizeLinear whose zero point is not -128 stays a float node
        assert unfused == ["stem", "conv_a", "add"] and fused == {"conv_b", "head"}
