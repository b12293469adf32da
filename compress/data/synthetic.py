"""Synthetic images for tests and smoke runs: no files, deterministic, and learnable.

Each class is a fixed random low-frequency pattern (a 4x4 Gaussian field, upsampled); an image
is its class's pattern at a random contrast plus strong pixel noise. A tiny CNN separates the
classes within a few epochs, though no single pixel does. The seed is fixed: the same config
always gives the same dataset, whatever the run seed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from compress.config import DataConfig
from compress.data.module import RawData

SEED = 0
SIGNAL = 48.0   # grey levels of pattern amplitude (one std), around mid-grey
NOISE = 32.0    # grey levels of per-pixel noise (one std)


def load(cfg: DataConfig, log: Callable[[str], None]) -> RawData:
    s = cfg.synthetic
    g = torch.Generator().manual_seed(SEED)
    coarse = torch.randn(s.num_classes, s.channels, 4, 4, generator=g, dtype=torch.float64)
    patterns = F.interpolate(coarse, size=(s.image_size, s.image_size), mode="bicubic", align_corners=False)
    patterns = (patterns - patterns.mean((1, 2, 3), keepdim=True)) / patterns.std(dim=(1, 2, 3), keepdim=True)

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
