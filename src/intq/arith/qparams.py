"""Quantization parameters and the affine mapping between reals and integers.

The one convention of intq (docs/math.md, eq. 1):

    real = scale * (q - zero_point),   scale > 0, zero_point an integer, q in [qmin, qmax].

Rounding is half away from zero everywhere (eq. 2); saturation is a clamp to [qmin, qmax].
Values are torch tensors at run time; scales and zero points are held as numpy arrays so that a
QParams is plain data that saves without pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch


@dataclass(frozen=True)
class IntType:
    """A b-bit two's-complement (signed) or unsigned integer type."""

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise ValueError(f"bit width must be in 2..32, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


INT8 = IntType(8, True)
UINT8 = IntType(8, False)
INT32 = IntType(32, True)


class Scheme(Enum):
    """How a range [lo, hi] becomes (scale, zero_point) (eq. 3-5).

    SYMMETRIC:  z = 0, s = max(|lo|, |hi|) / qmax' with qmax' = 2^(b-1) - 1 signed (the range maps
                onto -qmax'..qmax', one code short of qmin), qmax' = 2^b - 1 unsigned.
    ASYMMETRIC: s = (hi - lo) / (qmax - qmin), z = round(qmin - lo / s).
    SPAN:       z = 0, s = (hi - lo) / (qmax - qmin): the seed study's bookkeeping, a range
                width spread over all 2^b codes but used symmetrically around zero.
    """

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"
    SPAN = "span"


@dataclass(frozen=True, eq=False)
class QParams:
    """scale (float64) and zero_point (int64): shape () per tensor, (C,) per channel on `axis`."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: IntType
    axis: int | None = None

    def broadcast_shape(self, ndim: int) -> tuple[int, ...]:
        """Shape that broadcasts the parameters against a tensor of `ndim` dimensions."""
        if self.axis is None:
            return ()
        shape = [1] * ndim
        shape[self.axis] = -1
        return tuple(shape)


def round_half_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """round(x) with ties away from zero (eq. 2): 2.5 -> 3, -2.5 -> -3, 2.4999 -> 2.

    Computed as sign(x) * (floor(|x|) + [|x| - floor(|x|) >= 1/2]); the fraction is exact in
    floating point, unlike floor(|x| + 0.5), which rounds 0.49999997f up to 1 in float32.
    """
    magnitude = x.abs()
    whole = torch.floor(magnitude)
    rounded = whole + (magnitude - whole >= 0.5).to(x.dtype)
    return torch.where(x < 0, -rounded, rounded)


def _widen_to_zero(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi] widened to contain 0, so that real 0 has an exact code (padding, ReLU)."""
    return np.minimum(lo, 0.0), np.maximum(hi, 0.0)


def choose_qparams(
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    dtype: IntType,
    scheme: Scheme,
    *,
    restricted: bool = False,
    axis: int | None = None,
) -> QParams:
    """(scale, zero_point) covering [lo, hi] (eq. 3-5).

    Symmetric int8 of [-0.5, 0.6] restricted: s = 0.6 / 127 = 0.0047244, z = 0. Asymmetric uint8
    of [0, 10.2]: s = 10.2 / 255 = 0.04, z = 0. A zero-width range (an all-zero tensor) gets
    s = 1, z = 0 (or qmin for unsigned): every value is exactly representable, nothing divides by 0.
    `restricted` (signed types) counts codes from qmin' = -(2^(b-1) - 1): it changes ASYMMETRIC and
    SPAN scales (2^b - 2 steps) and z's clip; a SYMMETRIC signed scale is the same with or without
    it, since it always divides by qmax = 2^(b-1) - 1. Either way the restriction sets only the
    scale, not the type: `quantize` clamps to the full [qmin, qmax], so a value beyond [lo, hi] (a
    weight outside an mse, n-sigma or percentile range) reaches qmin = -2^(b-1) (-128 at 8 bits, -2
    at 2 bits), whose negation does not fit the type. Nothing negates q_w; the overflow bound (eq. 11)
    sums |q_w| and counts 2^(b-1) for it.
    """
    lo, hi = _widen_to_zero(np.asarray(lo, np.float64), np.asarray(hi, np.float64))
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"range is not finite: lo={lo}, hi={hi}")
    qmin, qmax = dtype.qmin + (1 if restricted and dtype.signed else 0), dtype.qmax
    if scheme is Scheme.SYMMETRIC:
        scale = np.maximum(-lo, hi) / (qmax if dtype.signed else qmax - qmin)
        zero_point = np.full(scale.shape, 0 if dtype.signed else qmin, np.int64)
    else:
        scale = (hi - lo) / (qmax - qmin)
        if scheme is Scheme.ASYMMETRIC:
            safe = np.where(scale > 0, scale, 1.0)
            zero_point = _round_np(qmin - lo / safe).astype(np.int64)
        else:
            zero_point = np.zeros(scale.shape, np.int64)
    degenerate = scale <= 0
    scale = np.where(degenerate, 1.0, scale)
    zero_point = np.where(degenerate, 0 if dtype.signed else qmin, zero_point)
    return QParams(scale.astype(np.float64), np.clip(zero_point, qmin, qmax).astype(np.int64), dtype, axis)


def _round_np(x: np.ndarray) -> np.ndarray:
    """Numpy twin of round_half_away_from_zero, for offline parameter arithmetic."""
    return round_half_away_from_zero(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _params_like(qp: QParams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = qp.broadcast_shape(x.dim())
    scale = torch.as_tensor(qp.scale, dtype=torch.float64, device=x.device).reshape(shape)
    zero = torch.as_tensor(qp.zero_point, dtype=torch.int64, device=x.device).reshape(shape)
    return scale, zero


def quantize(r: torch.Tensor, qp: QParams) -> torch.Tensor:
    """q = clamp(round(r / s) + z, qmin, qmax) as int64 (eq. 6), rounding half away from zero.

    Example: r = 0.3, s = 0.1, z = 0 -> 3; r = 100, int8 -> 127 (saturated); r = -100 -> -128, the
    type's qmin even for weights whose scale came from a restricted range (eq. 3). Computed in float64.
    """
    scale, zero = _params_like(qp, r)
    q = round_half_away_from_zero(r.to(torch.float64) / scale).to(torch.int64) + zero
    return q.clamp(qp.dtype.qmin, qp.dtype.qmax)


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """r_hat = s * (q - z) (eq. 1), computed in float64 and returned as `dtype`."""
    scale, zero = _params_like(qp, q)
    return (scale * (q.to(torch.int64) - zero).to(torch.float64)).to(dtype)


def torch_dtype(int_type: IntType) -> torch.dtype:
    """The narrowest torch integer dtype that holds every value of `int_type`."""
    if int_type.signed:
        for bits, dtype in ((8, torch.int8), (16, torch.int16), (32, torch.int32)):
            if int_type.bits <= bits:
                return dtype
    elif int_type.bits <= 8:
        return torch.uint8
    elif int_type.bits <= 15:
        return torch.int16
    return torch.int64
