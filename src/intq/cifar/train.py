"""The study's training recipe and test-set evaluation, on tensors already in memory.

Batches are slices of one normalised tensor (no DataLoader, no per-image transforms): the recipe
is unchanged (cross-entropy, SGD lr 0.001 momentum 0.9, batch 4, shuffled, 2 epochs), only the
plumbing around it is cheaper.

Trained weights depend on the number of intra-op threads as well as on the seed: PyTorch splits a
convolution's float sums (forward and gradients) across threads, and a different split rounds
differently (Net: 54.31% with one thread, 53.24% with two). So the thread count is part of each
recipe and training runs with exactly that many threads, whatever the caller's setting.
"""
from __future__ import annotations

import logging
import hashlib
import zipfile
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from intq.cifar.data import normalize
from intq.files import array_sha256, atomic_write
from intq.progress import progress
from intq.threads import intra_op_threads

_log = logging.getLogger(__name__)  # progress messages; the command line routes them to stderr


@dataclass(frozen=True)
class Recipe:
    epochs: int = 2
    batch_size: int = 4
    lr: float = 0.001
    momentum: float = 0.9
    log_every: int = 2000  # mini-batches between loss lines, as the study prints them
    threads: int = 1  # intra-op threads while training: the weights depend on it (module docstring)


class MomentumSGD:
    """SGD with momentum, as torch.optim.SGD computes it (dampening 0, no Nesterov, no decay):

        v <- g (first step),  v <- momentum * v + g (later steps);   p <- p - lr * v

    with the same elementwise operations in the same order, on PyTorch's public in-place Tensor.mul_
    and Tensor.add_, one parameter at a time (as torch.optim.SGD(foreach=False) does), so parameters
    are bit-identical to torch.optim.SGD's (tested), without its per-step bookkeeping: a batch-4 step
    of Net takes as long as with the three private multi-tensor calls (torch._foreach_*) this class
    used before, and torch.optim.SGD(foreach=True) is about 10% slower (benchmarks/bench_optimizer.py).
    """

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float) -> None:
        self.params, self.lr, self.momentum = params, lr, momentum
        self.velocity: list[torch.Tensor] | None = None

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [param.grad for param in self.params]
        if self.velocity is None:
            self.velocity = [grad.clone() for grad in grads]
        else:
            for velocity, grad in zip(self.velocity, grads):
                velocity.mul_(self.momentum).add_(grad)
        for param, velocity in zip(self.params, self.velocity):
            param.add_(velocity, alpha=-self.lr)


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    seed: int,
    log: Callable[[str], None] = _log.info,
) -> list[tuple[int, int, float]]:
    """Train in place with the recipe; returns the (epoch, mini-batch, mean loss) lines it logged.

    `images` are normalised float32 (N, 3, 32, 32). Shuffling uses its own seeded generator, so
    the order depends on `seed` alone; the arithmetic runs on `recipe.threads` threads, so the
    same model, data, recipe and seed give bit-identical weights from any command. Each epoch
    gathers the shuffled images once, so a step slices a view instead of indexing.
    """
    with intra_op_threads(recipe.threads):
        return _train(model, images, labels, recipe, seed, log)


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, seed: int,
           log: Callable[[str], None]) -> list[tuple[int, int, float]]:
    """The training loop of `train`, on whatever threads the caller set."""
    optimizer = MomentumSGD(list(model.parameters()), lr=recipe.lr, momentum=recipe.momentum)
    generator = torch.Generator().manual_seed(seed)
    steps = images.shape[0] // recipe.batch_size
    losses = []
    model.train()
    for epoch in range(1, recipe.epochs + 1):
        order = torch.randperm(images.shape[0], generator=generator)
        shuffled_images, shuffled_labels = images[order], labels[order]
        running = torch.zeros((), device=images.device)
        for step in progress(range(steps), f"training epoch {epoch}/{recipe.epochs}"):
            batch = slice(step * recipe.batch_size, (step + 1) * recipe.batch_size)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(shuffled_images[batch]), shuffled_labels[batch])
            loss.backward()
            optimizer.step()
            running += loss.detach()
            if (step + 1) % recipe.log_every == 0:
                mean_loss = float(running) / recipe.log_every
                losses.append((epoch, step + 1, mean_loss))
                log("[%d, %5d] loss: %.3f" % (epoch, step + 1, mean_loss))
                running.zero_()
    model.eval()
    return losses


def predict(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """argmax class of every image, in batches; `forward` maps a batch to scores."""
    with torch.no_grad():
        starts = progress(range(0, len(images), batch_size), "evaluating")
        return torch.cat([forward(images[i : i + batch_size]).argmax(dim=1) for i in starts])


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of correct predictions: 100 * mean(predicted == labels)."""
    return round(100.0 * float((predicted.cpu() == labels.cpu()).double().mean()), 6)


def weights_key(model_name: str, recipe: Recipe, seed: int, data_fingerprint: str) -> str:
    """Cache key of trained weights: the recipe (thread count included), the seed, the data and
    the torch version."""
    spec = {"model": model_name, "recipe": asdict(recipe), "seed": seed, "data": data_fingerprint,
            "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name and files.array_sha256 (dtype, shape, bytes), in name order:
    what a cached file's contents must hash to when read back."""
    lines = "".join(f"{name} {array_sha256(arrays[name])}\n" for name in sorted(arrays))
    return hashlib.sha256(lines.encode()).hexdigest()


def save_weights(model: nn.Module, losses: list, path: Path) -> None:
    """state_dict as a pickle-free .npz (plus the logged losses and their SHA-256), written atomically."""
    arrays = {f"param.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    arrays["losses"] = np.array(losses, dtype=np.float64).reshape(-1, 3)
    arrays["sha256"] = np.frombuffer(arrays_digest(arrays).encode(), np.uint8)
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_weights(model: nn.Module, path: Path) -> list[tuple[int, int, float]] | None:
    """Load weights saved by save_weights; None (train again) when the file is missing, does not fit
    the model, or its arrays no longer hash to the SHA-256 stored with them (altered or corrupt)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        stored = arrays.pop("sha256").tobytes().decode("ascii")
        if stored != arrays_digest(arrays):
            return None
        state = {k[len("param."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("param.")}
        losses = [(int(e), int(s), float(v)) for e, s, v in arrays["losses"]]
        model.load_state_dict(state)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, UnicodeDecodeError, zipfile.BadZipFile):
        return None
    return losses


@dataclass(frozen=True)
class ClassifierRecipe:
    """A standard CIFAR-10 recipe for deeper networks: SGD with Nesterov momentum, weight decay,
    a cosine learning rate, random 4-pixel shifts and horizontal flips."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    threads: int | None = None  # intra-op threads while training; None: torch's current count


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Normalised batch (N, C, H, W): one random shift of up to 4 pixels for the batch (zero = mid-grey
    padding) and a random horizontal flip per image."""
    dy, dx = (int(v) for v in torch.randint(0, 9, (2,), generator=generator))
    height, width = images.shape[2:]
    padded = F.pad(images, (4, 4, 4, 4))  # (N, C, H, W) -> (N, C, H+8, W+8)
    shifted = padded[:, :, dy : dy + height, dx : dx + width]
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip.reshape(-1, 1, 1, 1), shifted.flip(3), shifted)


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe,
                     seed: int, log: Callable[[str], None] = _log.info,
                     evaluate: Callable[[], float] | None = None) -> list[dict]:
    """Train on uint8 `images` with the recipe; returns per-epoch {epoch, loss, test_accuracy, threads}.

    lr(t) = lr / 2 * (1 + cos(pi t / T)) over all T steps.

    Thread rule: the weights depend on the intra-op thread count (module docstring), yet pinning
    one thread would make a many-minute ResNet-20 run about twice as long on two cores. So training
    runs on exactly `recipe.threads` threads, by default torch's current count, and every history
    entry records that count: the same seed, recipe and thread count give the same weights.
    """
    threads = recipe.threads if recipe.threads is not None else torch.get_num_threads()
    with intra_op_threads(threads):
        history = _train_classifier(model, images, labels, recipe, seed, log, evaluate)
    return [{**entry, "threads": threads} for entry in history]


def _train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe,
                      seed: int, log: Callable[[str], None], evaluate: Callable[[], float] | None) -> list[dict]:
    """The training loop of `train_classifier`, on whatever threads the caller set."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=True)
    steps_per_epoch = len(images) // recipe.batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.epochs * steps_per_epoch)
    history = []
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order, total = torch.randperm(len(images), generator=generator), 0.0
        for step in progress(range(steps_per_epoch), f"training epoch {epoch}/{recipe.epochs}"):
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(augment(normalize(images[index]), generator)), labels[index])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        model.eval()
        entry = {"epoch": epoch, "loss": total / steps_per_epoch}
        if evaluate is not None:
            entry["test_accuracy"] = evaluate()
        history.append(entry)
        log(f"epoch {epoch}/{recipe.epochs}: loss {entry['loss']:.3f}"
            + (f", test accuracy {entry['test_accuracy']:.2f}%" if "test_accuracy" in entry else ""))
    return history
