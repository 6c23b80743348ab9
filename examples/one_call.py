"""The one-call API on a model trained with CIFAR-10's per-channel mean/std, fed the way a PyTorch
user feeds it: a DataLoader of normalised float images with labels. Then the same data declared with
the wrong preprocessing, which intq refuses in one line (README, "Your own model and data").

    python examples/one_call.py --weights cifar_meanstd.pt --data ../shared/data/cifar10-jpeg
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import intq  # noqa: E402
from intq.workflows.subject import load_data  # noqa: E402
from small_cnn import rgb  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", type=Path, default=Path(".cache/intq"))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_data(args.data, args.cache)
    model = rgb()
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.eval()
    mean, std = torch.tensor(MEAN).reshape(1, 3, 1, 1), torch.tensor(STD).reshape(1, 3, 1, 1)
    normalised = (data.train_images[:2000].float() / 255 - mean) / std  # what torchvision's transforms give
    my_dataset = TensorDataset(normalised, data.train_labels[:2000])

    loader = DataLoader(my_dataset, batch_size=256)            # yields (images, labels)
    int_model = intq.quantize(model, loader, input={"mean": MEAN, "std": STD})
    logits = intq.run_integer(int_model, data.test_images)

    with torch.no_grad():
        float_top1 = torch.cat([model((data.test_images[i:i + 500].float() / 255 - mean) / std).argmax(1)
                                for i in range(0, len(data.test_images), 500)])
    integer_top1 = logits.argmax(1)
    labels = data.test_labels
    print(f"float {100 * float((float_top1 == labels).double().mean()):.2f}%, integer-only "
          f"{100 * float((integer_top1 == labels).double().mean()):.2f}%, top-1 agreement "
          f"{100 * float((float_top1 == integer_top1).double().mean()):.2f}% on {len(labels):,} test images "
          f"(input {int_model.input.qparams.dtype.name}, {'folded' if int_model.input.folded else 'table'})")
    try:
        intq.quantize(model, loader)  # the same data, preprocessing not declared: the study's default
    except ValueError as err:
        print(f"declared wrongly: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
