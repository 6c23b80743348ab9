"""The study's training step with intq's MomentumSGD (torch._foreach_* calls) against PyTorch's public
torch.optim.SGD(foreach=True) and SGD(fused=True): median seconds per 1,000 batch-4 steps of Net on one thread, the two
timed in alternating rounds, and whether the trained parameters are bit-identical. Run by hand:

    .venv/bin/python benchmarks/bench_optimizer.py [--steps 1000] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from intq.cifar.models import Net
from intq.cifar.train import MomentumSGD


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
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4 * args.steps, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (4 * args.steps,), generator=generator)
    optimizers = {"intq MomentumSGD (_foreach_)": lambda p: MomentumSGD(p, lr=0.001, momentum=0.9),
                  "torch.optim.SGD(foreach=True)": lambda p: torch.optim.SGD(p, lr=0.001, momentum=0.9, foreach=True),
                  "torch.optim.SGD(fused=True)": lambda p: torch.optim.SGD(p, lr=0.001, momentum=0.9, fused=True)}
    times = {label: [] for label in optimizers}
    params = {}
    for _ in range(args.rounds):
        for label, make in optimizers.items():
            seconds, params[label] = run(make, args.steps, images, labels)
            times[label].append(seconds)
    medians = {label: statistics.median(values) for label, values in times.items()}
    base = medians["intq MomentumSGD (_foreach_)"]
    for label, seconds in medians.items():
        print(f"  {label:<32}{seconds * 1000 / args.steps:>8.3f} ms/step{seconds / base:>8.3f}x")
    reference = params["intq MomentumSGD (_foreach_)"]
    for label, trained in params.items():
        print(f"  {label}: parameters bit-identical to MomentumSGD's: {all(torch.equal(a, b) for a, b in zip(reference, trained))}")


if __name__ == "__main__":
    main()
