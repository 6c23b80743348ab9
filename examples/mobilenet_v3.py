"""A small MobileNetV3-style network for 3x32x32 images (CIFAR-10): the issue-13 example of a model
with depthwise convolutions, Hardswish, squeeze-excite (Hardsigmoid gate times the features), a
`torch.cat` of two depthwise branches, BatchNorm and residual adds
(intq quantize --model examples/mobilenet_v3.py:cifar --weights ... --mean ... --std ...).

5.3 M multiply-adds and 187 k parameters per image; every op is one intq captures (BatchNorm folds into
its conv). examples/mobilenet_v3.pt was trained with this command (seed 0, all 50,000 CIFAR-10 training
images, 10 epochs, 1,497 s on one thread of a shared 2-core machine): float 81.57% on the 10,000 test
images (README "A trained model with these ops" gives the rest):

    python examples/train_small_cnn.py --model examples/mobilenet_v3.py:cifar --data DIR \
        --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616 --epochs 10 --lr 0.1 --channels-last --threads 1 \
        --out mobilenet_v3.pt
"""
import torch
import torch.nn as nn


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, dilation: int = 1) -> list[nn.Module]:
    padding = (kernel - 1) // 2 * dilation
    return [nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(W2 relu(W1 mean_hw(x))): a per-channel gate in [0, 1]."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expansion, k x k depthwise, optional squeeze-excite, 1x1 projection; x + block(x) when shapes allow."""

    def __init__(self, cin: int, expanded: int, cout: int, kernel: int, stride: int, se: bool, act: type[nn.Module]):
        super().__init__()
        expand = [] if expanded == cin else [*conv_bn(cin, expanded), act()]
        layers = [*expand, *conv_bn(expanded, expanded, kernel, stride, groups=expanded), act()]
        if se:
            layers.append(SqueezeExcite(expanded))
        self.block = nn.Sequential(*layers, *conv_bn(expanded, cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class TwoBranch(nn.Module):
    """1x1 expansion, then two depthwise branches on it (3x3, and 3x3 with dilation 2) concatenated along
    channels, squeeze-excite, 1x1 projection and a residual add."""

    def __init__(self, channels: int, expanded: int):
        super().__init__()
        self.expand = nn.Sequential(*conv_bn(channels, expanded), nn.Hardswish())
        self.near = nn.Sequential(*conv_bn(expanded, expanded, 3, groups=expanded), nn.Hardswish())
        self.far = nn.Sequential(*conv_bn(expanded, expanded, 3, groups=expanded, dilation=2), nn.Hardswish())
        self.se = SqueezeExcite(2 * expanded)
        self.project = nn.Sequential(*conv_bn(2 * expanded, channels))

    def forward(self, x):
        h = self.expand(x)
        return x + self.project(self.se(torch.cat([self.near(h), self.far(h)], dim=1)))


class MobileNetV3Cifar(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        HS, RE = nn.Hardswish, nn.ReLU
        self.features = nn.Sequential(
            *conv_bn(3, 16, 3), HS(),                         # 32x32
            InvertedResidual(16, 16, 16, 3, 2, True, RE),     # 16x16
            InvertedResidual(16, 64, 24, 3, 1, False, RE),
            InvertedResidual(24, 72, 24, 3, 1, False, RE),
            InvertedResidual(24, 96, 40, 5, 2, True, HS),     # 8x8
            TwoBranch(40, 96),
            InvertedResidual(40, 120, 48, 5, 2, True, HS),    # 4x4
            InvertedResidual(48, 144, 48, 5, 1, True, HS),
            *conv_bn(48, 256), HS(),
            nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Linear(256, 256), nn.Hardswish(), nn.Linear(256, classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def cifar() -> MobileNetV3Cifar:
    """3x32x32 images, 10 classes."""
    return MobileNetV3Cifar(10)
