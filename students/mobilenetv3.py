"""MobileNetV3, from "Searching for MobileNetV3" (Howard et al., 2019).

MobileNetV2's inverted residuals plus two ideas: squeeze-and-excitation inside some blocks
(Hu et al., 2018), and the hard-swish activation ``x * relu6(x + 3) / 6`` in the deeper
layers. Block tables are the paper's Tables 1 and 2.

Squeeze-excite is built from 1x1 ``Conv2d`` layers and an elementwise multiply, which
torch-pruning traces: pruning a block's expanded channels also prunes the SE layers that
read and gate them.

Small-input adaptation (always on): the first stride-2 block keeps stride 1, so the network
divides its input by 16 instead of 32 and a 28-32 px input ends at 2x2. ``STEM_STRIDE = 1``
would divide by 8 instead (4x4 maps, ~3x the MACs and training time).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.registry import register_model
from students.mobilenetv2 import conv_bn_act, make_divisible


STEM_STRIDE = 2  # as on ImageNet; see the module docstring


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeeze = make_divisible(channels // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class Block(nn.Module):
    def __init__(self, cin: int, kernel: int, hidden: int, cout: int, se: bool, act: type[nn.Module], stride: int):
        super().__init__()
        layers = [conv_bn_act(cin, hidden, act=act)] if hidden != cin else []
        layers.append(conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=act))  # depthwise
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn_act(hidden, cout, act=None))
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


RE, HS = nn.ReLU, nn.Hardswish
# (kernel, expanded channels, out channels, squeeze-excite, activation, stride). The starred
# stride is 2 in the paper and 1 here (see the module docstring).
SMALL = [(3, 16, 16, True, RE, 1),  # *
         (3, 72, 24, False, RE, 2), (3, 88, 24, False, RE, 1),
         (5, 96, 40, True, HS, 2), (5, 240, 40, True, HS, 1), (5, 240, 40, True, HS, 1),
         (5, 120, 48, True, HS, 1), (5, 144, 48, True, HS, 1),
         (5, 288, 96, True, HS, 2), (5, 576, 96, True, HS, 1), (5, 576, 96, True, HS, 1)]
LARGE = [(3, 16, 16, False, RE, 1),
         (3, 64, 24, False, RE, 1),  # *
         (3, 72, 24, False, RE, 1),
         (5, 72, 40, True, RE, 2), (5, 120, 40, True, RE, 1), (5, 120, 40, True, RE, 1),
         (3, 240, 80, False, HS, 2), (3, 200, 80, False, HS, 1), (3, 184, 80, False, HS, 1),
         (3, 184, 80, False, HS, 1), (3, 480, 112, True, HS, 1), (3, 672, 112, True, HS, 1),
         (5, 672, 160, True, HS, 2), (5, 960, 160, True, HS, 1), (5, 960, 160, True, HS, 1)]


class MobileNetV3(nn.Module):
    def __init__(self, settings: list[tuple], last_conv: int, last_linear: int, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn_act(in_channels, 16, 3, stride=STEM_STRIDE, act=HS)
        blocks, cin = [], 16
        for kernel, hidden, cout, se, act, stride in settings:
            blocks.append(Block(cin, kernel, hidden, cout, se, act, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn_act(cin, last_conv, act=HS)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # The paper's classifier: a wide hidden layer applied after pooling (cheap: it runs on 1x1).
        self.pre_fc = nn.Sequential(nn.Linear(last_conv, last_linear), nn.Hardswish(inplace=True))
        self.fc = nn.Linear(last_linear, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.pre_fc(torch.flatten(self.pool(x), 1)))


@register_model
def mobilenetv3_small(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV3(SMALL, 576, 1024, num_classes, in_channels, **kwargs)


@register_model
def mobilenetv3_large(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV3(LARGE, 960, 1280, num_classes, in_channels, **kwargs)
