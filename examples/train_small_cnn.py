"""Train a user model on an image folder with its own preprocessing, and save a state_dict (.pt):
how README's worked examples of `--model`/`--weights` were made. Seeded; 2 threads unless --threads.

    python examples/train_small_cnn.py --model examples/small_cnn.py:gray --data DIR --size 28 \
        --channels 1 --mean 0.479 --std 0.239 --epochs 3 --out gray28.pt
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from intq.arith.preprocessing import Preprocessing
from intq.workflows.subject import InputOptions, load_data
from intq.workflows.user_model import load_user_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--mean", type=float, nargs="+", required=True)
    parser.add_argument("--std", type=float, nargs="+", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=None, help="first N of a seeded shuffle (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--channels-last", action="store_true", help="train in channels-last layout (1.6x faster "
                        "on the MobileNetV3-style example on CPU; other float rounding, so other weights)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (1 on a machine other jobs share: "
                        "no parallel regions to stall)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/intq"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    size = None if args.size is None else (args.size, args.size)
    data = load_data(args.data, args.cache, InputOptions(size, args.channels), progress=print)
    preprocessing = Preprocessing(tuple(args.mean), tuple(args.std))
    order = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(0))[: args.train_images]
    images, labels = data.train_images[order], data.train_labels[order]
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = load_user_model(args.model).train().to(memory_format=layout)
    steps = args.epochs * ((len(images) + args.batch_size - 1) // args.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        permutation = torch.randperm(len(images), generator=generator)
        for first in range(0, len(images), args.batch_size):
            index = permutation[first : first + args.batch_size]
            x = preprocessing.apply(images[index])
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(3), x).contiguous(memory_format=layout)
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(preprocessing.apply(data.test_images[i : i + 500])).argmax(1)
                           == data.test_labels[i : i + 500]).sum()) for i in range(0, len(data.test_images), 500))
    print(f"float test accuracy {100 * correct / max(len(data.test_images), 1):.2f}% on {len(data.test_images)} images")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
