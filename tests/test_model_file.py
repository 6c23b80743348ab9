"""The model file: byte-identical round trips, files of earlier intq versions, and the same rules on
models that convert builds (the hostile files are in test_hostile_model.py)."""
import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import calibrated, make_pixels
from intq.graph.config import RECOMMENDED
from intq.graph.convert import ConversionError, convert
from intq.executors.reference import run_integer
from intq.graph.model_check import ModelCheckError, check_model
from intq.graph.model_file import load, save, to_arrays, to_bytes
from intq.cifar.models import Net, NetWithBias
from intq.arith.qparams import Scheme


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    graph, stats = calibrated(NetWithBias().eval(), make_pixels(8))
    return convert(graph, stats, RECOMMENDED, {"model": "NetWithBias", "seed": 0})


def test_saving_twice_and_after_a_round_trip_gives_the_same_bytes(tmp_path, model):
    first = to_bytes(model)
    time.sleep(1.1)  # a zip timestamp would differ
    save(model, tmp_path / "m.npz")
    assert to_bytes(model) == first == (tmp_path / "m.npz").read_bytes()
    assert to_bytes(load(tmp_path / "m.npz")) == first


def test_a_file_from_before_the_input_shape_and_with_a_stored_bound_loads(tmp_path, model):
    """Files of intq 0.1.0 carry an accumulator_bound per layer (now ignored: recomputed) and no input shape."""
    arrays = to_arrays(model)
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    del meta["input"]["shape"]
    for op in meta["layers"]:
        if op["type"] == "QLayer":
            op["accumulator_bound"] = 7
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(tmp_path / "old.npz", **arrays)
    loaded = load(tmp_path / "old.npz")
    assert loaded.input.shape == (3, 32, 32)
    assert [op.accumulator_bound for op in loaded.quantized_layers()] == [op.accumulator_bound for op in model.quantized_layers()]
    pixels = make_pixels(4, seed=3)
    assert torch.equal(run_integer(loaded, pixels), run_integer(model, pixels))


def test_check_model_returns_every_shape(model):
    shapes = check_model(model)
    assert shapes["x"] == (3, 32, 32) and shapes["conv1"] == (6, 28, 28) and shapes["view"] == (400,)
    assert shapes["fc3"] == (10,)


def test_a_modified_in_memory_layer_is_caught(model):
    layer = model.layer("fc1")
    stale = replace(model, layers=[replace(op, accumulator_bound=1) if op is layer else op for op in model.layers])
    with pytest.raises(ModelCheckError, match="'fc1': carries accumulator bound 1"):
        check_model(stale)


def test_convert_refuses_asymmetric_weights_the_executors_do_not_run():
    """The executors compute sum q_w (q_x - z_x): weights with a zero point would be silently wrong."""
    torch.manual_seed(0)
    graph, stats = calibrated(Net().eval(), make_pixels(8))
    config = replace(RECOMMENDED, weights=replace(RECOMMENDED.weights, scheme=Scheme.ASYMMETRIC))
    with pytest.raises(ConversionError, match="weight zero points must be 0"):
        convert(graph, stats, config)


def test_an_input_shape_that_is_not_an_image_is_a_rule_not_a_crash(model):
    stale = replace(model, input=replace(model.input, shape=(3, 32)))
    with pytest.raises(ModelCheckError, match=r"model input: shape \(3, 32\) is not an image's \(C, H, W\)"):
        check_model(stale)
