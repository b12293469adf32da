"""ResNet, from "Deep Residual Learning for Image Recognition" (He et al., 2016).

Two flavours, both sized for small images (Fashion-MNIST 28x28, CIFAR 32x32):

* ``resnet8/20/32/56`` are the paper's CIFAR networks (section 4.2): three stages of 16/32/64
  channels, ``n`` basic blocks each, depth ``6n + 2``. Shortcuts that change shape use a 1x1
  convolution (the paper's option B) rather than zero-padding, so every channel is a real
  layer that torch-pruning can follow.
* ``resnet18/34/50_cifar`` are the ImageNet networks with the stem shrunk for small inputs: a 3x3
  stride-1 convolution and no max-pool (the usual CIFAR adaptation), so a 32 px input ends
  in a 4x4 feature map instead of vanishing. (The ImageNet-resolution ``resnet18/34/50``,
  keyed like torchvision's, are in teachers/tv_resnet.py.)

Global average pooling makes every model work on any input of 8 px or more.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.registry import register_model


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv_bn(cin, width, 3, stride)
        self.conv2, self.bn2 = conv_bn(width, cout, 3)
        # Option B: project only when the shape changes; identity otherwise.
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv_bn(cin, width, 1)
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride)  # stride on the 3x3, as in torchvision ("v1.5")
        self.conv3, self.bn3 = conv_bn(width, cout, 1)
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of residual blocks (the first block of each later stage halves the size), pool, ``fc``."""

    def __init__(self, block: type[nn.Module], depths: list[int], widths: list[int], num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, widths[0], 3), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, width, stride=2 if i > 0 and j == 0 else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero the last BN of each residual branch: every block starts as the identity, which
        # makes the deeper variants train quickly and stably (Goyal et al., 2017).
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.bn3.weight if isinstance(m, Bottleneck) else m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _cifar_resnet(depth: int, num_classes: int, in_channels: int, **kwargs) -> ResNet:
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n] * 3, [16, 32, 64], num_classes, in_channels, **kwargs)


@register_model
def resnet8(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return _cifar_resnet(8, num_classes, in_channels, **kwargs)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return _cifar_resnet(20, num_classes, in_channels, **kwargs)


@register_model
def resnet32(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return _cifar_resnet(32, num_classes, in_channels, **kwargs)


@register_model
def resnet56(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return _cifar_resnet(56, num_classes, in_channels, **kwargs)


@register_model
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, **kwargs)


@register_model
def resnet34_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return ResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, **kwargs)


@register_model
def resnet50_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, **kwargs)
