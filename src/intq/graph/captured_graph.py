"""The captured graph: plain data, a list of `Node(name, op, inputs)` in execution order, the ops small
dataclasses that hold float weights (capture.py builds it from a torch.fx trace), and `run_float`, which
executes it in float (max_pool serves the reference executor's integers too)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from intq.arith.lookup import activation
from intq.arith.preprocessing import STUDY_PREPROCESSING, Preprocessing
from intq.graph.capture_activations import Activation, ReLU
from intq.graph.capture_joins import JOINS, Add, Concat, Mul
from intq.graph.capture_channels import ChannelGather
from intq.graph.integer_model import pool_output_size


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
    """ceil_mode: PyTorch's ceil_mode=True output size (docs/math.md eq. 31)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False


@dataclass(frozen=True)
class Flatten:
    """(N, ...) -> (N, prod(...)): flatten, view and reshape that keep the batch dimension."""


@dataclass(frozen=True)
class Identity:
    """Dropout in eval mode and nn.Identity."""


Op = Conv2d | Linear | ReLU | Activation | MaxPool2d | AvgPool2d | Add | Concat | Mul | Flatten | Identity | ChannelGather
# (an AdaptiveAvgPool2d between trace and capture, which turns it into an AvgPool2d, or an Identity whose
# replication it folds into the Linear after it)
WEIGHTED = (Conv2d, Linear)
REQUANTIZING = (Conv2d, Linear, Add, Concat, Mul, AvgPool2d)  # ops whose output needs its own quantization


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
    equalized: bool = False  # cross-layer equalization rescaled its channels (ptq/equalization.py, eq. 36)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def weighted(self) -> list[Node]:
        return [n for n in self.nodes if isinstance(n.op, WEIGHTED)]


def with_users(graph: Graph) -> Graph:
    graph.users = {n.name: [] for n in graph.nodes}
    graph.users[graph.input_name] = []
    for node in graph.nodes:
        for source in node.inputs:
            graph.users[source].append(node.name)
    return graph


def max_pool(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
             padding: tuple[int, int] = (0, 0), ceil_mode: bool = False) -> torch.Tensor:
    """Max-pool of a float or integer (N, C, H, W) tensor.

    Without padding: the elementwise maximum of the kh*kw strided views, one per window offset;
    several times faster than F.max_pool2d on CPU, and it works on integer dtypes. Padding (and the
    bottom/right cells that eq. 31's ceil_mode windows reach past the input) holds the type's minimum,
    so each window's maximum is over its part inside the input.
    """
    (kh, kw), (sh, sw) = kernel_size, stride
    if any(padding) or ceil_mode:
        if x.is_floating_point():
            return F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)
        (ph, pw), (height, width) = padding, x.shape[2:]
        extra_h = (pool_output_size(height, kh, sh, ph, ceil_mode) - 1) * sh + kh - (height + 2 * ph)
        extra_w = (pool_output_size(width, kw, sw, pw, ceil_mode) - 1) * sw + kw - (width + 2 * pw)
        x = F.pad(x.to(torch.int32), (pw, pw + max(extra_w, 0), ph, ph + max(extra_h, 0)),
                  value=torch.iinfo(x.dtype).min).to(x.dtype)
    out_h, out_w = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    result = None
    for i in range(kh):
        for j in range(kw):
            view = x[:, :, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw]
            result = view if result is None else torch.maximum(result, view)
    return result


def apply_op(op: Op, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Run one captured op in float (`others`: the second operand of an Add or Mul, the rest of a Concat's)."""
    if isinstance(op, (*JOINS, ChannelGather)):
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
        return max_pool(x, op.kernel_size, op.stride, op.padding, op.ceil_mode)
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
