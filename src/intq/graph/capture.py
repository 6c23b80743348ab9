"""torch.fx trace -> a flat graph of the ops intq supports, with BatchNorm folded into its conv.

The captured graph is plain data: a list of `Node(name, op, inputs)` in execution order, ops being
small dataclasses that hold float weights. `run_float` executes it; `capture` checks that it
reproduces the original module on an example input, so a mis-captured model fails loudly.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from intq.arith.lookup import activation
from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing, PreprocessingError
from intq.graph.capture_activations import (ACTIVATION_FUNCTIONS, ELEMENTWISE_MODULES, Activation, ReLU, activation_call,
                                            activation_module, clamp_call)
from intq.graph.capture_rewrites import (DROPOUT_FUNCTIONS, AdaptiveAvgPool2d, Refused, Tracer, adaptive_pool,
                                         conv_padding, dropout_call, flatten_call, flatten_dims, identity_module,
                                         mean_call, pool_window)
from intq.graph.capture_joins import Add, Concat, concat_call, operand_nodes


class CaptureError(Exception):
    """The model cannot be captured; the message names every offending node."""


@dataclass(eq=False)
class Conv2d:
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


@dataclass(eq=False)
class Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class AvgPool2d:
    """Average over k x k windows (no padding); kernel_size None: over the whole feature map."""

    kernel_size: tuple[int, int] | None
    stride: tuple[int, int] | None = None


@dataclass(frozen=True)
class MaxPool2d:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Flatten:
    """(N, ...) -> (N, prod(...)): flatten, view and reshape that keep the batch dimension."""


@dataclass(frozen=True)
class Identity:
    """Dropout in eval mode and nn.Identity."""


Op = Conv2d | Linear | ReLU | Activation | MaxPool2d | AvgPool2d | Add | Concat | Flatten | Identity
# (an AdaptiveAvgPool2d between trace and capture, which turns it into an AvgPool2d)
WEIGHTED = (Conv2d, Linear)
REQUANTIZING = (Conv2d, Linear, Add, Concat, AvgPool2d)  # ops whose output needs its own quantization


@dataclass(eq=False)
class Node:
    name: str
    op: Op
    inputs: tuple[str, ...]


@dataclass(eq=False)
class Graph:
    input_name: str
    nodes: list[Node]
    output_name: str
    users: dict[str, list[str]] = field(default_factory=dict)
    preprocessing: Preprocessing = STUDY_PREPROCESSING  # the float input the model expects (eq. 25)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def weighted(self) -> list[Node]:
        return [n for n in self.nodes if isinstance(n.op, WEIGHTED)]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _from_module(module: nn.Module) -> Op | Refused | None:
    """The captured op of a leaf module, Refused(why) or None when unsupported."""
    if isinstance(module, nn.Conv2d):
        padding = conv_padding(module)
        if isinstance(padding, Refused):
            return padding
        bias = None if module.bias is None else module.bias.detach().clone()
        return Conv2d(module.weight.detach().clone(), bias, _pair(module.stride), _pair(padding),
                      _pair(module.dilation), module.groups)
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach().clone()
        return Linear(module.weight.detach().clone(), bias)
    if isinstance(module, ELEMENTWISE_MODULES):
        return activation_module(module)
    if isinstance(module, nn.AvgPool2d) and module.padding in (0, (0, 0)) and not module.ceil_mode:
        kernel = _pair(module.kernel_size)
        return AvgPool2d(kernel, _pair(module.stride) if module.stride is not None else kernel)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return AvgPool2d(None) if module.output_size in (1, (1, 1)) else adaptive_pool(module.output_size)
    if isinstance(module, nn.MaxPool2d) and module.ceil_mode:
        return Refused("ceil_mode=True (windows past the edge are not supported; use ceil_mode=False or padding)")
    if isinstance(module, nn.MaxPool2d) and not module.ceil_mode and module.dilation in (1, (1, 1)):
        stride = module.stride if module.stride is not None else module.kernel_size
        return MaxPool2d(_pair(module.kernel_size), _pair(stride), _pair(module.padding))
    if isinstance(module, nn.Flatten):
        return flatten_dims(module.start_dim, module.end_dim) or Flatten()
    if isinstance(module, nn.Identity):
        return Identity()
    identity = identity_module(module)
    if identity:
        return Identity() if identity is True else identity
    return None


def _from_call(node: torch.fx.Node) -> Op | tuple[Op, ...] | Refused | None:
    """The captured op(s) of a call_function / call_method node, Refused(why) or None when unsupported."""
    target = node.target
    if target in (F.relu, torch.relu, "relu") and not node.kwargs.get("inplace", False):
        return ReLU()
    if target is F.relu6:
        return ReLU(6.0)
    if target in (torch.clamp, "clamp", F.hardtanh):
        return clamp_call(node)
    if target in ACTIVATION_FUNCTIONS:
        return activation_call(node)
    if target in (operator.add, operator.iadd, torch.add, "add", "add_") and len(node.args) == 2 \
            and all(isinstance(a, torch.fx.Node) for a in node.args) and not node.kwargs:
        return Add()
    if target is torch.cat:
        return concat_call(node)
    if target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return AvgPool2d(None) if size in (1, (1, 1)) else adaptive_pool(size)
    if target in (torch.mean, "mean"):
        return _from_mean(node)
    if target is F.avg_pool2d and len(node.args) >= 2 and not node.kwargs:
        kernel = _pair(node.args[1])
        return AvgPool2d(kernel, _pair(node.args[2]) if len(node.args) > 2 else kernel)
    if target in (torch.flatten, "flatten"):
        return flatten_call(node) or Flatten()
    if target in ("view", "reshape"):
        return Flatten()  # checked against the real shape when the capture is verified
    if target is F.max_pool2d:
        kernel = _pair(node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"])
        stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        return MaxPool2d(kernel, _pair(stride) if stride else kernel)
    if target in DROPOUT_FUNCTIONS:
        identity = dropout_call(node)
        return Identity() if identity is True else identity
    return None


def _from_mean(node: torch.fx.Node) -> tuple[Op, ...] | Refused:
    """A mean over (H, W): a global average pool, then a flatten to (N, C) when keepdim=False."""
    form = mean_call(node)
    if isinstance(form, Refused):
        return form
    return (AvgPool2d(None),) if form == "keepdim" else (AvgPool2d(None), Flatten())


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.name} ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


def trace(model: nn.Module) -> Graph:
    """Symbolically trace `model` into a Graph; BatchNorm2d after a Conv2d is folded into it."""
    try:
        traced = torch.fx.GraphModule(model, Tracer().trace(model))
    except Exception as err:  # fx raises many types; the user needs the reason and the model
        raise CaptureError(f"{type(model).__name__} is not traceable by torch.fx: {err}") from None
    modules = dict(traced.named_modules())
    nodes, unsupported, input_name, output_name = [], [], None, None
    aliases: dict[str, str] = {}  # a folded BatchNorm's output is its conv's output
    for fx_node in traced.graph.nodes:
        if fx_node.op == "placeholder":
            input_name = fx_node.name
            continue
        if fx_node.op == "output":
            output_name = aliases.get(fx_node.args[0].name, fx_node.args[0].name)
            continue
        if fx_node.op == "call_method" and fx_node.target == "size" or fx_node.target is operator.getitem:
            continue  # shape arithmetic for view(x.size(0), -1)
        if fx_node.op == "call_module" and isinstance(modules[fx_node.target], nn.BatchNorm2d):
            if _fold_batchnorm(nodes, fx_node, modules[fx_node.target]):
                aliases[fx_node.name] = fx_node.args[0].name
                continue
            unsupported.append(f"{_describe(fx_node, modules)}: BatchNorm2d must directly follow a Conv2d")
            continue
        op = _from_module(modules[fx_node.target]) if fx_node.op == "call_module" else (
            _from_call(fx_node) if fx_node.op in ("call_function", "call_method") else None)
        if op is None or isinstance(op, Refused):
            unsupported.append(_describe(fx_node, modules) + (f": {op.reason}" if op else ""))
            continue
        sources = tuple(aliases.get(a.name, a.name) for a in operand_nodes(fx_node))
        _append(nodes, fx_node.name, op, sources if isinstance(op, (Add, Concat)) else sources[:1])
    if unsupported:
        raise CaptureError(f"{type(model).__name__}: unsupported operations: " + "; ".join(unsupported))
    return with_users(Graph(input_name, nodes, output_name))


def _append(nodes: list[Node], name: str, op: Op | tuple[Op, ...], inputs: tuple[str, ...]) -> None:
    """One node, or a chain of them for a rewrite into several ops (the last one keeps the fx name)."""
    ops = op if isinstance(op, tuple) else (op,)
    for index, step in enumerate(ops):
        step_name = name if index == len(ops) - 1 else f"{name}_{type(step).__name__.lower()}"
        nodes.append(Node(step_name, step, inputs))
        inputs = (step_name,)


def resolve_adaptive_pools(graph: Graph, example: torch.Tensor, model_name: str) -> None:
    """Turn each AdaptiveAvgPool2d into AvgPool2d(kernel = stride = in/out) at the example's sizes (the
    first place they are known), or refuse naming the node and both sizes."""
    if not any(isinstance(node.op, AdaptiveAvgPool2d) for node in graph.nodes):
        return
    values = {graph.input_name: example}
    for node in graph.nodes:
        inputs = [values[name] for name in node.inputs]
        if isinstance(node.op, AdaptiveAvgPool2d):
            window = pool_window(node.op, inputs[0].shape)
            if isinstance(window, str):
                raise CaptureError(f"{model_name}: {node.name} (AdaptiveAvgPool2d): {window}")
            node.op = AvgPool2d(window, window)
        values[node.name] = apply_op(node.op, *inputs)


def _fold_batchnorm(nodes: list[Node], fx_node: torch.fx.Node, bn: nn.BatchNorm2d) -> bool:
    """Fold BN into the conv that produced its input (eq. 13); the conv keeps its name.

    w' = w * gamma / sqrt(var + eps) per output channel; b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    """
    source = fx_node.args[0]
    conv = next((n for n in nodes if n.name == source.name), None)
    if conv is None or not isinstance(conv.op, Conv2d) or len(source.users) != 1:
        return False
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.op.bias if conv.op.bias is not None else torch.zeros_like(bn.running_mean)
    conv.op.weight = conv.op.weight * factor.reshape(-1, 1, 1, 1)  # (C_out,) -> (C_out, 1, 1, 1)
    conv.op.bias = (bias - bn.running_mean) * factor + beta
    return True


def with_users(graph: Graph) -> Graph:
    graph.users = {n.name: [] for n in graph.nodes}
    graph.users[graph.input_name] = []
    for node in graph.nodes:
        for source in node.inputs:
            graph.users[source].append(node.name)
    return graph


def max_pool(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
             padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Max-pool of a float or integer (N, C, H, W) tensor.

    Without padding: the elementwise maximum of the kh*kw strided views, one per window offset;
    several times faster than F.max_pool2d on CPU, and it works on integer dtypes.
    """
    if any(padding):
        if x.is_floating_point():
            return F.max_pool2d(x, kernel_size, stride, padding)
        ph, pw = padding
        x = F.pad(x.to(torch.int32), (pw, pw, ph, ph), value=torch.iinfo(x.dtype).min).to(x.dtype)
    (kh, kw), (sh, sw) = kernel_size, stride
    out_h, out_w = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    result = None
    for i in range(kh):
        for j in range(kw):
            view = x[:, :, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw]
            result = view if result is None else torch.maximum(result, view)
    return result


def apply_op(op: Op, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Run one captured op in float (`others`: the second operand of an Add, the rest of a Concat's)."""
    if isinstance(op, Add):
        return x + others[0]
    if isinstance(op, Concat):
        return op.apply(x, *others)
    if isinstance(op, AvgPool2d):
        if op.kernel_size is None:
            return x.mean(dim=(2, 3), keepdim=True)
        return F.avg_pool2d(x, op.kernel_size, op.stride)
    if isinstance(op, Conv2d):
        return F.conv2d(x, op.weight, op.bias, op.stride, op.padding, op.dilation, op.groups)
    if isinstance(op, Linear):
        return F.linear(x, op.weight, op.bias)
    if isinstance(op, ReLU):
        return F.relu(x) if op.upper is None else x.clamp(0.0, op.upper)
    if isinstance(op, Activation):
        return activation(op.kind, op.params, x)
    if isinstance(op, MaxPool2d):
        return max_pool(x, op.kernel_size, op.stride, op.padding)
    if isinstance(op, Flatten):
        return x.reshape(x.shape[0], -1)  # (N, C, H, W) -> (N, C*H*W)
    return x


def run_float(graph: Graph, x: torch.Tensor, visit: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Execute the graph in float; `visit(name, value)` sees the input and every node's output."""
    values = {graph.input_name: x}
    if visit:
        visit(graph.input_name, x)
    for node in graph.nodes:
        values[node.name] = apply_op(node.op, *(values[name] for name in node.inputs))
        if visit:
            visit(node.name, values[node.name])
    return values[graph.output_name]


def capture(model: nn.Module, example: torch.Tensor, preprocessing: Preprocessing = STUDY_PREPROCESSING) -> Graph:
    """trace(model), then prove on `example` that the graph computes what the model computes.

    `preprocessing` is how the model's float input comes from uint8 pixels (eq. 25; default: the
    study's (p/255 - 0.5)/0.5); the graph keeps it for calibration and conversion. An `example` of
    uint8 pixels is preprocessed with it; a float one is used as it is (it only proves the graph)."""
    model = model.eval()
    if example.dtype == torch.uint8:
        example = _preprocessed(preprocessing, example)
    graph = trace(model)
    graph.preprocessing = preprocessing
    _check_weights_finite(graph)
    with torch.no_grad():
        try:
            expected = model(example)
        except RuntimeError as err:  # a wrong input shape: name the layer, what it expects and what it got
            _check_input_shape(graph, example, type(model).__name__)
            raise CaptureError(f"{type(model).__name__} fails on input of shape {tuple(example.shape)}: "
                               f"{_first_line(err)}") from None
        try:
            resolve_adaptive_pools(graph, example, type(model).__name__)
            got = run_float(graph, example)
        except RuntimeError as err:
            raise CaptureError(f"{type(model).__name__}: captured graph fails on the example input ({err}); "
                               f"is every view/reshape a flatten of all but the batch dimension?") from None
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise CaptureError(f"{type(model).__name__}: captured graph disagrees with the model; "
                           f"is every view/reshape a flatten of all but the batch dimension?")
    return graph


def _preprocessed(preprocessing: Preprocessing, pixels: torch.Tensor) -> torch.Tensor:
    try:
        return preprocessing.apply(pixels)
    except PreprocessingError as err:
        raise CaptureError(f"the example input: {err}") from None


def _check_weights_finite(graph: Graph) -> None:
    for node in graph.weighted():
        for label, tensor in (("weight", node.op.weight), ("bias", node.op.bias)):
            if tensor is not None and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise CaptureError(f"layer {node.name!r}: {label} has {bad} NaN/Inf values")


def expected_input(op: Op, x: torch.Tensor) -> str | None:
    """What a conv or linear layer needs of its input `x`, when `x` does not provide it, else None:
    a conv needs (N, C_in, H, W) with C_in = weight.shape[1] * groups and H, W at least the dilated
    kernel after padding; a linear needs (N, in_features) with in_features = weight.shape[1]."""
    if isinstance(op, Conv2d):
        channels = op.weight.shape[1] * op.groups
        if x.dim() != 4 or x.shape[1] != channels:
            return f"expects (N, {channels}, H, W), got {tuple(x.shape)}"
        for size, kernel, pad, dilation, axis in zip(x.shape[2:], op.weight.shape[2:], op.padding, op.dilation, "HW"):
            if size + 2 * pad < dilation * (kernel - 1) + 1:
                return f"needs {axis} >= {dilation * (kernel - 1) + 1 - 2 * pad}, got {tuple(x.shape)}"
    if isinstance(op, Linear) and (x.dim() != 2 or x.shape[1] != op.weight.shape[1]):
        return f"expects (N, {op.weight.shape[1]}), got {tuple(x.shape)}"
    return None


def _check_input_shape(graph: Graph, example: torch.Tensor, model_name: str) -> None:
    """Run the graph on `example` (which the model itself failed on), naming the first layer whose
    input has the wrong shape, and the model's input shape, instead of a raw torch error."""
    values = {graph.input_name: example}
    for node in graph.nodes:
        inputs = [values[name] for name in node.inputs]
        problem = expected_input(node.op, inputs[0])
        if problem is not None:
            raise CaptureError(f"{model_name}: layer {node.name!r} {problem} "
                               f"(from an input of shape {tuple(example.shape)})")
        try:
            values[node.name] = apply_op(node.op, *inputs)
        except RuntimeError as err:
            raise CaptureError(f"{model_name}: layer {node.name!r} fails on an input of shape "
                               f"{tuple(example.shape)}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
