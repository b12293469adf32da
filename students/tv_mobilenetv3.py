"""MobileNetV3 at ImageNet resolution, from "Searching for MobileNetV3" (Howard et al., 2019).

The architecture of torchvision's ``mobilenet_v3_small`` and ``mobilenet_v3_large`` (module for
module, so a torchvision state dict loads by name): the paper's Tables 1 and 2 with every stride
as published, BatchNorm with eps 1e-3 and momentum 0.01 (TensorFlow's, which the published
weights were trained with), squeeze-excite as two 1x1 convolutions ``fc1``/``fc2``, and
``classifier = [Linear, Hardswish, Dropout, Linear]``. The input is divided by 32: meant for
64-224 px images (the 28-32 px variants are ``mobilenetv3_small/large`` in
students/mobilenetv3.py). tests/test_torchvision_keys.py checks keys and shapes against a list
taken from torchvision's source.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.registry import register_model
from students.mobilenetv2 import make_divisible
from students.tv_mobilenetv2 import conv_norm_act

BN = {"eps": 1e-3, "momentum": 0.01}


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeeze = make_divisible(channels // 4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, hidden: int, cout: int, se: bool, act: type[nn.Module], stride: int):
        super().__init__()
        layers: list[nn.Module] = [conv_norm_act(cin, hidden, 1, act=act, **BN)] if hidden != cin else []
        layers.append(conv_norm_act(hidden, hidden, kernel, stride, groups=hidden, act=act, **BN))
        if se:
            layers.append(SqueezeExcitation(hidden))
        layers.append(conv_norm_act(hidden, cout, 1, act=None, **BN))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


RE, HS = nn.ReLU, nn.Hardswish
# (in, kernel, expanded, out, squeeze-excite, activation, stride): the paper's Tables 1 and 2
LARGE = [(16, 3, 16, 16, False, RE, 1), (16, 3, 64, 24, False, RE, 2), (24, 3, 72, 24, False, RE, 1),
         (24, 5, 72, 40, True, RE, 2), (40, 5, 120, 40, True, RE, 1), (40, 5, 120, 40, True, RE, 1),
         (40, 3, 240, 80, False, HS, 2), (80, 3, 200, 80, False, HS, 1), (80, 3, 184, 80, False, HS, 1),
         (80, 3, 184, 80, False, HS, 1), (80, 3, 480, 112, True, HS, 1), (112, 3, 672, 112, True, HS, 1),
         (112, 5, 672, 160, True, HS, 2), (160, 5, 960, 160, True, HS, 1), (160, 5, 960, 160, True, HS, 1)]
SMALL = [(16, 3, 16, 16, True, RE, 2), (16, 3, 72, 24, False, RE, 2), (24, 3, 88, 24, False, RE, 1),
         (24, 5, 96, 40, True, HS, 2), (40, 5, 240, 40, True, HS, 1), (40, 5, 240, 40, True, HS, 1),
         (40, 5, 120, 48, True, HS, 1), (48, 5, 144, 48, True, HS, 1), (48, 5, 288, 96, True, HS, 2),
         (96, 5, 576, 96, True, HS, 1), (96, 5, 576, 96, True, HS, 1)]


class MobileNetV3(nn.Module):
    def __init__(self, setting: list[tuple], last_channel: int, num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [conv_norm_act(in_channels, setting[0][0], 3, 2, act=HS, **BN)]
        layers += [InvertedResidual(*row) for row in setting]
        last_in = setting[-1][3]
        layers.append(conv_norm_act(last_in, 6 * last_in, 1, act=HS, **BN))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last_channel), nn.Hardswish(), nn.Dropout(dropout),
                                        nn.Linear(last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def fc(self) -> nn.Linear:
        """The logits layer (a property, so the state dict keeps torchvision's `classifier.3`)."""
        return self.classifier[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model
def mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV3(SMALL, 1024, num_classes, in_channels, **kwargs)


@register_model
def mobilenet_v3_large(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV3(LARGE, 1280, num_classes, in_channels, **kwargs)
