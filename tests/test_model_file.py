"""The model file: byte-identical round trips, files of earlier intq versions, and the same rules on
models that convert builds (the hostile files are in test_hostile_model.py)."""
import json
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import intq
from conftest import calibrated, make_pixels
from intq.arith.preprocessing import Preprocessing
from intq.graph.capture import capture
from intq.graph.config import RECOMMENDED
from intq.graph.convert import ConversionError, collect_statistics, convert
from intq.executors.reference import run_integer
from intq.graph.model_check import ModelCheckError, check_model
from intq.graph.model_file import ModelFileError, load, save, to_arrays, to_bytes
from intq.cifar.models import Net, NetWithBias
from intq.arith.qparams import Scheme

DATA = Path(__file__).parent / "data"


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


def test_a_v2_file_from_before_the_input_shape_and_with_a_stored_bound_loads(tmp_path, model):
    """Files of intq 0.1.0 (format v2) carry an accumulator_bound per layer (now ignored: recomputed),
    the input's mantissa and shift, and at first no input shape."""
    arrays = to_arrays(model)
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    meta["version"] = 2
    meta["input"] = {"qparams": meta["input"]["qparams"], "mantissa": None, "shift": None}
    for op in meta["layers"]:
        if op["type"] == "QLayer":
            op["accumulator_bound"] = 7
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(tmp_path / "old.npz", **arrays)
    loaded = load(tmp_path / "old.npz")
    assert loaded.input.shape == (3, 32, 32) and loaded.input.preprocessing == Preprocessing((0.5,) * 3, (0.5,) * 3)
    assert [op.accumulator_bound for op in loaded.quantized_layers()] == [op.accumulator_bound for op in model.quantized_layers()]
    pixels = make_pixels(4, seed=3)
    assert torch.equal(run_integer(loaded, pixels), run_integer(model, pixels))


@pytest.mark.parametrize("preset", ["study", "recommended"])
def test_committed_v2_files_load_and_give_the_integers_they_gave(preset):
    """tests/data holds two v2 files and their outputs on 8 images, written by intq 0.1.0 (before the
    input specification): one with a requantized input (mantissa, shift), one folded."""
    expected = np.load(DATA / "v2-net-outputs.npz")
    loaded = load(DATA / f"v2-net-{preset}.npz")
    assert loaded.input.folded == (preset == "recommended")
    assert torch.equal(run_integer(loaded, torch.from_numpy(expected["pixels"])), torch.from_numpy(expected[preset]))
    assert to_arrays(loaded)["__meta__"].tobytes().decode().count('"version":3') == 1  # saved again as v3


def test_a_v2_input_multiplier_that_is_not_derived_from_its_scale_is_refused(tmp_path):
    with zipfile.ZipFile(DATA / "v2-net-study.npz") as archive:
        arrays = {name[:-4]: np.load(archive.open(name)) for name in archive.namelist()}
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    meta["input"]["mantissa"] += 1
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(tmp_path / "edited.npz", **arrays)
    with pytest.raises(ModelFileError, match="input: mantissa and shift .* are not the input multiplier"):
        load(tmp_path / "edited.npz")


@pytest.mark.parametrize("version", [1, 4, "3", None])
def test_a_v1_or_unknown_version_is_refused_in_one_line(tmp_path, model, version):
    arrays = to_arrays(model)
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    meta["version"] = version
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(tmp_path / "v.npz", **arrays)
    with pytest.raises(ModelFileError, match=r"unsupported model format 'intq.IntegerModel' v.* \(this intq reads "
                       r"intq.IntegerModel v2 and v3\)") as error:
        load(tmp_path / "v.npz")
    assert "\n" not in str(error.value)


def test_the_input_specification_and_version_are_saved(tmp_path):
    torch.manual_seed(0)
    pixels = make_pixels(16)
    preprocessing = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    graph = capture(Net().eval(), pixels[:2], preprocessing)
    model = convert(graph, collect_statistics(graph, [pixels]), RECOMMENDED)
    save(model, tmp_path / "m.npz")
    loaded = load(tmp_path / "m.npz")
    assert loaded.input.preprocessing == preprocessing and loaded.input.shape == (3, 32, 32)
    assert np.array_equal(loaded.input.table, model.input.table)
    meta = json.loads(to_arrays(loaded)["__meta__"].tobytes().decode())
    assert meta["intq_version"] == intq.__version__ and meta["input"]["mean"] == [0.485, 0.456, 0.406]


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
