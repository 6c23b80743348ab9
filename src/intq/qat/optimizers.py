"""The fine-tuning loop's optimizers behind one interface: `lr` (set by the loop before every step),
`zero_grad()`, `step()`. "sgd" is SGD with momentum (cifar.train.MomentumSGD, torch.optim.SGD's
arithmetic); "adam" is torch.optim.Adam, whose per-element normalisation suits a graph with BatchNorm
folded into its weights (docs/math.md eq. 46 says why)."""
from __future__ import annotations

import torch

from intq.cifar.train import MomentumSGD

DEFAULT_LR = {"sgd": 0.01, "adam": 0.0001}  # each one's peak learning rate when none is given
ADAM_BETA2, ADAM_EPS = 0.999, 1e-8


class Adam:
    """Adam (Kingma & Ba 2015) as torch.optim.Adam computes it, one tensor at a time (foreach=False),
    with β1 = `momentum`, β2 = 0.999, ε = 1e-8 (eq. 46): per element, with g its gradient at step t,

        m <- β1 m + (1 - β1) g,  v <- β2 v + (1 - β2) g²,  p <- p - lr (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + ε)

    so the first step moves every element with |g| >> ε by lr sign(g), whatever the scale of its gradient.
    No parameters (the float control has no step sizes): step() does nothing."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float) -> None:
        self.params, self.lr = list(params), lr
        self._adam = (torch.optim.Adam(self.params, lr=lr, betas=(momentum, ADAM_BETA2), eps=ADAM_EPS, foreach=False)
                      if self.params else None)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        if self._adam is not None:
            self._adam.param_groups[0]["lr"] = self.lr
            self._adam.step()


_CLASSES = {"sgd": MomentumSGD, "adam": Adam}
OPTIMIZERS = tuple(_CLASSES)


def make_optimizer(name: str, params: list[torch.Tensor], lr: float, momentum: float) -> MomentumSGD | Adam:
    """The optimizer `name` (one of OPTIMIZERS) over `params` at peak rate `lr`; `momentum` is SGD's
    momentum or Adam's β1."""
    return _CLASSES[name](params, lr, momentum)
