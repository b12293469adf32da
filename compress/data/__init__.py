"""Datasets, each loaded whole into one uint8 tensor on the device (the machinery is in module.py).

`build_data(cfg.data, device, seed)` runs the loader named by `data.dataset`:

    fashion-mnist  IDX files, found locally or downloaded, checksummed   fashion_mnist.py, idx.py
    imagefolder    root/train/<class>/*.png and root/test/<class>/...   imagefolder.py
    synthetic      learnable random patterns, for tests and smoke runs  synthetic.py

A loader is `load(cfg, log) -> RawData` (uint8 NCHW arrays, labels, class names, source);
`DataModule` holds out the val split, computes mean/std and serves batches.
"""

from __future__ import annotations

from typing import Callable

import torch

from compress.config import DataConfig
from compress.data import fashion_mnist, imagefolder, synthetic
from compress.data.module import DataError, DataModule, RawData

__all__ = ["LOADERS", "DataError", "DataModule", "RawData", "build_data"]

LOADERS: dict[str, Callable[[DataConfig, Callable[[str], None]], RawData]] = {
    "fashion-mnist": fashion_mnist.load,
    "imagefolder": imagefolder.load,
    "synthetic": synthetic.load,
}


def build_data(cfg: DataConfig, device: torch.device | str, seed: int,
               log: Callable[[str], None] | None = None) -> DataModule:
    """Load the dataset `cfg` names onto `device`; `seed` drives the per-epoch shuffles and augmentation."""
    raw = LOADERS[cfg.dataset](cfg, log or (lambda message: None))
    return DataModule(raw, cfg, device, seed)
