"""A user's own model and weights (workflows/user_model.py): real model files, packages and weights
files in tmp_path; every way they load, and every bad input as one line that names it."""
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from intq.cifar.train import save_weights
from intq.extras import MissingExtraError
from intq.workflows.user_model import ModelSpec, UserModelError, load_user_model, parse_model_spec

MODEL_SOURCE = textwrap.dedent('''
    import torch
    import torch.nn as nn
    from math import sqrt


    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 5)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv1(x)))
            return self.fc(x.mean((2, 3)))


    def build():
        return Small()


    class Models:
        @staticmethod
        def small():
            return Small()


    instance = Small()
    WIDTH = 6


    def broken():
        raise ValueError("width must be even")


    def not_a_model():
        return 42
''')


class TrainingRun:
    """A custom object, which PyTorch's weights_only loader must refuse."""


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "user_net.py"
    path.write_text(MODEL_SOURCE)
    return path


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state_dict with seeded random floats, so a load is told apart from the init."""
    torch.manual_seed(seed)
    state = model.state_dict()
    return {key: torch.randn(value.shape) if value.is_floating_point() else value.clone() for key, value in state.items()}


def assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert not any(module.training for module in model.modules())


def one_line_error(call) -> str:
    with pytest.raises(UserModelError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def saved(tmp_path, name: str, content) -> Path:
    path = tmp_path / name
    torch.save(content, path)
    return path


# The spec


def test_a_spec_is_a_file_or_a_module_and_a_dotted_attribute():
    assert parse_model_spec("nets/small.py:Models.tiny") == ModelSpec(Path("nets/small.py"), None, "Models.tiny")
    assert parse_model_spec("torchvision.models:resnet18") == ModelSpec(None, "torchvision.models", "resnet18")
    assert parse_model_spec("C:/nets/small.py:build") == ModelSpec(Path("C:/nets/small.py"), None, "build")
    assert str(parse_model_spec("pkg.nets:Net")) == "pkg.nets:Net"


@pytest.mark.parametrize("text", ["small.py", "a.py:", ":build", "x y:z", "m.py:1abc", "m.py:a.class", "pkg..nets:f",
                                  "nets/small.txt:build", "m.py:build()"])
def test_a_malformed_spec_is_one_line_naming_it_and_the_forms(text):
    message = one_line_error(lambda: parse_model_spec(text))
    assert repr(text) in message and "path/to/file.py:factory or package.module:attribute" in message


# Loading models and weights


@pytest.mark.parametrize("attribute", ["build", "Small", "instance", "Models.small"])
def test_a_file_gives_its_function_class_instance_or_dotted_attribute_with_the_weights(tmp_path, model_file, attribute):
    state = random_state(load_user_model(f"{model_file}:build"))
    weights = saved(tmp_path, "small.pt", state)
    model = load_user_model(f"{model_file}:{attribute}", weights)
    assert type(model).__name__ == "Small"
    assert_loaded(model, state)


def test_the_file_leaves_neither_its_folder_on_sys_path_nor_its_name_in_sys_modules(tmp_path, model_file):
    load_user_model(f"{model_file}:build")
    assert str(tmp_path) not in sys.path
    assert "user_net" not in sys.modules


def test_the_file_imports_a_file_beside_it(tmp_path):
    (tmp_path / "user_blocks_beside.py").write_text("import torch.nn as nn\nBlock = nn.Linear\n")
    (tmp_path / "net.py").write_text("from user_blocks_beside import Block\n\ndef build():\n    return Block(2, 3)\n")
    try:
        assert isinstance(load_user_model(f"{tmp_path / 'net.py'}:build"), nn.Linear)
    finally:
        sys.modules.pop("user_blocks_beside", None)
    assert str(tmp_path) not in sys.path


@pytest.fixture
def package(tmp_path, monkeypatch) -> str:
    """An importable package `user_models_pkg` holding nets.py; removed from sys.modules afterwards."""
    folder = tmp_path / "site" / "user_models_pkg"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "nets.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(folder.parent))
    yield "user_models_pkg"
    for name in ("user_models_pkg", "user_models_pkg.nets"):
        sys.modules.pop(name, None)


def test_a_module_gives_its_attribute(tmp_path, package):
    state = random_state(load_user_model(f"{package}.nets:build"), seed=1)
    model = load_user_model(f"{package}.nets:Models.small", saved(tmp_path, "small.pth", state))
    assert_loaded(model, state)


def test_safetensors_weights_load(tmp_path, model_file):
    save_file = pytest.importorskip("safetensors.torch").save_file
    state = random_state(load_user_model(f"{model_file}:build"))
    save_file(state, tmp_path / "small.safetensors")
    assert_loaded(load_user_model(f"{model_file}:build", tmp_path / "small.safetensors"), state)


def test_safetensors_weights_without_safetensors_name_the_extra(tmp_path, model_file, monkeypatch):
    (tmp_path / "small.safetensors").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'intq\[weights\]'"):
        load_user_model(f"{model_file}:build", tmp_path / "small.safetensors")


def test_an_intq_train_checkpoint_loads(tmp_path, model_file):
    reference = load_user_model(f"{model_file}:build")
    reference.load_state_dict(random_state(reference))
    save_weights(reference, [], tmp_path / "small.npz")
    assert_loaded(load_user_model(f"{model_file}:build", tmp_path / "small.npz"), reference.state_dict())


@pytest.mark.parametrize("wrap", [
    lambda state: {"state_dict": state},
    lambda state: {"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 3},
    lambda state: {f"module.{key}": value for key, value in state.items()},
], ids=["state_dict", "training checkpoint", "DataParallel"])
def test_common_checkpoint_layouts_load(tmp_path, model_file, wrap):
    state = random_state(load_user_model(f"{model_file}:build"))
    assert_loaded(load_user_model(f"{model_file}:build", saved(tmp_path, "small.bin", wrap(state))), state)


def test_float64_weights_are_cast_and_a_missing_batchnorm_counter_is_the_models(tmp_path, model_file):
    state = random_state(load_user_model(f"{model_file}:build"))
    doubles = {key: value.double() for key, value in state.items() if key != "bn.num_batches_tracked"}
    model = load_user_model(f"{model_file}:build", saved(tmp_path, "small.pt", doubles))
    assert_loaded(model, state)
    assert model.conv1.weight.dtype == torch.float32


# Bad models


def test_a_missing_file_is_named(tmp_path):
    assert str(tmp_path / "absent.py") in one_line_error(lambda: load_user_model(f"{tmp_path / 'absent.py'}:build"))


def test_a_file_that_is_not_python_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("build = 1\n")
    message = one_line_error(lambda: load_user_model("notes.txt:build"))
    assert "notes.txt is a file, but a model file must end in .py" in message


@pytest.mark.parametrize("source, error", [
    ("def build(:\n    pass\n", "SyntaxError"),
    ("import no_such_module_for_intq\n", "ModuleNotFoundError: No module named 'no_such_module_for_intq'"),
    ("raise RuntimeError('needs a GPU')\n", "RuntimeError: needs a GPU"),
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
])
def test_a_file_that_fails_to_run_is_one_line_with_the_error(tmp_path, source, error):
    path = tmp_path / "failing.py"
    path.write_text(source)
    message = one_line_error(lambda: load_user_model(f"{path}:build"))
    assert message.startswith(f"{path}: running it raised {error}")
    assert str(tmp_path) not in sys.path


def test_a_module_that_cannot_be_imported_is_named():
    message = one_line_error(lambda: load_user_model("no_such_package_for_intq.nets:build"))
    assert "cannot import no_such_package_for_intq.nets (ModuleNotFoundError" in message


@pytest.mark.parametrize("attribute, where", [("buld", "user_net.py"), ("Models.tiny", "Models in")])
def test_a_missing_attribute_lists_what_is_defined(model_file, attribute, where):
    message = one_line_error(lambda: load_user_model(f"{model_file}:{attribute}"))
    assert f"{model_file}:{attribute}: no {attribute.split('.')[-1]!r} in" in message and where in message
    if attribute == "buld":
        assert message.endswith("it defines: Models, Small, broken, build, instance, not_a_model")


@pytest.mark.parametrize("attribute, error", [
    ("broken", "calling broken() raised ValueError: width must be even"),
    ("not_a_model", "not_a_model() returned a int, not a torch.nn.Module"),
    ("WIDTH", "WIDTH is a int, not an nn.Module or a class or function that builds one"),
])
def test_a_factory_that_gives_no_module_is_one_line(model_file, attribute, error):
    assert one_line_error(lambda: load_user_model(f"{model_file}:{attribute}")) == f"{model_file}:{attribute}: {error}"


# Bad weights


def test_weights_for_another_model_name_the_keys_and_both_shapes(tmp_path, model_file):
    spec = f"{model_file}:build"
    state = random_state(load_user_model(spec))
    state["conv1.weight"] = torch.randn(16, 3, 3, 3)
    del state["fc.weight"], state["fc.bias"]
    state["head.weight"] = torch.randn(10, 6)
    weights = saved(tmp_path, "other.pt", state)
    assert one_line_error(lambda: load_user_model(spec, weights)) == (
        f"{weights} does not fit {spec}: conv1.weight has shape (16, 3, 3, 3), the model's is (6, 3, 5, 5); "
        f"2 missing keys (fc.weight, fc.bias); 1 unexpected key (head.weight)")


def test_integer_weights_where_the_model_has_floats_are_refused(tmp_path, model_file):
    state = random_state(load_user_model(f"{model_file}:build"))
    state["fc.bias"] = torch.zeros(10, dtype=torch.int64)
    message = one_line_error(lambda: load_user_model(f"{model_file}:build", saved(tmp_path, "w.pt", state)))
    assert message.endswith("fc.bias is int64, the model's is float32")


def test_a_non_finite_weight_is_named(tmp_path, model_file):
    state = random_state(load_user_model(f"{model_file}:build"))
    state["bn.running_var"][2] = float("nan")
    weights = saved(tmp_path, "nan.pt", state)
    message = one_line_error(lambda: load_user_model(f"{model_file}:build", weights))
    assert message == f"{weights}: bn.running_var holds 1 non-finite value(s) (NaN or inf)"


@pytest.mark.parametrize("content, refused", [
    ("whole model", "Unsupported global: GLOBAL _intq_user_model_"),
    (TrainingRun(), "Unsupported global: GLOBAL test_user_model.TrainingRun"),
])
def test_a_pickled_object_is_refused_by_the_weights_only_loader(tmp_path, model_file, content, refused):
    if content == "whole model":
        content = load_user_model(f"{model_file}:build")
    weights = saved(tmp_path, "pickled.pt", content)
    message = one_line_error(lambda: load_user_model(f"{model_file}:build", weights))
    assert message.startswith(f"{weights}: not a plain state_dict (PyTorch's weights_only loader refused it: ")
    assert refused in message and message.endswith("save model.state_dict() instead")


@pytest.mark.parametrize("content, held", [
    ([torch.zeros(2)], "holds a list"),
    ({"fc.weight": torch.zeros(2), "epoch": 3}, "holds a dict whose 'epoch' is a int"),
    ({"state_dict": {}, "model": {}}, "2 candidate state_dicts (state_dict, model)"),
])
def test_a_file_without_a_state_dict_says_what_it_holds(tmp_path, model_file, content, held):
    weights = saved(tmp_path, "odd.pt", content)
    assert held in one_line_error(lambda: load_user_model(f"{model_file}:build", weights))


def unreadable_files(tmp_path, model_file) -> dict[str, Path]:
    """A truncated .pt, empty files, text named .pt, .safetensors and .npz."""
    whole = saved(tmp_path, "whole.pt", random_state(load_user_model(f"{model_file}:build")))
    files = {"truncated.pt": whole.read_bytes()[: whole.stat().st_size // 2], "empty.pt": b"", "empty.safetensors": b"",
             "text.pt": b"hello", "text.safetensors": b"hello world, not a header", "text.npz": b"hello"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return {name: tmp_path / name for name in files}


def test_an_unreadable_weights_file_is_named(tmp_path, model_file):
    for name, weights in unreadable_files(tmp_path, model_file).items():
        if name.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
            continue
        message = one_line_error(lambda: load_user_model(f"{model_file}:build", weights))
        assert message.startswith(str(weights)), name


def test_an_intq_checkpoint_of_another_model_is_one_line(tmp_path, model_file):
    save_weights(nn.Linear(2, 3), [], tmp_path / "linear.npz")
    message = one_line_error(lambda: load_user_model(f"{model_file}:build", tmp_path / "linear.npz"))
    assert str(tmp_path / "linear.npz") in message


def test_a_missing_or_unknown_weights_file_fails_before_the_model_runs(tmp_path):
    path = tmp_path / "loud.py"
    path.write_text("raise RuntimeError('ran')\n")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    assert one_line_error(lambda: load_user_model(f"{path}:build", tmp_path / "w.ckpt")) == (
        f"--weights {tmp_path / 'w.ckpt'}: unknown format '.ckpt'; accepted: .pt, .pth, .bin, .safetensors, .npz")
    assert one_line_error(lambda: load_user_model(f"{path}:build", tmp_path / "absent.pt")) == (
        f"--weights: no such file: {tmp_path / 'absent.pt'}")
