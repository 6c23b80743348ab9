"""Optional dependencies. The core (capture, convert, the reference executor, the model file) needs
torch and numpy only; reports need matplotlib (`intq[report]`), the ONNX paths onnx and onnxruntime
(`intq[onnx]`), reading image folders Pillow (`intq[data]`), reading a user's .safetensors weights
safetensors (`intq[weights]`), `intq compare`'s torchao pt2e row torchao (`intq[peer]`), the model zoo
torchvision (`intq[zoo]`); `intq[all]` brings everything.
`require` is called where a part first needs its extra, so a missing one is one clear line."""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"matplotlib": "report", "onnx": "onnx", "onnxruntime": "onnx", "PIL": "data",
          "safetensors": "weights", "torchao": "peer", "torchvision": "zoo"}  # module -> extra


class MissingExtraError(Exception):
    """A command needs an optional dependency that is not installed (names it and how to install it)."""


def require(module: str, purpose: str) -> ModuleType:
    """The imported `module`, or MissingExtraError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module.split(".")[0]]
        raise MissingExtraError(f"{purpose} needs {module}, which is not installed: pip install 'intq[{extra}]' "
                                f"(or 'intq[all]')") from None
