"""The study's training step with intq's MomentumSGD (public in-place Tensor.mul_/add_, one parameter
at a time) against PyTorch's torch.optim.SGD(foreach=True), SGD(foreach=False) and SGD(fused=True),
and against MomentumSGD's previous form on PyTorch's private multi-tensor calls (torch._foreach_*,
timed where this PyTorch has them): median seconds per 1,000 batch-4 steps of Net on one thread, the
optimizers timed in alternating rounds, and whether the trained parameters are bit-identical to
MomentumSGD's. Run by hand:

    .venv/bin/python benchmarks/bench_optimizer.py [--steps 1000] [--rounds 9]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from intq.cifar.models import Net
from intq.cifar.train import MomentumSGD


class PrivateForeachSGD(MomentumSGD):
    """MomentumSGD as it was up to intq 0.2.0: three private multi-tensor calls per step (the first
    step, which only copies the gradients, is MomentumSGD's own)."""

    @torch.no_grad()
    def step(self) -> None:
        if self.velocity is None:
            return super().step()
        torch._foreach_mul_(self.velocity, self.momentum)
        torch._foreach_add_(self.velocity, [param.grad for param in self.params])
        torch._foreach_add_(self.params, self.velocity, alpha=-self.lr)


def run(make_optimizer, steps: int, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Net()
    optimizer = make_optimizer(list(model.parameters()))
    start = time.perf_counter()
    for step in range(steps):
        x, y = images[4 * step: 4 * step + 4], labels[4 * step: 4 * step + 4]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start, [p.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4 * args.steps, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (4 * args.steps,), generator=generator)
    base_label = "intq MomentumSGD (Tensor.mul_/add_)"
    optimizers = {base_label: lambda p: MomentumSGD(p, lr=0.001, momentum=0.9),
                  "torch.optim.SGD(foreach=True)": lambda p: torch.optim.SGD(p, lr=0.001, momentum=0.9, foreach=True),
                  "torch.optim.SGD(foreach=False)": lambda p: torch.optim.SGD(p, lr=0.001, momentum=0.9, foreach=False),
                  "torch.optim.SGD(fused=True)": lambda p: torch.optim.SGD(p, lr=0.001, momentum=0.9, fused=True)}
    if hasattr(torch, "_foreach_mul_"):
        optimizers["previous MomentumSGD (torch._foreach_*)"] = lambda p: PrivateForeachSGD(p, lr=0.001, momentum=0.9)
    times = {label: [] for label in optimizers}
    params = {}
    for _ in range(args.rounds):
        for label, make in optimizers.items():
            seconds, params[label] = run(make, args.steps, images, labels)
            times[label].append(seconds)
    medians = {label: statistics.median(values) for label, values in times.items()}
    base = medians[base_label]
    for label, seconds in medians.items():
        print(f"  {label:<42}{seconds * 1000 / args.steps:>8.3f} ms/step{seconds / base:>8.3f}x")
    reference = params[base_label]
    for label, trained in params.items():
        print(f"  {label}: parameters bit-identical to MomentumSGD's: {all(torch.equal(a, b) for a, b in zip(reference, trained))}")


if __name__ == "__main__":
    main()
