"""The elementwise activations capture recognises: ReLU clamps (fused into the requantizer before them
where they can be) and the functions that become lookup tables (Activation, docs/math.md eq. 29), from
modules, functions and methods, inplace forms included (the capture's check proves the graph equal)."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from intq.arith.lookup import lookup_problem


@dataclass(frozen=True)
class ReLU:
    """max(x, 0), or min(max(x, 0), upper) for ReLU6 / clamp(0, upper) / hardtanh(0, upper)."""

    upper: float | None = None


@dataclass(frozen=True)
class Activation:
    """An elementwise f(x) that becomes a lookup table (eq. 29): `kind` and `params` as in arith/lookup.py's
    ACTIVATIONS (sigmoid, hardsigmoid, hardswish, silu, tanh, gelu, gelu_tanh, leaky_relu, hardtanh)."""

    kind: str
    params: dict = field(default_factory=dict)


def _activation(kind: str, params: dict | None = None) -> Activation | None:
    """Activation(kind, params) when intq can tabulate it (lookup_problem), else None (unsupported)."""
    params = params or {}
    return Activation(kind, params) if lookup_problem(kind, params) is None else None


def _bound(value) -> float | None:
    """A clamp bound given as a plain number, else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# The modules without parameters that become lookup tables (GELU, LeakyReLU and Hardtanh read theirs).
MODULE_ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.Hardswish: "hardswish", nn.SiLU: "silu",
                      nn.Tanh: "tanh"}
GELU_KINDS = {"none": "gelu", "tanh": "gelu_tanh"}  # GELU's `approximate` -> the kind
ELEMENTWISE_MODULES = (nn.ReLU, nn.Hardtanh, *MODULE_ACTIVATIONS, nn.GELU, nn.LeakyReLU)  # ReLU6 is a Hardtanh


def activation_module(module: nn.Module) -> ReLU | Activation | None:
    """The op of an activation module (inplace or not; one of ELEMENTWISE_MODULES), or None: ReLU,
    ReLU6 and Hardtanh(0, max) are ReLU clamps, the others lookup tables."""
    if isinstance(module, nn.ReLU):
        return ReLU()
    if isinstance(module, nn.ReLU6):
        return ReLU(6.0)
    if isinstance(module, nn.Hardtanh) and module.min_val == 0 and module.max_val > 0:
        return ReLU(float(module.max_val))
    if type(module) in MODULE_ACTIVATIONS:
        return _activation(MODULE_ACTIVATIONS[type(module)])
    if isinstance(module, nn.GELU) and module.approximate in GELU_KINDS:
        return _activation(GELU_KINDS[module.approximate])
    if isinstance(module, nn.LeakyReLU):
        return _activation("leaky_relu", {"negative_slope": float(module.negative_slope)})
    if isinstance(module, nn.Hardtanh):  # bounds a requantizer's clamp cannot take (ReLU6 and (0, max) are ReLUs)
        return _activation("hardtanh", {"min": float(module.min_val), "max": float(module.max_val)})
    return None


# The functions and methods without parameters that become lookup tables (inplace forms included).
FUNCTION_ACTIVATIONS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                        torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh", "tanh_": "tanh", F.silu: "silu",
                        F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid"}
ACTIVATION_FUNCTIONS = (*FUNCTION_ACTIVATIONS, F.gelu, F.leaky_relu)  # what activation_call takes


def _argument(node: torch.fx.Node, position: int, names: tuple[str, ...], default):
    """A call's argument by position (after the input) or by any of its keyword names."""
    if len(node.args) > position:
        return node.args[position]
    return next((node.kwargs[name] for name in names if name in node.kwargs), default)


INPLACE_RELUS = (F.relu_, torch.relu_, "relu_")  # Tensor.relu_() and friends: max(x, 0) in place
INPLACE_CLAMPS = (torch.clamp_, "clamp_", F.hardtanh_)
# The position of `inplace` in the functions that take it (after the input, and their own parameters).
INPLACE_POSITION = {F.relu: 1, F.relu6: 1, F.hardsigmoid: 1, F.hardswish: 1, F.silu: 1, F.leaky_relu: 2,
                    F.hardtanh: 3, F.dropout: 3, F.dropout2d: 3}


def is_inplace(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when the node overwrites its first operand: a module with inplace=True, a call with inplace=True
    (by keyword, or F.relu/hardtanh/... by position), or a method or function whose name ends in "_"
    (relu_, clamp_, add_). Capture then runs the out-of-place op and lets later readers of the operand read
    its result, which is what they see in PyTorch."""
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    if node.kwargs.get("inplace") is True:
        return True
    if node.target is operator.iadd:  # x += y on a tensor adds into x
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    position = INPLACE_POSITION.get(node.target)
    return name.endswith("_") and not name.startswith("__") or (
        position is not None and len(node.args) > position and node.args[position] is True)


def clamp_call(node: torch.fx.Node) -> ReLU | Activation | None:
    """clamp/hardtanh(x, low, high): a ReLU clamp for low = 0 < high (fused into the requantizer when it
    can be), a hardtanh table for other numeric bounds (F.hardtanh's default bounds are -1 and 1)."""
    default = -1.0 if node.target in (F.hardtanh, F.hardtanh_) else None
    low = _bound(_argument(node, 1, ("min", "min_val"), default))
    high = _bound(_argument(node, 2, ("max", "max_val"), None if default is None else 1.0))
    if low is None or high is None:
        return None
    if low == 0 and high > 0:
        return ReLU(high)
    return _activation("hardtanh", {"min": low, "max": high})


def activation_call(node: torch.fx.Node) -> Activation | None:
    """torch.sigmoid, F.silu, F.gelu(approximate), F.leaky_relu(negative_slope), ... as an Activation."""
    if node.target is F.gelu:
        approximate = _argument(node, 1, ("approximate",), "none")
        return _activation(GELU_KINDS[approximate]) if approximate in GELU_KINDS else None
    if node.target is F.leaky_relu:
        slope = _bound(_argument(node, 1, ("negative_slope",), 0.01))
        return None if slope is None else _activation("leaky_relu", {"negative_slope": slope})
    return _activation(FUNCTION_ACTIVATIONS[node.target])
