"""The arithmetic of fake quantization with learned step sizes (LSQ, Esser et al. 2020), in torch autograd.

Forward, exactly the integer model's grid (docs/math.md eqs. 1, 2, 6):
    x_hat = s * (clamp(round(x / s) + z, qmin, qmax) - z),  round half away from zero.
Backward: round passes its gradient straight through (eq. 41), so autograd gives LSQ's step-size
gradient (eq. 42), which is scaled by g = 1 / sqrt(N * Q_p) (eq. 43).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from intq.arith.qparams import IntType, QParams, Scheme, round_half_away_from_zero

MIN_STEP = 1e-12  # a step size pushed to 0 or below by a gradient step is held here (the grid stays defined)
STEP_FLOOR = 2.0 ** -8  # after every update a learned step is held at >= this fraction of its start (eq. 44)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """round(v) half away from zero forward (eq. 2); d round(v) / dv = 1 backward (straight through, eq. 41)."""
    return v + (round_half_away_from_zero(v) - v).detach()


def scaled_gradient(s: torch.Tensor, g: float) -> torch.Tensor:
    """s forward; its gradient multiplied by g backward (eq. 43): s g + (s - s g) with the second term detached."""
    return s * g + (s - s * g).detach()


def step_gradient_scale(elements: int, dtype: IntType, zero_point: np.ndarray) -> float:
    """g = 1 / sqrt(N * Q_p) (eq. 43): N the values that share one step size (one example's features, or one
    output channel's weights), Q_p the larger number of codes on either side of the zero point (at least 1)."""
    z = np.asarray(zero_point)
    positive = max(int(np.max(dtype.qmax - z)), int(np.max(z - dtype.qmin)), 1)
    return 1.0 / math.sqrt(max(elements, 1) * positive)


def fake_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, dtype: IntType,
                  g: float) -> torch.Tensor:
    """x_hat = s (clamp(round(x / s) + z, qmin, qmax) - z) (eqs. 6, 1), differentiable in x and s (eqs. 41-43).

    `step` and `zero_point` broadcast against x (per tensor: shape (); per channel: (C, 1, ...))."""
    s = scaled_gradient(step.clamp_min(MIN_STEP), g)
    q = (round_ste(x / s) + zero_point).clamp(dtype.qmin, dtype.qmax)
    return s * (q - zero_point)


def step_floor(start: torch.Tensor) -> torch.Tensor:
    """The least value a learned step may take, s_min = 2^-8 s_0 (eq. 44): an update that would push s below it
    (a step can even turn negative when lr x gradient exceeds s) is projected back to it, so that no grid
    collapses and the int32 bias b / (s_x s_w) (eq. 15) stays within 2^16 times its starting magnitude."""
    return start.detach().abs() * STEP_FLOOR


def grid_range(qp: QParams, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """The real range [lo, hi] from which choose_qparams (eqs. 3-5, unrestricted) makes `qp` again:
    ASYMMETRIC lo = s (qmin - z), hi = s (qmax - z); SYMMETRIC signed +-s qmax, unsigned [0, s (qmax - qmin)];
    SPAN s qmin, s qmax. Round trip: the same zero point, the scale to a few ulps."""
    s, z, t = np.asarray(qp.scale, np.float64), np.asarray(qp.zero_point), qp.dtype
    if scheme is Scheme.ASYMMETRIC:
        return s * (t.qmin - z), s * (t.qmax - z)
    if scheme is Scheme.SYMMETRIC:
        return (-s * t.qmax, s * t.qmax) if t.signed else (np.zeros_like(s), s * (t.qmax - t.qmin))
    return s * t.qmin, s * t.qmax
