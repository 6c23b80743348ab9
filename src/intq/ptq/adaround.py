"""AdaRound's arithmetic (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"): a learnable choice between floor and ceil of w/s for every weight, on the grid that
the range method chose (docs/math.md eqs. 38-39).

Pure functions on tensors and one small holder, `LayerRounding`, of a layer's grid and its logits V;
reconstruction.py decides what is learned against what.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from intq.arith.qparams import QParams
from intq.graph.convert import grid_neighbours

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (eq. 38)
BETA_START, BETA_END = 20.0, 2.0  # the regularizer's exponent, annealed (eq. 39)
WARM_UP = 0.2  # share of the iterations without the regularizer, the reconstruction alone


def rectified_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1 (eq. 38): reaches
    exactly 0 and 1 at finite V, so the regularizer can settle every weight on a side.
    Example: h(0) = 0.5; h(-3) = 0 (0.047 * 1.2 - 0.1 < 0)."""
    return (torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def initial_logits(fraction: torch.Tensor) -> torch.Tensor:
    """V with h(V) = `fraction` (w/s - floor(w/s), in [0, 1)), the inverse of eq. 38 on its open part:
    V = -log((zeta - gamma) / (fraction - gamma) - 1). Example: fraction 0.5 -> V = 0, so the soft
    weight starts at w itself."""
    return -torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1.0)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta) (eq. 39): 0 when every h is 0 or 1, largest at h = 1/2; a large beta
    leaves h free except near 1/2, a small one pushes every h to a side."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def annealed_beta(iteration: int, iterations: int) -> float | None:
    """The regularizer's beta at `iteration` of `iterations` (eq. 39): None during the first WARM_UP
    share (no regularizer), then linear from BETA_START = 20 down to BETA_END = 2 at the last one.
    Example: of 1000, iteration 100 -> None, 200 -> 20.0, 1000 -> 2.0."""
    start = int(WARM_UP * iterations)
    if iteration < start:
        return None
    progress = (iteration - start) / max(iterations - start, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)


@dataclass(eq=False)
class LayerRounding:
    """One layer's grid and its rounding logits (eq. 38). `floor` holds floor(w/s) + z as float32 codes,
    `free` marks the weights whose w/s is not already an integer (only those may go up), `logits` V."""

    floor: torch.Tensor
    free: torch.Tensor
    logits: torch.Tensor
    scale: torch.Tensor  # s, broadcast against the weight
    zero: torch.Tensor  # z, likewise
    qmin: int
    qmax: int

    @classmethod
    def of(cls, weight: torch.Tensor, qp: QParams) -> "LayerRounding":
        """The grid of `weight` under its QParams, V initialised so that the soft weight is w (clamped)."""
        shape = qp.broadcast_shape(weight.dim())
        scale = torch.as_tensor(qp.scale, dtype=torch.float64).reshape(shape)
        zero = torch.as_tensor(qp.zero_point, dtype=torch.int64).reshape(shape)
        ratio = weight.detach().to(torch.float64) / scale
        fraction = ratio - torch.floor(ratio)
        down, up = grid_neighbours(weight.detach(), qp)
        logits = initial_logits(fraction.to(torch.float32)).requires_grad_(True)
        return cls(torch.floor(ratio).to(torch.float32), up != down, logits, scale.to(torch.float32),
                   zero.to(torch.float32), qp.dtype.qmin, qp.dtype.qmax)

    def soft(self) -> torch.Tensor:
        """h(V) on the free weights, 0 on the others (the value of the 'up' choice, eq. 38)."""
        return rectified_sigmoid(self.logits) * self.free

    def real(self, up: torch.Tensor) -> torch.Tensor:
        """s (clamp(floor(w/s) + up + z, qmin, qmax) - z): the weight the chosen `up` in [0, 1] gives."""
        return self.scale * ((self.floor + up + self.zero).clamp(self.qmin, self.qmax) - self.zero)

    def hard_up(self) -> torch.Tensor:
        """The choice: 1 where h(V) >= 1/2 on a free weight, else 0 (eq. 38)."""
        with torch.no_grad():
            return (self.soft() >= 0.5).to(torch.float32)

    def codes(self) -> torch.Tensor:
        """The integer weights of the choice: clamp(floor(w/s) + up + z, qmin, qmax), int64."""
        with torch.no_grad():
            return (self.floor + self.hard_up() + self.zero).clamp(self.qmin, self.qmax).to(torch.int64)
