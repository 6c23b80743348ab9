"""Crafted and broken integer model files: each is refused with one line naming the file, the op and
the rule, or (where the file's claim is derived instead of trusted) loads into a model whose
executors agree. The injection that ran a file's own C code through `intq verify` is shown inert.
"""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import calibrated, make_pixels, write_image_folder
from hostile import Hostile, run_cli
from intq.graph.config import RECOMMENDED
from intq.graph.convert import convert
from intq.executors.c_export import c_sources
from intq.executors.reference import run_integer
from intq.graph.integer_model import accumulator_bound
from intq.graph.model_file import ModelFileError, load, save, to_arrays
from intq.cifar.models import NetWithBias

COMPILER = shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(scope="module")
def valid_model():
    torch.manual_seed(0)
    pixels = make_pixels(8)
    model = NetWithBias().eval()
    with torch.no_grad():
        model.fc3.bias.uniform_(-0.5, 0.5)
    graph, stats = calibrated(model, pixels)
    return convert(graph, stats, RECOMMENDED, {"model": "NetWithBias"})


@pytest.fixture(scope="module")
def three_bit_model():
    torch.manual_seed(0)
    pixels = make_pixels(8)
    graph, stats = calibrated(NetWithBias().eval(), pixels)
    return convert(graph, stats, replace(RECOMMENDED, weights=replace(RECOMMENDED.weights, bits=3)))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def meta_of(arrays: dict) -> dict:
    return json.loads(arrays["__meta__"].tobytes().decode())


def with_meta(arrays: dict, meta: dict | str) -> dict:
    text = meta if isinstance(meta, str) else json.dumps(meta)
    return {**arrays, "__meta__": np.frombuffer(text.encode(), np.uint8)}


def edit_meta(edit):
    """A mutation of the JSON: `edit(meta)` changes it in place."""
    def mutate(arrays):
        meta = meta_of(arrays)
        edit(meta)
        return with_meta(arrays, meta)
    return mutate


def edit_array(key, change):
    return lambda arrays: {**arrays, key: change(arrays[key])}


def layer(meta: dict, name: str) -> dict:
    return next(op for op in meta["layers"] if op["name"] == name)


def _set(path: list, value):
    """edit_meta that sets meta[path...] = value, where a str step after "layers" names an op."""
    def edit(meta):
        target = meta
        for step in path[:-1]:
            target = layer(meta, step) if target is meta["layers"] else target[step]
        target[path[-1]] = value
    return edit_meta(edit)


def _delete(path: list):
    """edit_meta that removes meta[path...]."""
    def edit(meta):
        target = meta
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
    return edit_meta(edit)


def _without_flatten(meta):
    meta["layers"] = [op for op in meta["layers"] if op["type"] != "QFlatten"]
    layer(meta, "fc1")["inputs"] = ["pool_1"]


def _nested_text(arrays):
    meta = json.dumps(meta_of(arrays))
    return with_meta(arrays, meta[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _duplicate_name(meta):
    layer(meta, "conv2")["name"] = "conv1"


# (case, mutation of the valid model's arrays, or a special builder name)
MODEL_CASES = [
    (Hostile("bound-1", "accumulator_bound 1 on large weights (the reference picked float32 sums by it)",
             "loads: bound recomputed from the weights"), _set(["layers", "conv1", "accumulator_bound"], 1)),
    (Hostile("bias-max", "a bias of 2^31 - 1 (C overflowed a signed int)", "exceeds int32"),
     edit_array("fc3.bias", lambda a: np.full_like(a, 2**31 - 1))),
    (Hostile("mantissa-length-1", "mantissa array of length 1 for a 120-channel layer", "array 'fc1.mantissa'"),
     edit_array("fc1.mantissa", lambda a: a[:1])),
    (Hostile("shift-length-1", "shift array of length 1 for a 120-channel layer", "array 'fc1.shift'"),
     edit_array("fc1.shift", lambda a: a[:1])),
    (Hostile("shift-70", "shift 70", "mantissa/shift of channel 0"), edit_array("conv1.shift", lambda a: np.full_like(a, 70))),
    (Hostile("shift-minus-40", "shift -40", "mantissa/shift of channel 0"),
     edit_array("conv1.shift", lambda a: np.full_like(a, -40))),
    (Hostile("negative-mantissa", "negative mantissas", "mantissa/shift of channel 0"), edit_array("conv1.mantissa", lambda a: -a)),
    (Hostile("tiny-mantissa", "tiny mantissas (5)", "mantissa/shift of channel 0"),
     edit_array("conv1.mantissa", lambda a: np.full_like(a, 5))),
    (Hostile("scale-nudged", "an output scale changed, mantissas left (inconsistent)", "its scales give"),
     _set(["layers", "conv2", "output_qparams", "scale"], 0.5)),
    (Hostile("nan-scale", "NaN weight scale", "scales must be finite and positive"),
     _set(["layers", "conv1", "weight_qparams", "scale", 0], float("nan"))),
    (Hostile("zero-scale", "zero output scale with a ReLU6-style clamp", "scales must be finite and positive"),
     edit_meta(lambda m: layer(m, "conv1").update(relu_max=6.0, output_qparams={**layer(m, "conv1")["output_qparams"],
                                                                                   "scale": 0.0}))),
    (Hostile("zero-point-1000", "zero point 1000 on a uint8 output", "zero point 1000 outside uint8"),
     _set(["layers", "conv1", "output_qparams", "zero_point"], 1000)),
    (Hostile("string-zero-point", "a string zero point", "'zero_point' must be an integer"),
     _set(["layers", "conv1", "output_qparams", "zero_point"], "0")),
    (Hostile("weight-zero-point", "weights with a non-zero zero point (the executors assume 0)",
             "weight zero points must be 0"), _set(["layers", "fc3", "weight_qparams", "zero_point"], [3] * 10)),
    (Hostile("float-weights", "fractional (float32) weights", "expected int8"),
     edit_array("conv1.weight", lambda a: a.astype(np.float32) + 0.5)),
    (Hostile("int32-weights", "int32 weights", "expected int8"), edit_array("conv1.weight", lambda a: a.astype(np.int32))),
    (Hostile("object-array", "a pickled object array in place of the weights", "array 'conv1.weight'"),
     edit_array("conv1.weight", lambda a: np.array([{"x": 1}] * 450, dtype=object))),
    (Hostile("unused-64mb", "64 MB of zeros in an unused array (200 KB compressed)", "unexpected array 'payload.npy'"),
     lambda arrays: {**arrays, "payload": np.zeros(64 << 20, np.uint8)}),
    (Hostile("missing-bias", "a layer whose bias array is missing", "missing array 'fc3.bias'"),
     lambda arrays: {k: v for k, v in arrays.items() if k != "fc3.bias"}),
    (Hostile("unknown-op", "an unknown op type", "unknown op type 'QSoftmax'"), _set(["layers", "pool", "type"], "QSoftmax")),
    (Hostile("unknown-input", "an input naming no earlier op", "neither the model input nor an earlier op"),
     _set(["layers", "conv2", "inputs"], ["conv9"])),
    (Hostile("bits-40", "bits 40", "'bits' must be in [2, 32]"), _set(["layers", "conv1", "output_qparams", "bits"], 40)),
    (Hostile("weight-bits-16", "16-bit weights declared", "intq stores 2..8"), _set(["layers", "conv1", "weight_qparams", "bits"], 16)),
    (Hostile("stride-0", "stride 0", "'stride' must hold integers in [1, 65536]"),
     _set(["layers", "conv1", "geometry", "stride"], [0, 1])),
    (Hostile("kernel-0", "a kernel of size 0", "'weight_shape' must hold integers in [1, 65536]"),
     _set(["layers", "conv1", "weight_shape"], [6, 3, 0, 5])),
    (Hostile("pool-kernel-0", "a max-pool kernel of 0", "'kernel_size' must hold integers in [1, 65536]"),
     _set(["layers", "pool", "kernel_size"], [0, 2])),
    (Hostile("groups-3", "groups that do not divide the channels", "do not fit 6 input channels"),
     _set(["layers", "conv2", "geometry", "groups"], 3)),
    (Hostile("padding-huge", "padding larger than the kernel allows", "do not fit"),
     _set(["layers", "conv1", "geometry", "padding"], [40, 40])),
    (Hostile("no-flatten", "the flatten removed (a linear layer reads a (C, H, W) tensor)", "a linear layer with 400 input features"),
     edit_meta(_without_flatten)),
    (Hostile("deep-json", "metadata nested 100,000 deep (RecursionError)", "nested too deeply"), _nested_text),
    (Hostile("meta-not-json", "__meta__ that is not JSON", "not UTF-8 JSON"), lambda arrays: with_meta(arrays, "{not json")),
    (Hostile("version-9", "an unknown format version", "unsupported model format"), _set(["version"], 9)),
    (Hostile("duplicate-name", "two ops with one name", "its name is used twice"), edit_meta(_duplicate_name)),
    (Hostile("input-qparams-drift", "a layer's input parameters unlike its producer's output", "differ from those of"),
     _set(["layers", "conv2", "input_qparams", "zero_point"], 7)),
    (Hostile("no-output", "an output name that is no op", "is not one of its ops"), _set(["output_name"], "softmax")),
    (Hostile("relu-max-huge", "relu_max 1e300 (int overflow in the clamp)", "relu_max must be finite"),
     _set(["layers", "conv1", "relu_max"], 1e300)),
    (Hostile("per-channel-short", "per-channel weight scales one short", "per-channel weight parameters need 6 scales"),
     edit_meta(lambda m: layer(m, "conv1")["weight_qparams"].update(scale=layer(m, "conv1")["weight_qparams"]["scale"][:5],
                                                                    zero_point=[0] * 5))),
    (Hostile("control-name", "a name holding a newline and an escape sequence", "printable characters"),
     _set(["layers", "conv1", "name"], "conv1\n\x1b[31m")),
    (Hostile("huge-shape", "a declared weight shape of 2^64 values", "weights (at most"),
     _set(["layers", "conv1", "weight_shape"], [65536, 65536, 65536, 65536])),
    (Hostile("packed-flag", "8-bit weights flagged as packed", "are stored unpacked"),
     _set(["layers", "conv1", "weight_packed"], True)),
    (Hostile("no-layers", "no ops at all", "0 ops"), _set(["layers"], [])),
    (Hostile("input-scale", "an input scale that is not the one its first layer was built for",
             "its input parameters differ from those of 'x', which produces its input"),
     _set(["input", "qparams", "scale"], 0.01)),
    (Hostile("input-mean-count", "an input mean with 2 values for 3 channels",
             "input: mean and std must be lists of 3 numbers (one per channel)"), _set(["input", "mean"], [0.5, 0.5])),
    (Hostile("input-std-zero", "an input std of 0", "std must be above 0"), _set(["input", "std"], [0.5, 0.0, 0.5])),
    (Hostile("input-mean-text", "an input mean that is text", "input: mean and std must be lists of 3 numbers"),
     _set(["input", "mean"], ["a", "b", "c"])),
    (Hostile("input-no-shape", "a v3 input without its shape", "input: missing field 'shape'"),
     _delete(["input", "shape"])),
    (Hostile("version-1", "a file of format version 1", "this intq reads intq.IntegerModel v2 and v3"),
     _set(["version"], 1)),
    (Hostile("truncated", "a truncated .npz (half its bytes)", "not a readable .npz archive"), "truncate"),
    (Hostile("text-file", "a text file named .npz", "not a readable .npz archive"), "text"),
    (Hostile("missing-file", "a path that does not exist", "no such file"), "missing"),
]

SUB_BYTE_CASES = [
    (Hostile("int3-out-of-range", "3-bit weights holding 4-bit values (7)", "weights must be int3 values in [-4, 3]"),
     edit_array("conv1.weight", lambda a: np.full_like(a, 0x77))),
]

CASES = [case for case, _ in MODEL_CASES + SUB_BYTE_CASES] + [
    Hostile("c-injection", "an op name closing the C comment and adding code, then `intq verify`",
            "loads; code inert: verify c 0 differences"),
]


def build(tmp_path: Path, model, mutation) -> Path:
    path = tmp_path / "crafted.npz"
    if mutation == "missing":
        return tmp_path / "absent.npz"
    if mutation == "text":
        path.write_text("hello\n")
        return path
    save(model, path)
    if mutation == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    return write_npz(path, mutation(to_arrays(model)))


@pytest.mark.parametrize("case, mutation", MODEL_CASES + SUB_BYTE_CASES, ids=lambda c: getattr(c, "id", ""))
def test_crafted_model_file_gets_its_one_line(tmp_path, valid_model, three_bit_model, case, mutation):
    model = three_bit_model if (case, mutation) in SUB_BYTE_CASES else valid_model
    path = build(tmp_path, model, mutation)
    if case.expected.startswith("loads"):
        loaded = load(path)
        for op in loaded.quantized_layers():
            assert op.accumulator_bound == accumulator_bound(op.weight, op.bias, op.input_qparams)
        return
    with pytest.raises(ModelFileError) as raised:
        load(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(path)) and case.expected in message, message


def test_crafted_file_through_the_cli_is_one_line(tmp_path, valid_model):
    path = build(tmp_path, valid_model, _set(["layers", "conv1", "geometry", "stride"], [0, 1]))
    result = run_cli(["eval", path, "--data", tmp_path / "none", "--cache", tmp_path / "cache"])
    assert result.code == 2 and "'stride' must hold integers" in result.err


def _renamed(model, old: str, new: str):
    """The model with op `old` called `new` everywhere it is named."""
    ops = []
    for op in model.layers:
        op = replace(op, name=new if op.name == old else op.name, inputs=tuple(new if n == old else n for n in op.inputs))
        ops.append(op)
    return replace(model, layers=ops, output_name=new if model.output_name == old else model.output_name)


INJECTION = 'conv1 */ int intq_pwned(void) { return system("touch PWNED"); } /*'


@pytest.mark.skipif(COMPILER is None, reason="no C compiler")
def test_c_injection_through_an_op_name_is_inert(tmp_path, valid_model, monkeypatch):
    """The name that put C code into model.h before: now the export is numbers and op<i>_ names only,
    and `intq verify` (which compiles and runs the C executor) runs the model, nothing else."""
    crafted = _renamed(valid_model, "conv1", INJECTION)
    path = tmp_path / "crafted.npz"
    save(crafted, path)
    header = c_sources(load(path), make_pixels(1))["model.h"]
    assert "system" not in header.replace("system_", "") and "*/ int" not in header
    data = write_image_folder(tmp_path / "images", 1, 2)
    monkeypatch.chdir(tmp_path)
    result = run_cli(["verify", path, "--executors", "c", "--data", data, "--cache", tmp_path / "cache"])
    assert result.code == 0, result.err
    assert "differing 0.0000%" in result.out and not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------ fuzzing

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
DTYPES = st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64])


def _json_paths(value, path=()):
    """Every (path, leaf or container) inside the JSON."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _json_paths(item, (*path, index))


@st.composite
def mutated_files(draw, arrays: dict) -> dict:
    """A valid model's arrays with 1-3 random mutations: JSON values replaced or deleted, arrays
    replaced by random dtype/length/values, or entries dropped."""
    arrays = dict(arrays)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["json", "json-delete", "array", "array-values", "drop", "plausible", "plausible"]))
        keys = sorted(k for k in arrays if k != "__meta__")
        if kind.startswith("json"):
            meta = meta_of(arrays)
            paths = [p for p, _ in _json_paths(meta) if p]
            path = draw(st.sampled_from(paths))
            parent = meta
            for step in path[:-1]:
                parent = parent[step]
            if kind == "json-delete" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(JSON_VALUES)
            arrays = with_meta(arrays, json.dumps(meta))
        elif kind == "array":
            key = draw(st.sampled_from(keys))
            size = max(0, draw(st.sampled_from([0, 1, arrays[key].size - 1, arrays[key].size, arrays[key].size + 1,
                                                 2 * arrays[key].size])))
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            arrays[key] = rng.integers(0, 256, size * 8, dtype=np.uint8).view(draw(DTYPES))[:size]
        elif kind == "array-values":
            key = draw(st.sampled_from([k for k in keys if arrays[k].size] or keys))
            values = arrays[key].copy()
            if values.size == 0:
                continue
            index = draw(st.integers(0, values.size - 1))
            info = np.iinfo(values.dtype)
            values.flat[index] = draw(st.integers(info.min, info.max))
            arrays[key] = values
        elif kind == "plausible":
            arrays = draw(plausible_change(arrays))
        else:
            arrays.pop(draw(st.sampled_from(keys)))
    return arrays


@st.composite
def plausible_change(draw, arrays: dict) -> dict:
    """A change a valid model could have made: other weights, biases, a ReLU or clamp toggled, the
    output's zero point moved. Such files should load and every executor must agree on them."""
    meta = meta_of(arrays)
    op = draw(st.sampled_from([op for op in meta["layers"] if op["type"] == "QLayer"]))
    change = draw(st.sampled_from(["weights", "bias", "relu", "relu_max", "output_zero"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if change == "weights" and not op["weight_packed"]:
        key = f"{op['name']}.weight"
        arrays = {**arrays, key: rng.integers(-127, 128, arrays[key].shape, dtype=np.int64).astype(np.int8)}
    elif change == "bias" and op["has_bias"]:
        key = f"{op['name']}.bias"
        arrays = {**arrays, key: rng.integers(-(2**20), 2**20, arrays[key].shape).astype(np.int32)}
    elif change == "relu":
        op["relu"] = not op["relu"]
    elif change == "relu_max":
        op["relu_max"] = draw(st.none() | st.floats(0, 50))
    elif change == "output_zero" and op["name"] == meta["output_name"]:
        dtype = op["output_qparams"]
        low, high = (-(2 ** (dtype["bits"] - 1)), 2 ** (dtype["bits"] - 1) - 1) if dtype["signed"] else (0, 2 ** dtype["bits"] - 1)
        dtype["zero_point"] = draw(st.integers(low, high))
    return with_meta(arrays, json.dumps(meta))


@pytest.mark.skipif(COMPILER is None, reason="no C compiler")
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_model_files_load_and_agree_or_are_refused(tmp_path_factory, valid_model, data):
    """Loading either raises ModelFileError, or gives a model whose reference and C outputs agree."""
    from intq.executors.c_runner import run_c

    arrays = data.draw(mutated_files(to_arrays(valid_model)))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = tmp_path_factory.mktemp("fuzz") / "mutated.npz"
    path.write_bytes(buffer.getvalue())
    try:
        model = load(path)
    except ModelFileError:
        event("refused")
        return
    event("loaded")
    pixels = make_pixels(2, seed=1)
    assert torch.equal(run_c(model, pixels), run_integer(model, pixels).to(torch.int64).reshape(2, -1))
