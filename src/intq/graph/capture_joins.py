"""The captured ops that join several tensors: the residual Add (-> QAdd, eq. 17) and torch.cat (or
torch.concat, torch.concatenate) along channels (issue 13, part 1; -> QConcat, eq. 30), any other dim being a `Refused(reason)` naming it;
and which fx nodes each captured op reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from intq.graph.capture_rewrites import Refused

CHANNEL_DIMS = (1, -3)  # NCHW
CONCATS = (torch.cat, torch.concat, torch.concatenate)  # one function, three spellings


@dataclass(frozen=True)
class Add:
    """Elementwise sum of two tensors (a residual connection)."""


@dataclass(frozen=True)
class Concat:
    """torch.cat of two or more (N, C_i, H, W) tensors along channels (dim 1, or -3)."""

    def apply(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)  # (N, C_i, H, W) -> (N, sum C_i, H, W)


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


def operand_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The fx nodes an op reads: a cat's list of tensors, else the node's own tensor arguments."""
    args = _tensors(node) if node.target in CONCATS else node.args
    return [a for a in args if isinstance(a, torch.fx.Node)]
