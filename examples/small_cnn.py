"""A small CNN for any image size and channel count: the user-model example of README's
"Your own model and data" (intq quantize --model examples/small_cnn.py:rgb --weights ...).

Conv-BN-ReLU blocks, a stride-2 stem for large images, a global average pool and one linear layer:
every op is one intq captures (BatchNorm folds into its conv)."""
import torch.nn as nn


def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 10, stem_stride: int = 1):
        super().__init__()
        stem = [nn.Conv2d(channels, 32, 7 if stem_stride > 1 else 3, stride=stem_stride,
                          padding=3 if stem_stride > 1 else 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
        if stem_stride > 1:
            stem.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*stem, *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                                      nn.MaxPool2d(2), *block(64, 128), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(128, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def rgb() -> SmallCNN:
    """3-channel images of up to about 64x64."""
    return SmallCNN(3)


def gray() -> SmallCNN:
    """1-channel images (e.g. 28x28)."""
    return SmallCNN(1)


def large() -> SmallCNN:
    """3-channel 224x224 images: a 7x7 stride-2 stem and a max-pool bring them to 56x56 first."""
    return SmallCNN(3, stem_stride=2)
