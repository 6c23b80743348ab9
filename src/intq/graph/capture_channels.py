"""Channel moves at capture (issue 13, part 4): channel shuffles and channel slices -> one ChannelGather.

Shape arithmetic (x.size(), x.shape, their items, // and * on them) is resolved at capture's example:
`ChannelMoves` runs the traced model once on it and keeps every node's value. A chain of view, reshape,
transpose, permute, contiguous, flatten, chunk, split, narrow and indexing is not captured step by step:
a tensor of positions (the flat index of each element of the chain's first tensor) is pushed through it
instead, and where a captured op reads the chain's end, `channel_move` reads off what the chain did --
nothing, a flatten of all but the batch dimension, or a move of whole channels (output channel k is
input channel indices[k] at every batch element and position: a ChannelGather, eq. 33) -- or refuses it
naming both shapes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from intq.graph.capture_rewrites import Refused

CHAIN_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "chunk", "split",
                 "narrow", "swapaxes"}
CHAIN_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.chunk,
                   torch.split, torch.narrow, torch.swapaxes, operator.getitem}

FLATTENS = ("flatten", torch.flatten)


@dataclass(frozen=True)
class ChannelGather:
    """(N, C, H, W) -> (N, K, H, W): output channel k is input channel indices[k] (eq. 33)."""

    indices: tuple[int, ...]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, torch.tensor(self.indices, dtype=torch.long, device=x.device))


def _holds_tensors(value) -> bool:
    return isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list))
                                               and any(isinstance(v, torch.Tensor) for v in value))


def _positions(shape: tuple[int, ...]) -> torch.Tensor:
    """The flat index of each element of a tensor of `shape` (row-major), as int64."""
    return torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64).reshape(shape)


def channel_move(positions, shape: tuple[int, ...]) -> str | ChannelGather | Refused:
    """What a chain did to a tensor of `shape`, read off `positions` (where each of its output values came
    from, as flat indices p = ((n C + c) H + h) W + w of the input): "identity"; "flatten" for
    (N, C, H, W) -> (N, C H W) in order; ChannelGather(indices) when output (n, k, h, w) came from input
    (n, indices[k], h, w) at every n, h, w; else Refused naming both shapes."""
    if not isinstance(positions, torch.Tensor):
        return Refused("a tuple of tensors (chunk/split) used whole; take its items")
    numel, out = positions.numel(), tuple(positions.shape)
    if out == tuple(shape) and torch.equal(positions, _positions(shape)):
        return "identity"
    if len(shape) >= 2 and numel == _positions(shape).numel() and out == (shape[0], numel // max(shape[0], 1)) \
            and torch.equal(positions, _positions(out)):
        return "flatten"
    if len(shape) == 4 and len(out) == 4 and (out[0], *out[2:]) == (shape[0], *shape[2:]) and out[1] >= 1:
        batch, channels, height, width = shape
        plane = height * width
        n, c, hw = positions // (channels * plane), positions // plane % channels, positions % plane
        indices = c[:1, :, :1, :1]
        if torch.equal(n, torch.arange(batch).reshape(batch, 1, 1, 1).expand(out)) and \
                torch.equal(hw, torch.arange(plane).reshape(1, 1, height, width).expand(out)) and \
                torch.equal(c, indices.expand(out)):
            return ChannelGather(tuple(indices.flatten().tolist()))
    return Refused(f"a view/reshape/transpose/slice chain from {tuple(shape)} to {out} that is neither a flatten "
                   f"of all but the batch dimension nor a move of whole channels (the same channel at every batch "
                   f"element and position)")


class _Recorder(torch.fx.Interpreter):
    """Runs a traced module, keeping every node's value."""

    def __init__(self, module: torch.fx.GraphModule):
        super().__init__(module)
        self.values: dict[str, object] = {}

    def run_node(self, node: torch.fx.Node):
        value = super().run_node(node)
        self.values[node.name] = value
        return value


class ChannelMoves:
    """The shape arithmetic and channel chains of a traced model, resolved on `example`."""

    def __init__(self, traced: torch.fx.GraphModule, example: torch.Tensor):
        recorder = _Recorder(traced)
        with torch.no_grad():
            recorder.run(example)
        self.values = recorder.values
        self.chains: dict[str, tuple[str, torch.Tensor]] = {}  # chain node -> (its first tensor, positions)
        self.ended: set[str] = set()

    def is_step(self, node: torch.fx.Node) -> bool:
        """True when `node` is shape arithmetic (its value holds no tensor) or a step of a channel chain,
        which capture skips; a chain step's positions are kept for `ends`."""
        if node.op in ("placeholder", "output", "call_module") or not _holds_tensors(self.values.get(node.name)):
            return node.op in ("call_function", "call_method")
        if node.target not in (CHAIN_METHODS if node.op == "call_method" else CHAIN_FUNCTIONS):
            return False
        sources = [a for a in node.all_input_nodes if _holds_tensors(self.values[a.name])]
        if len(sources) != 1:
            return False
        source = sources[0]
        if source.name not in self.chains and (node.target in FLATTENS
                                               or not isinstance(self.values[source.name], torch.Tensor)):
            return False  # a flatten of a captured tensor is capture's own (flatten_call names its dims);
            # an item of another op's tuple is no channel move
        root, positions = self.chains.get(source.name) or (source.name, _positions(tuple(self.values[source.name].shape)))
        bind = lambda a: positions if a is source else self.values[a.name]  # noqa: E731
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), bind)
        call = getattr(args[0], node.target) if node.op == "call_method" else node.target
        try:
            self.chains[node.name] = (root, call(*(args[1:] if node.op == "call_method" else args), **kwargs))
        except (RuntimeError, TypeError, IndexError):  # not a pure move of values: capture names the node
            return False
        return True

    def ends(self, operands: list[torch.fx.Node]) -> list[tuple[torch.fx.Node, str, str | ChannelGather | Refused]]:
        """The chains ending at `operands` not returned before: (the chain's last node, its first tensor,
        what the chain did to that tensor: channel_move)."""
        ends = []
        for operand in operands:
            if operand.name in self.chains and operand.name not in self.ended:
                self.ended.add(operand.name)
                root, positions = self.chains[operand.name]
                ends.append((operand, root, channel_move(positions, tuple(self.values[root].shape))))
        return ends
