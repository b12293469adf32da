"""ShuffleNetV2, from "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design" (Ma et al., 2018).

Each unit splits its channels in two: one half passes through untouched, the other goes
through a 1x1 -> 3x3 depthwise -> 1x1 branch; the halves are concatenated and *shuffled*
(interleaved) so that the next unit's split mixes both. Downsampling units send the whole
input through two branches instead.

Pruning: torch-pruning's dependency graph cannot follow a channel shuffle (the usual
view/transpose/view crashes its tracer; the gather used here is taken for an elementwise op,
so channel indices would be silently mis-mapped; see VainF/Torch-Pruning#45). The
maintainer's advice is to leave those layers alone, so ``pruning_ignored_layers()`` lists
the layers whose channels cross a shuffle: the last 1x1 of every branch and the depthwise
convolutions that read a shuffled input. Each branch's inner width, the stem and the final
1x1 convolution stay prunable, and the ignored layers still lose *input* channels, so a
MACs target down to about 20% is reachable.

Small-input adaptation (always on): no max-pool after the stem, so the network divides its
input by 16 instead of 32 and a 28-32 px input ends at 2x2. ``STEM_STRIDE = 1`` would divide
by 8 instead (4x4 maps, ~3.5x the MACs and training time).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.registry import register_model


STEM_STRIDE = 2  # as on ImageNet; see the module docstring


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` equal channel groups: [a0 a1 | b0 b1] -> [a0 b0 a1 b1].

    Written as a gather of channels rather than the usual view/transpose/view: torch-pruning
    crashes while tracing a 5-d view, and sees a gather as an elementwise op (wrong for the
    channel order, hence the ignored layers, but harmless once nothing that crosses it is
    pruned). Same result, same cost; ONNX exports it as a Gather.
    """

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        order = torch.arange(c, device=x.device).view(self.groups, c // self.groups).t().reshape(-1)
        return x.index_select(1, order)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        half = cout // 2
        if stride > 1:  # downsampling: both halves are computed from the whole input
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, relu=False), conv_bn(cin, half))
            branch_in = cin
        else:
            self.branch1 = None
            branch_in = half
        self.branch2 = nn.Sequential(conv_bn(branch_in, half),
                                     conv_bn(half, half, 3, stride, groups=half, relu=False),
                                     conv_bn(half, half))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths: list[int], num_classes: int = 10, in_channels: int = 3, repeats=(4, 8, 4)):
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0], 3, STEM_STRIDE)
        units, cin = [], widths[0]
        for n, cout in zip(repeats, widths[1:4]):
            for i in range(n):
                units.append(ShuffleUnit(cin, cout, 2 if i == 0 else 1))
                cin = cout
        self.units = nn.Sequential(*units)
        self.head = conv_bn(cin, widths[4])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.units(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def pruning_ignored_layers(self) -> list[nn.Module]:
        """Read by ``compress.prune``: the layers whose channels cross a shuffle."""
        layers = []
        for i, unit in enumerate(self.units):
            layers.append(unit.branch2[2][0])          # its output is shuffled
            if unit.branch1 is not None:
                layers.append(unit.branch1[1][0])      # its output is shuffled
                if i > 0:                              # depthwise: its channels are its input's, which
                    layers.append(unit.branch1[0][0])  # came out of the previous unit's shuffle
        return layers


@register_model
def shufflenetv2_x0_5(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return ShuffleNetV2([24, 48, 96, 192, 1024], num_classes, in_channels, **kwargs)


@register_model
def shufflenetv2_x1_0(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return ShuffleNetV2([24, 116, 232, 464, 1024], num_classes, in_channels, **kwargs)


@register_model
def shufflenetv2_x1_5(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return ShuffleNetV2([24, 176, 352, 704, 1024], num_classes, in_channels, **kwargs)


@register_model
def shufflenetv2_x2_0(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    return ShuffleNetV2([24, 244, 488, 976, 2048], num_classes, in_channels, **kwargs)
