"""MobileNetV2 at ImageNet resolution, from "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (Sandler et al., 2018).

The architecture of torchvision's ``mobilenet_v2`` (module for module, so a torchvision state
dict loads by name): a stride-2 stem, the paper's Table 2 of inverted residuals (stride 2 where
the table says so), a 1280-channel 1x1 head and ``classifier = [Dropout, Linear]``. The input is
divided by 32: meant for 64-224 px images (the 28-32 px variants are ``mobilenetv2_x*`` in
students/mobilenetv2.py). tests/test_torchvision_keys.py checks keys and shapes against a list
taken from torchvision's source.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.registry import register_model
from students.mobilenetv2 import make_divisible


def conv_norm_act(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                  act: type[nn.Module] | None = nn.ReLU6, eps: float = 1e-5, momentum: float = 0.1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, activation (absent when None)."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=eps, momentum=momentum)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        layers = [conv_norm_act(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_norm_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, channels c, repeats n, first stride s): the paper's Table 2
SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_norm_act(in_channels, cin, 3, 2)]
        for t, c, n, s in SETTING:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(conv_norm_act(cin, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def fc(self) -> nn.Linear:
        """The logits layer (a property, so the state dict keeps torchvision's `classifier.1`)."""
        return self.classifier[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


@register_model
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    return MobileNetV2(num_classes, in_channels, **kwargs)
