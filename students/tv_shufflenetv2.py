"""ShuffleNetV2 at ImageNet resolution, from "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design" (Ma et al., 2018).

The architecture of torchvision's ``shufflenet_v2_x0_5`` and ``shufflenet_v2_x1_0`` (module for
module, so a torchvision state dict loads by name): a stride-2 stem and a max-pool, three stages
of units that split the channels, transform one half and shuffle them back together, ``conv5``
and ``fc``. The input is divided by 32: meant for 64-224 px images (the 28-32 px variants are
``shufflenetv2_x*`` in students/shufflenetv2.py). tests/test_torchvision_keys.py checks keys and
shapes against a list taken from torchvision's source.

The shuffle is students/shufflenetv2.py's gather (same result as torchvision's view/transpose,
which torch-pruning cannot trace), and the same layers are kept out of pruning.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.registry import register_model
from students.shufflenetv2 import ChannelShuffle


def _dw(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(_dw(cin, stride), nn.BatchNorm2d(cin), nn.Conv2d(cin, half, 1, bias=False),
                                         nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.shuffle = ChannelShuffle(2)  # no parameters: the state dict is torchvision's
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            _dw(half, stride), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats: list[int], channels: list[int], num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = channels[0]
        for i, (n, cout) in enumerate(zip(repeats, channels[1:4])):
            units = [InvertedResidual(cin, cout, 2)] + [InvertedResidual(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*units))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, channels[4], 1, bias=False), nn.BatchNorm2d(channels[4]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))

    def pruning_ignored_layers(self) -> list[nn.Module]:
        """Read by ``compress.prune``: the layers whose channels cross a shuffle (see students/shufflenetv2.py)."""
        layers = []
        units = [u for stage in (self.stage2, self.stage3, self.stage4) for u in stage]
        for i, unit in enumerate(units):
            layers.append(unit.branch2[5])          # its output is shuffled
            if unit.stride > 1:
                layers.append(unit.branch1[2])      # its output is shuffled
                if i > 0:                           # depthwise over the previous unit's shuffled output
                    layers.append(unit.branch1[0])
        return layers


@register_model
def shufflenet_v2_x0_5(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    return ShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 1024], num_classes, in_channels, **kwargs)


@register_model
def shufflenet_v2_x1_0(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    return ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes, in_channels, **kwargs)
