"""Capture-level rewrites onto the ops intq already has (issue 13, part 4), so every executor runs them
unchanged: Conv2d(padding="same"/"valid") -> explicit symmetric padding; a mean over (H, W) -> a global
average pool (and a flatten when keepdim=False); AdaptiveAvgPool2d to a size dividing the input -> an
AvgPool2d(in/out, in/out), resolved where the input size is first known (capture's example), and to a
multiple of the input (a replication) folded into the flatten + Linear that reads it; BatchNorm as
y = a x + b (folded or a layer of its own, in capture.py);
flatten from dim 1 (or -3); Dropout, Dropout2d, F.dropout(training=False) and StochasticDepth in eval
-> identity. What cannot be rewritten is a `Refused(reason)` naming the attribute and its value."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
LEAF_NAMES = ("StochasticDepth",)  # modules kept whole by the tracer (torchvision.ops.StochasticDepth)


@dataclass(frozen=True)
class Refused:
    """Why a node cannot be captured: which attribute, which value."""

    reason: str


@dataclass(frozen=True)
class AdaptiveAvgPool2d:
    """An adaptive average pool whose input size is not known yet (trace); capture's example turns it
    into an AvgPool2d with kernel = stride = in/out (resolve_adaptive_pools), or refuses it."""

    output_size: tuple[int | None, int | None]


class Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping modules named in LEAF_NAMES (StochasticDepth) as leaves."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module).__name__ in LEAF_NAMES or super().is_leaf_module(module, qualified_name)


def _argument(node: torch.fx.Node, position: int, name: str, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | Refused:
    """The explicit (pad_h, pad_w) of a Conv2d: its numbers, 0 for "valid", (k - 1) * d / 2 for "same"
    (symmetric only: an even effective kernel (k - 1) * d + 1 would need one more on one side)."""
    if module.padding_mode != "zeros":
        return Refused(f"padding_mode={module.padding_mode!r} (only 'zeros')")
    if module.padding == "valid":
        return (0, 0)
    if module.padding != "same":
        return tuple(module.padding)
    pads = []
    for kernel, dilation in zip(module.kernel_size, module.dilation):
        total = (kernel - 1) * dilation  # the "same" padding, both sides together
        if total % 2:
            return Refused(f"padding='same' with kernel_size={tuple(module.kernel_size)}, "
                           f"dilation={tuple(module.dilation)} needs asymmetric padding (even effective kernel "
                           f"{total + 1}); give an odd kernel or explicit padding")
        pads.append(total // 2)
    return tuple(pads)


def mean_call(node: torch.fx.Node) -> str | Refused | None:
    """x.mean(dims) / torch.mean(x, dims, keepdim): "keepdim" or "flatten" for a mean over (H, W) (a global
    average pool, then a flatten to (N, C) when keepdim=False); others refused naming the dims."""
    dims = _argument(node, 1, "dim", None)
    keepdim = _argument(node, 2, "keepdim", False)
    if node.kwargs.get("dtype") is not None:
        return Refused(f"dtype={node.kwargs['dtype']}")
    if not isinstance(dims, (tuple, list)) or sorted(dims) not in ([2, 3], [-2, -1]):
        return Refused(f"mean over dim={dims} (only the spatial dims (2, 3) or (-2, -1) of (N, C, H, W))")
    return "keepdim" if keepdim else "flatten"


def adaptive_pool(output_size) -> AdaptiveAvgPool2d:
    size = (output_size, output_size) if isinstance(output_size, int) or output_size is None else output_size
    return AdaptiveAvgPool2d(tuple(size))


def pool_window(op: AdaptiveAvgPool2d, shape: torch.Size) -> tuple[int, int] | str:
    """kernel = stride = in/out per axis, for an (N, C, H, W) input `shape`; a reason when out does not divide in."""
    if len(shape) != 4:
        return f"expects (N, C, H, W), got {tuple(shape)}"
    sizes = tuple(shape[2:])
    outputs = tuple(size if out is None else out for size, out in zip(sizes, op.output_size))
    if any(out <= 0 or size % out for size, out in zip(sizes, outputs)):
        return f"output size {outputs} does not divide the input size {sizes}"
    return tuple(size // out for size, out in zip(sizes, outputs))


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor] | Refused:
    """An eval BatchNorm as y = a x + b per channel (eq. 13): a = gamma / sqrt(var + eps),
    b = beta - mean a; refused in training mode or without running statistics (batch statistics)."""
    if bn.training:
        return Refused("in training mode (call model.eval())")
    if bn.running_mean is None or bn.running_var is None:
        return Refused("track_running_stats=False (it normalizes by each batch's statistics)")
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    return factor, beta - bn.running_mean * factor


def replication_factor(op: AdaptiveAvgPool2d, shape: torch.Size) -> tuple[int, int] | None:
    """out/in per axis when each output size is a multiple of the input size (an axis may keep its size):
    each output cell (i, j) then averages the one input cell (i // f_h, j // f_w) (eq. 32); else None."""
    sizes = tuple(shape[2:])
    outputs = tuple(size if out is None else out for size, out in zip(sizes, op.output_size))
    if len(shape) != 4 or any(out <= 0 or out % size for size, out in zip(sizes, outputs)):
        return None
    return tuple(out // size for size, out in zip(sizes, outputs))


def fold_replication(weight: torch.Tensor, channels: int, sizes: tuple[int, int], factor: tuple[int, int]) -> torch.Tensor:
    """The weight of a Linear that reads flatten(replicate(x)) rewritten to read flatten(x) (eq. 32):
    W'[o, c, a, b] = sum over r < f_h, t < f_w of W[o, c, a f_h + r, b f_w + t]; exact in real numbers."""
    (height, width), (fh, fw) = sizes, factor
    blocks = weight.reshape(weight.shape[0], channels, height, fh, width, fw)  # (O, C*H*f_h*W*f_w) -> (O, C, H, f_h, W, f_w)
    return blocks.sum(dim=(3, 5)).reshape(weight.shape[0], channels * height * width)


def flatten_dims(start_dim, end_dim) -> Refused | None:
    """None for a flatten of all but the batch dim (start_dim 1, or -3 on NCHW; end_dim -1), else why not."""
    if start_dim not in (1, -3):
        return Refused(f"flatten with start_dim={start_dim} (only 1, or -3 on (N, C, H, W): the batch dim stays)")
    if end_dim != -1:
        return Refused(f"flatten with end_dim={end_dim} (only -1)")
    return None


def flatten_call(node: torch.fx.Node) -> Refused | None:
    """torch.flatten(x, start_dim, end_dim) and x.flatten(...) (both default to start_dim 0)."""
    return flatten_dims(_argument(node, 1, "start_dim", 0), _argument(node, 2, "end_dim", -1))


def identity_module(module: nn.Module) -> bool | Refused:
    """True for dropout modules and an eval-mode StochasticDepth; Refused for one in training mode."""
    if type(module).__name__ in LEAF_NAMES:
        return Refused("in training mode (call model.eval())") if module.training else True
    return isinstance(module, DROPOUT_MODULES)


def dropout_call(node: torch.fx.Node) -> bool | Refused:
    """F.dropout / F.dropout2d with training=False (their default training=True drops even in eval)."""
    training = _argument(node, 2, "training", True)
    return Refused(f"training={training} (only training=False is the identity)") if training is not False else True


DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
