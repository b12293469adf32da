"""Synthetic images for tests and smoke runs: no files, deterministic, and learnable.

Each class is an oriented grating (its own angle in [0, 90] degrees, so that a horizontal flip
never turns one class into another, its own frequency, phase and per-channel tint); an image is
its class's grating at a random contrast plus strong pixel noise. Gratings are textures, so a
small CNN with global pooling separates the classes within a few epochs wherever a random crop
puts them, and the class means still differ (nearest-mean works too). The seed is fixed: the same config
always gives the same dataset, whatever the run seed.
"""

from __future__ import annotations

from typing import Callable

import math

import torch

from compress.config import DataConfig
from compress.data.module import RawData

SEED = 0
SIGNAL = 48.0   # grey levels of pattern amplitude (one std), around mid-grey
NOISE = 32.0    # grey levels of per-pixel noise (one std)


def load(cfg: DataConfig, log: Callable[[str], None]) -> RawData:
    s = cfg.synthetic
    g = torch.Generator().manual_seed(SEED)
    k = torch.arange(s.num_classes, dtype=torch.float64)
    angle = (math.pi / 2) * k / max(1, s.num_classes - 1)
    cycles = 2.0 + (k % 3)                                  # across the image
    phase = 2 * math.pi * torch.rand(s.num_classes, generator=g, dtype=torch.float64)
    tint = 0.6 + 0.8 * torch.rand(s.num_classes, s.channels, 1, 1, generator=g, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(s.image_size, dtype=torch.float64),
                            torch.arange(s.image_size, dtype=torch.float64), indexing="ij")
    along = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    waves = torch.cos(2 * math.pi * cycles[:, None, None] * along / s.image_size + phase[:, None, None])
    patterns = math.sqrt(2) * waves[:, None] * tint          # unit std per channel (before the tint)

    def make(n: int):
        labels = torch.randperm(n, generator=g) % s.num_classes     # balanced classes, shuffled
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64)
        noise = torch.randn(n, s.channels, s.image_size, s.image_size, generator=g, dtype=torch.float64)
        x = 128 + SIGNAL * contrast * patterns[labels] + NOISE * noise
        return x.round().clamp(0, 255).to(torch.uint8).numpy(), labels.numpy()

    train_x, train_y = make(s.num_train)
    test_x, test_y = make(s.num_test)
    names = [f"class{i}" for i in range(s.num_classes)]
    source = (f"synthetic (seed {SEED}): {s.num_classes} classes of {s.channels}x{s.image_size}x{s.image_size} "
              f"random patterns")
    return RawData("synthetic", names, train_x, train_y, test_x, test_y, source)
