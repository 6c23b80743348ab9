"""ONNX Runtime's own models of a float model (workflows/ort_peer.py), the peers of intq's ONNX paths in
benchmarks/bench_executors.py: the float graph in ONNX Runtime computes what PyTorch computes, and
quantize_static's QDQ models (per-channel weights, calibrated on the given images) run and keep the
float model's top-1 on most images."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import Residual, make_pixels
from intq.workflows.ort_peer import (ACTIVATION_TYPES, CALIBRATION_BATCH, ORT_FLOAT_ROW, ORT_QDQ_ROW, calibration_reader,
                                     float_onnx, ort_peers, ort_qdq_model)

MIN_TOP1_AGREEMENT = 90.0  # % of 64 random-pixel images (int8 activations; 100.0 measured for both)


def study_normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255 - 0.5) / 0.5


def residual_model() -> torch.nn.Module:
    """conftest's Residual (conv-BN-ReLU, a residual block, ReLU6, pools, a linear head), seeded, with
    BatchNorm statistics of its own and well separated logits (so that int8 keeps their order)."""
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.head.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def peers():
    model = residual_model()
    return model, {peer.row: peer for peer in ort_peers(model, make_pixels(200, seed=1), study_normalize, threads=1)}


def test_onnx_runtime_float_computes_pytorchs_float_logits(peers):
    model, rows = peers
    pixels = make_pixels(64)
    with torch.no_grad():
        expected = model(study_normalize(pixels))
    logits = rows[ORT_FLOAT_ROW].forward(pixels)
    assert logits.shape == expected.shape and float((logits - expected).abs().max()) <= 1e-4


@pytest.mark.parametrize("activation_type", sorted(ACTIVATION_TYPES))
def test_quantize_static_qdq_keeps_the_float_top1_on_most_images(peers, activation_type):
    model, rows = peers
    pixels = make_pixels(64)
    with torch.no_grad():
        expected = model(study_normalize(pixels)).argmax(1)
    peer = rows[f"{ORT_QDQ_ROW} ({ACTIVATION_TYPES[activation_type]})"]
    agreement = 100.0 * float((peer.forward(pixels).argmax(1) == expected).float().mean())
    assert agreement >= MIN_TOP1_AGREEMENT, agreement
    assert f"activation_type={activation_type}, weight_type=QInt8" in peer.notes[0] and "on 200 calibration images" in peer.notes[0]


def test_the_qdq_graph_quantizes_weights_per_channel_from_the_calibration_images():
    model = residual_model()
    float_contents = float_onnx(model, study_normalize(make_pixels(2)))
    graph = onnx.load_from_string(ort_qdq_model(float_contents, make_pixels(200, seed=1), study_normalize)).graph
    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    kinds = [node.op_type for node in graph.node]
    assert kinds.count("Conv") == 4 and "QuantizeLinear" in kinds and "DequantizeLinear" in kinds
    for conv in (node for node in graph.node if node.op_type == "Conv"):
        weight_dq = next(node for node in graph.node if node.output[0] == conv.input[1])
        scale = stored[weight_dq.input[1]]
        assert weight_dq.op_type == "DequantizeLinear" and stored[weight_dq.input[0]].dtype == np.int8
        assert scale.shape == (stored[weight_dq.input[0]].shape[0],) and len(set(scale.tolist())) > 1  # per channel


def test_the_calibration_reader_feeds_every_image_preprocessed_in_batches():
    pixels = make_pixels(2 * CALIBRATION_BATCH + 7)
    reader = calibration_reader(pixels, study_normalize)
    batches = list(iter(reader.get_next, None))
    assert [len(batch["input"]) for batch in batches] == [CALIBRATION_BATCH, CALIBRATION_BATCH, 7]
    np.testing.assert_array_equal(np.concatenate([batch["input"] for batch in batches]), study_normalize(pixels).numpy())
