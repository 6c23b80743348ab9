"""How intq's integer tensors travel through engines whose activations are uint8 (fbgemm, ONNX Runtime).

An intq activation of at most 8 bits, (q, z), signed or not, is the uint8 tensor (q + o, z + o) with
o = -qmin (128 for int8, 64 for int7, 0 for unsigned types): the same reals, real = s (q + o - (z + o))
(eq. 1), so the shift is lossless, and a b-bit type stays in [0, 2^b - 1]. Narrower types (e.g. uint4)
keep their own bounds through an explicit clamp.
Which ops an engine runs on its own kernels and which run as exact integer ops is decided here too.
"""
from __future__ import annotations

import numpy as np
import torch

from intq.graph.integer_model import IntegerModel, QLayer
from intq.arith.qparams import QParams


class EngineError(Exception):
    """A model an engine executor cannot run (names the layer and why)."""


def uint8_offset(qparams: QParams) -> int:
    """o = -qmin of a type of <= 8 bits: 128 for int8, 64 for int7, 0 for unsigned types."""
    if qparams.dtype.bits > 8:
        raise EngineError(f"{qparams.dtype.name} is wider than the engine's 8-bit activations")
    return -qparams.dtype.qmin


def encoded_zero_point(qparams: QParams) -> int:
    """z + o, the zero point of the uint8 encoding."""
    return int(qparams.zero_point) + uint8_offset(qparams)


def to_uint8(q: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """intq integers (q, z) of <= 8 bits as the uint8 codes q + o (eq. 19); uint8 q with o = 0 passes."""
    offset = uint8_offset(qparams)
    return q if offset == 0 and q.dtype == torch.uint8 else (q.to(torch.int16) + offset).to(torch.uint8)


def from_codes(codes: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """Codes q + o (uint8, or raw integers with o = 0) back to intq's integers q in `dtype`."""
    return (codes.to(torch.int64) - offset).to(dtype)


def engine_runs_layer(layer: QLayer, model: IntegerModel) -> bool:
    """True when a conv/linear maps onto an engine's int8 kernel (u8 activations, symmetric s8
    weights, u8 output); False when it runs as the exact integer op instead:
    - an input or output wider than 8 bits (the folded input x = 2p - 255 is int9, eq. 23; int16 logits),
    - weights with non-zero zero points."""
    if layer.input_qparams.dtype.bits > 8 or layer.output_qparams.dtype.bits > 8:
        return False
    return not np.any(np.asarray(layer.weight_qparams.zero_point))


def narrower_bounds(lower: int, upper: int, qparams: QParams, relu_fused: bool) -> tuple[int, int] | None:
    """The encoded clamp [lower + o, upper + o] when it is narrower than what the engine's kernel
    already guarantees ([0, 255], or [z + o, 255] with a fused ReLU); None when no clamp is needed."""
    offset = uint8_offset(qparams)
    kernel_lower = encoded_zero_point(qparams) if relu_fused else 0
    if lower + offset <= kernel_lower and upper + offset >= 255:
        return None
    return lower + offset, upper + offset
