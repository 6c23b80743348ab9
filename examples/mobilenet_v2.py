"""A small MobileNetV2-style network for 3x32x32 images (CIFAR-10): the example of issue 14's cross-layer
equalization and bias correction (intq quantize --model examples/mobilenet_v2.py:cifar --weights ...
--granularity per-tensor --equalization --bias-correction).

Inverted residual blocks (1x1 expansion, 3x3 depthwise, 1x1 linear projection, a residual add where shapes
allow), BatchNorm after every convolution (folded into it by intq), ReLU rather than MobileNetV2's ReLU6:
ReLU is positively homogeneous, relu(x / s) = relu(x) / s for s > 0, so equalization through it leaves the
float function exactly as it was (docs/math.md eq. 36); ReLU6 is not, and intq does not equalize across it.
Nagel et al. (2019) replace ReLU6 by ReLU for the same reason. 5.4 M multiply-adds and 97 k parameters per
image. examples/mobilenet_v2.pt: seed 0, 5 epochs on the 50,000 CIFAR-10 training images (73 minutes on a
loaded 2-core machine), float 75.68% on the 10,000 test images (README, "Equalization and bias correction"):

    python examples/train_small_cnn.py --model examples/mobilenet_v2.py:cifar --data DIR \
        --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616 --epochs 5 --lr 0.1 --channels-last \
        --out examples/mobilenet_v2.pt
"""
import torch.nn as nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, relu: bool = True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


class InvertedResidual(nn.Module):
    """x -> 1x1 expansion (ReLU) -> 3x3 depthwise (ReLU) -> 1x1 projection (linear); + x when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        expand = conv_bn_relu(cin, hidden) if expansion != 1 else []
        self.block = nn.Sequential(*expand, *conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                                   *conv_bn_relu(hidden, cout, relu=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


# (expansion, output channels, blocks, stride of the first block): MobileNetV2's table, narrowed for 32x32
SETTINGS = ((1, 16, 1, 2), (4, 24, 2, 1), (4, 32, 2, 2), (4, 64, 2, 2))


class MobileNetV2Cifar(nn.Module):
    def __init__(self, classes: int = 10, last: int = 256):
        super().__init__()
        layers, cin = conv_bn_relu(3, 16, 3), 16
        for expansion, cout, blocks, stride in SETTINGS:
            for index in range(blocks):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expansion))
                cin = cout
        self.features = nn.Sequential(*layers, *conv_bn_relu(cin, last), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(last, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def cifar() -> MobileNetV2Cifar:
    return MobileNetV2Cifar()
