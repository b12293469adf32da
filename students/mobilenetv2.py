"""MobileNetV2, from "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (Sandler et al., 2018).

Inverted residual blocks: a 1x1 convolution expands the channels ``t`` times, a 3x3
depthwise convolution filters them, and a linear 1x1 convolution projects back down; the
residual joins the thin ends.

Small-input adaptation (always on): the ImageNet network divides its input by 32, which
would leave a 28 px Fashion-MNIST image at 1x1 halfway through. Here the second stage keeps
stride 1, so the network divides by 16 and a 28-32 px input ends at 2x2 (larger inputs work
too, at proportionally more cost). ``STEM_STRIDE = 1`` would divide by 8 instead (4x4 maps,
~3.5x the MACs and training time). The width multiplier scales every layer, rounded to a
multiple of 8; the last 1x1 layer keeps 1280 channels for widths <= 1, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.registry import register_model


# 2 as on ImageNet; with the starred stride below that makes the network divide by 16, which
# keeps students 5-10x cheaper than the CIFAR ResNet teachers and fast to train on a CPU.
STEM_STRIDE = 2


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of it (the paper's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_act(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        layers = [conv_bn_act(cin, hidden)] if expand_ratio != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),  # depthwise
                   conv_bn_act(hidden, cout, act=None)]                    # linear bottleneck: no activation
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expand ratio t, channels c, repeats n, stride s) from the paper's Table 2; the starred
    # stride is 2 on ImageNet and 1 here (see the module docstring).
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        cin = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        self.stem = conv_bn_act(in_channels, cin, 3, stride=STEM_STRIDE)
        blocks = []
        for t, c, n, s in self.SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn_act(cin, last)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def mobilenetv2_x0_35(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV2(0.35, num_classes, in_channels, **kwargs)


@register_model
def mobilenetv2_x0_5(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV2(0.5, num_classes, in_channels, **kwargs)


@register_model
def mobilenetv2_x0_75(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV2(0.75, num_classes, in_channels, **kwargs)


@register_model
def mobilenetv2_x1_0(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV2(1.0, num_classes, in_channels, **kwargs)
