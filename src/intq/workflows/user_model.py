"""A user's own float model and its weights: `--model SPEC` and `--weights FILE`.

    model = load_user_model("nets/small.py:build", Path("small.pt"))   # in eval mode, weights checked

SPEC is `path/to/file.py:attribute` (a Python file, run as a fresh module) or
`package.module:attribute` (imported with importlib). The attribute may be dotted (`Models.small`):
an nn.Module instance is used as it is; a class or a function is called with no arguments and must
return an nn.Module. The weights are a state_dict in .pt/.pth/.bin (read with weights_only=True,
so the file cannot run code), .safetensors (intq[weights]) or a checkpoint of `intq train` (.npz);
every key, shape and dtype is checked against the model before load_state_dict. Each failure is a
one-line UserModelError that names the spec or the file, never a traceback.
"""
from __future__ import annotations

import importlib
import importlib.util
import keyword
import pickle
import re
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn as nn

from intq.extras import require
from intq.workflows.pipeline import CheckpointError, read_checkpoint

SPEC_FORMS = "path/to/file.py:factory or package.module:attribute"
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")  # where training checkpoints keep the state_dict
DATA_PARALLEL_PREFIX = "module."  # nn.DataParallel and DistributedDataParallel prefix every key with it
SHOWN_NAMES = 10  # defined names listed when an attribute is missing
SHOWN_KEYS = 5  # missing or unexpected keys named in a mismatch
SHOWN_SHAPES = 3  # shape or dtype mismatches spelled out
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # PyTorch colours parts of its error messages
MISSING = object()  # getattr's default: an attribute that is there may well be None


class UserModelError(Exception):
    """A model spec, model file, factory or weights file that cannot give a model (one line, names it)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a user's model comes from: a Python file or an importable module, and an attribute in it."""
    path: Path | None
    module: str | None
    attribute: str

    def __str__(self) -> str:
        return f"{self.path if self.path is not None else self.module}:{self.attribute}"


def parse_model_spec(text: str) -> ModelSpec:
    """The spec `text` split at its last ':' into a source and an attribute.

    Rules: the source is a file if it ends in .py, otherwise it must be a dotted module name; the
    attribute must be a dotted Python name. Anything else is a UserModelError naming `text` and the
    two forms. Example: "nets/small.py:Models.tiny" -> ModelSpec(Path("nets/small.py"), None,
    "Models.tiny"); "torchvision.models:resnet18" -> ModelSpec(None, "torchvision.models", "resnet18");
    "a.py:" -> UserModelError("--model 'a.py': expected ... (nothing after ':')").
    """
    source, colon, attribute = text.rpartition(":")
    problem = _spec_problem(source, colon, attribute)
    if problem:
        raise UserModelError(f"--model {text!r}: expected {SPEC_FORMS} ({problem})")
    if source.endswith(".py"):
        return ModelSpec(Path(source), None, attribute)
    return ModelSpec(None, source, attribute)


def _spec_problem(source: str, colon: str, attribute: str) -> str | None:
    if not colon:
        return "no ':'"
    if not source:
        return "nothing before ':'"
    if not attribute:
        return "nothing after ':'"
    if not _is_dotted_name(attribute):
        return f"{attribute!r} is not a Python name"
    if not source.endswith(".py") and not _is_dotted_name(source):
        return f"{source!r} is neither a .py file nor a dotted module name"
    return None


def _is_dotted_name(text: str) -> bool:
    """Whether `text` is a dotted Python name: "Models.small" yes, "1a", "a..b" and "a.class" no."""
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in text.split("."))


def load_user_model(spec: str, weights: Path | None = None) -> nn.Module:
    """The nn.Module that `spec` names, with the state_dict of `weights` if given, in eval mode.

    A weights file with an unknown suffix, or none at all, fails before the user's code runs.
    Example: load_user_model("small.py:build", Path("small.pt")) runs small.py, calls build() and
    loads small.pt into the result after fitted_state has checked it.
    """
    parsed = parse_model_spec(spec)
    read_weights = None if weights is None else _weights_reader(Path(weights))
    namespace = _import_file(parsed.path) if parsed.path is not None else _import_module(parsed.module)
    model = _instantiate(_find_attribute(namespace, parsed), parsed)
    if read_weights is not None:
        state = fitted_state(read_weights(Path(weights), model, spec), model, Path(weights), spec)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:  # a module's own _load_from_state_dict may still refuse
            raise UserModelError(f"{weights}: load_state_dict refused it ({_one_line(err)})") from None
    return model.eval()


def _import_file(path: Path) -> ModuleType:
    """The Python file `path` run as a new module, as `python path` would run it.

    Its folder is first on sys.path while it runs (so it can import the files beside it) and is taken
    off afterwards; the module is registered in sys.modules under a name no other module has
    (`_intq_user_model_<hex>`), so pickle, dataclasses and inspect find it and nothing clashes.
    """
    if not path.is_file():
        raise UserModelError(f"--model: no such file: {path}" if not path.exists() else f"--model: {path} is not a file")
    name = f"_intq_user_model_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # the user's code: anything may come out of it
        del sys.modules[name]
        raise UserModelError(f"{path}: running it raised {_one_line(err)}") from None
    finally:
        if folder in sys.path:  # the file may have taken it off itself
            sys.path.remove(folder)
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as err:  # importing runs the module's code: anything may come out of it
        hint = f"; {name} is a file, but a model file must end in .py" if Path(name).is_file() else ""
        raise UserModelError(f"--model: cannot import {name} ({_one_line(err)}){hint}") from None


def _find_attribute(namespace: ModuleType, spec: ModelSpec) -> object:
    """The object the dotted attribute of `spec` names in `namespace`; if a part is missing, a
    UserModelError listing what the object looked in does define (see _candidates)."""
    value = namespace
    parts = spec.attribute.split(".")
    for depth, part in enumerate(parts):
        owner, value = value, getattr(value, part, MISSING)
        if value is MISSING:
            where = spec.path if spec.path is not None else spec.module
            if depth:
                where = f"{'.'.join(parts[:depth])} in {where}"
            raise UserModelError(f"{spec}: no {part!r} in {where}; {_defined(owner, namespace.__name__)}")
    return value


def _defined(owner: object, module_name: str) -> str:
    """What a spec could name in `owner`: its public nn.Module instances, and the classes and
    functions defined in the user's module (not the ones it imports). Example: "it defines: Net,
    build, instance"; at most SHOWN_NAMES, then how many in all."""
    names = sorted(name for name, item in getattr(owner, "__dict__", {}).items() if not name.startswith("_")
                   and (isinstance(item, nn.Module) or getattr(item, "__module__", None) == module_name))
    if not names:
        return "it defines no nn.Module instance, class or function"
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else ""
    return f"it defines: {', '.join(names[:SHOWN_NAMES])}{more}"


def _instantiate(target: object, spec: ModelSpec) -> nn.Module:
    """`target` itself if it is an nn.Module, else what calling it with no arguments returns, which must
    be one. Example: a class Net -> Net(); a function build -> build(); the integer 3 -> UserModelError."""
    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise UserModelError(f"{spec}: {spec.attribute} is a {type(target).__name__}, "
                             f"not an nn.Module or a class or function that builds one")
    try:
        model = target()
    except (Exception, SystemExit) as err:  # the user's code: anything may come out of it
        raise UserModelError(f"{spec}: calling {spec.attribute}() raised {_one_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise UserModelError(f"{spec}: {spec.attribute}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _weights_reader(path: Path) -> Callable[[Path, nn.Module, str], dict[str, torch.Tensor]]:
    """The reader for the suffix of weights file `path` (READERS), once the file is known to exist
    and not to be empty."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserModelError(f"--weights {path}: unknown format {path.suffix or '(no suffix)'!r}; "
                             f"accepted: {', '.join(READERS)}")
    if not path.is_file():
        raise UserModelError(f"--weights: no such file: {path}")
    if path.stat().st_size == 0:
        raise UserModelError(f"{path}: empty file")
    return reader


def _read_torch(path: Path, model: nn.Module, spec: str) -> dict[str, torch.Tensor]:
    """A state_dict saved with torch.save, read by PyTorch's weights_only loader, which refuses any
    pickled class or function (a whole module saved with torch.save(model), a custom object)."""
    try:
        with warnings.catch_warnings():  # the refusal below says what matters; its warnings repeat it
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise UserModelError(f"{path}: not a readable PyTorch file ({_one_line(err)})") from None
        raise UserModelError(f"{path}: not a plain state_dict (PyTorch's weights_only loader refused it: "
                             f"{_refusal_reason(err)}); save model.state_dict() instead") from None
    except Exception as err:  # an untrusted file in PyTorch's reader: truncated zips, bad keys, short reads
        raise UserModelError(f"{path}: not a readable PyTorch file, truncated or corrupt "
                             f"({_first_sentence(err)})") from None
    return _state_dict_in(loaded, path)


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """The line of PyTorch's weights_only refusal that says what it met, without the advice around it.
    Example: "Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global by
    default" (a whole nn.Linear saved with torch.save)."""
    message = ANSI_ESCAPE.sub("", str(err))
    _, found, reason = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    if not found or not lines:
        return message.strip().splitlines()[0]
    return lines[0].split(". Please use")[0].rstrip(".")


def _state_dict_in(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """`loaded` if it maps str to tensors, or the one such dict a training checkpoint keeps under
    "state_dict", "model" or "model_state_dict" (beside, say, "optimizer" and "epoch")."""
    if isinstance(loaded, dict) and not _is_state_dict(loaded):
        wrappers = [key for key in CHECKPOINT_KEYS if key in loaded]
        if len(wrappers) == 1:
            loaded = loaded[wrappers[0]]
    if not _is_state_dict(loaded):
        raise UserModelError(f"{path}: holds {_describe(loaded)}, not a state_dict (a dict of names to tensors)")
    return dict(loaded)


def _is_state_dict(loaded: object) -> bool:
    return isinstance(loaded, dict) and all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                            for key, value in loaded.items())


def _describe(loaded: object) -> str:
    """What a file holds instead of a state_dict. Example: "a dict whose 'epoch' is a int"."""
    if not isinstance(loaded, dict):
        return f"a {type(loaded).__name__}"
    wrappers = [key for key in CHECKPOINT_KEYS if key in loaded]
    if len(wrappers) > 1:
        return f"a checkpoint with {len(wrappers)} candidate state_dicts ({', '.join(wrappers)})"
    key, value = next((key, value) for key, value in loaded.items()
                      if not (isinstance(key, str) and isinstance(value, torch.Tensor)))
    return f"a dict whose {key!r} is a {type(value).__name__}"


def _read_safetensors(path: Path, model: nn.Module, spec: str) -> dict[str, torch.Tensor]:
    require("safetensors", "reading .safetensors weights")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise UserModelError(f"{path}: not a readable .safetensors file ({_one_line(err)})") from None


def _read_npz(path: Path, model: nn.Module, spec: str) -> dict[str, torch.Tensor]:
    """A checkpoint of `intq train`, every array checked against the model by read_checkpoint."""
    try:
        return read_checkpoint(path, model.state_dict(), spec)
    except CheckpointError as err:
        raise UserModelError(str(err)) from None


READERS = {".pt": _read_torch, ".pth": _read_torch, ".bin": _read_torch, ".safetensors": _read_safetensors,
           ".npz": _read_npz}  # weights suffix -> reader(path, model, spec)


def fitted_state(state: dict[str, torch.Tensor], model: nn.Module, weights: Path, spec: str) -> dict[str, torch.Tensor]:
    """`state` checked against `model.state_dict()` and cast to its dtypes, ready for a strict load.

    Rules: a uniform DataParallel prefix "module." is stripped; the keys are the model's (a missing
    BatchNorm `num_batches_tracked` counter, absent from older checkpoints, keeps the model's value);
    every shape is the model's; a tensor is floating where the model's is (cast to the model's dtype,
    float64 -> float32) and not floating where it is not; every floating value is finite. Example:
    the weights of nn.Conv2d(3, 16, 3) for nn.Conv2d(3, 6, 5) -> UserModelError("w.pt does not fit
    m.py:build: weight has shape (16, 3, 3, 3), the model's is (6, 3, 5, 5); bias has shape (16,),
    the model's is (6,)").
    """
    expected = model.state_dict()
    state = _without_data_parallel_prefix(state, expected)
    counters = {key: value for key, value in expected.items()
                if key.rpartition(".")[2] == "num_batches_tracked" and key not in state}
    state = {**state, **counters}
    problems = _mismatches(state, expected)
    if problems:
        raise UserModelError(f"{weights} does not fit {spec}: {'; '.join(problems)}")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise UserModelError(f"{weights}: {key} holds {count} non-finite value(s) (NaN or inf)")
    return {key: state[key].to(expected[key].dtype) for key in expected}


def _without_data_parallel_prefix(state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    """`state` with "module." taken off every key when every key has it and the model's keys do not.
    Example: {"module.fc.weight": w} -> {"fc.weight": w} for a model whose key is "fc.weight"."""
    prefixed = state and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state)
    if not prefixed or any(key.startswith(DATA_PARALLEL_PREFIX) for key in expected):
        return state
    return {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state.items()}


def _mismatches(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from fitting the model: the first SHOWN_SHAPES shape or dtype mismatches
    with both sides, then the missing and the unexpected keys. Example: ["conv1.weight has shape
    (16, 3, 3, 3), the model's is (6, 3, 5, 5)", "2 missing keys (fc.weight, fc.bias)"]."""
    wrong = []
    for key, want in expected.items():
        have = state.get(key)
        if have is None:
            continue
        if have.shape != want.shape:
            wrong.append(f"{key} has shape {tuple(have.shape)}, the model's is {tuple(want.shape)}")
        elif have.is_floating_point() != want.is_floating_point():
            wrong.append(f"{key} is {_dtype_name(have)}, the model's is {_dtype_name(want)}")
    problems = wrong[:SHOWN_SHAPES]
    if len(wrong) > SHOWN_SHAPES:
        problems.append(f"{len(wrong) - SHOWN_SHAPES} more tensors that do not fit")
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    problems += [_key_list(keys, kind) for keys, kind in ((missing, "missing"), (unexpected, "unexpected")) if keys]
    return problems


def _key_list(keys: list[str], kind: str) -> str:
    """Example: _key_list(["fc.weight", "fc.bias"], "missing") -> "2 missing keys (fc.weight, fc.bias)"."""
    more = ", ..." if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {kind} key{'s' if len(keys) > 1 else ''} ({', '.join(keys[:SHOWN_KEYS])}{more})"


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _one_line(err: BaseException) -> str:
    """The type and the first line of an exception. Example: "ZeroDivisionError: division by zero";
    an exception without a message gives its type alone ("EOFError")."""
    lines = ANSI_ESCAPE.sub("", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _first_sentence(err: BaseException) -> str:
    """_one_line up to its first ". ", for messages that go on with advice. Example: "RuntimeError:
    PytorchStreamReader failed reading zip archive: failed finding central directory"."""
    return _one_line(err).split(". ")[0]
