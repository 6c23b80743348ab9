"""The captured ops that join several tensors: the residual Add (-> QAdd, eq. 17), torch.cat (or
torch.concat, torch.concatenate) along channels (issue 13, part 1; -> QConcat, eq. 30), any other dim
being a `Refused(reason)` naming it, and the elementwise product of two tensors (issue 13, part 2;
-> QMul, eq. 34: a squeeze-excite gate, equal shapes or (N, C, 1, 1) against (N, C, H, W)), a constant
factor being refused; and which fx nodes each captured op reads."""
from __future__ import annotations

from dataclasses import dataclass

import operator

import torch
import torch.fx

from intq.graph.capture_rewrites import Refused

CHANNEL_DIMS = (1, -3)  # NCHW
CONCATS = (torch.cat, torch.concat, torch.concatenate)  # one function, three spellings


@dataclass(frozen=True)
class Add:
    """Elementwise sum of two tensors (a residual connection)."""

    def apply(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


@dataclass(frozen=True)
class Concat:
    """torch.cat of two or more (N, C_i, H, W) tensors along channels (dim 1, or -3)."""

    def apply(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)  # (N, C_i, H, W) -> (N, sum C_i, H, W)


@dataclass(frozen=True)
class Mul:
    """Elementwise product of two tensors: equal shapes, or (N, C, 1, 1) against (N, C, H, W) in either
    order (torchvision's SqueezeExcitation computes scale * input)."""

    def apply(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    @staticmethod
    def shape_problem(a: torch.Size, b: torch.Size) -> str | None:
        """Why intq cannot multiply tensors of these shapes, or None when it can."""
        if a == b or len(a) == len(b) == 4 and a[:2] == b[:2] and (a[2:] == (1, 1) or b[2:] == (1, 1)):
            return None
        return (f"operands of shapes {tuple(a)} and {tuple(b)}; intq multiplies equal shapes or a (N, C, 1, 1) "
                f"gate by an (N, C, H, W) tensor")


JOINS = (Add, Concat, Mul)  # the captured ops that read every tensor operand (the others read the first)
ADD_TARGETS = (operator.add, operator.iadd, torch.add, "add", "add_")
MUL_TARGETS = (operator.mul, operator.imul, torch.mul, "mul", "mul_")


def _tensors(node: torch.fx.Node):
    return node.args[0] if node.args else node.kwargs.get("tensors")


def concat_call(node: torch.fx.Node) -> Concat | Refused:
    """torch.cat(tensors, dim) of two or more tensors on channels, else Refused naming the dim."""
    tensors = _tensors(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 \
            or not all(isinstance(t, torch.fx.Node) for t in tensors):
        return Refused("torch.cat needs a list of at least two tensors")
    if dim not in CHANNEL_DIMS:
        return Refused(f"torch.cat on dim {dim}; intq concatenates along channels only (dim 1 or -3 of NCHW)")
    return Concat()


def _constant(argument) -> str | None:
    """How a multiplication's operand that is not a traced tensor is named (a number, a module's
    tensor attribute), or None for a traced tensor."""
    if isinstance(argument, torch.fx.Node):
        return f"the constant tensor {argument.target!r}" if argument.op == "get_attr" else None
    return f"the constant {argument!r}"


def mul_call(node: torch.fx.Node) -> Mul | Refused:
    """a * b, torch.mul(a, b) or a.mul(b) of two traced tensors, else Refused naming the constant."""
    if len(node.args) != 2 or node.kwargs:
        return Refused("a product needs exactly two tensor operands and no keywords")
    constants = [name for name in map(_constant, node.args) if name]
    if constants:
        return Refused(f"multiplication by {constants[0]}; intq multiplies two traced tensors only")
    return Mul()


def join_call(node: torch.fx.Node) -> Add | Concat | Mul | Refused | None:
    """The join a call_function / call_method node is (add, cat, mul), Refused(why), or None for any other call."""
    if node.target in ADD_TARGETS and len(node.args) == 2 and not node.kwargs \
            and all(isinstance(a, torch.fx.Node) for a in node.args):
        return Add()
    if node.target in CONCATS:
        return concat_call(node)
    if node.target in MUL_TARGETS:
        return mul_call(node)
    return None


def operand_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The fx nodes an op reads: a cat's list of tensors, else the node's own tensor arguments."""
    args = _tensors(node) if node.target in CONCATS else node.args
    return [a for a in args if isinstance(a, torch.fx.Node)]
