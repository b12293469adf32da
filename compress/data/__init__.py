"""Datasets, each loaded whole into one uint8 tensor on the device (the machinery is in module.py).

`build_data(cfg.data, device, seed)` runs the loader named by `data.dataset`:

    fashion-mnist  IDX files, found locally or downloaded, checksummed   fashion_mnist.py, idx.py
    imagefolder    root/train/<class>/*.png and root/test/<class>/...   imagefolder.py
    synthetic      learnable random patterns, for tests and smoke runs  synthetic.py

An image folder is decoded once into an on-disk cache (cache.py) and read from it, whole or a batch at a
time (rows.py), as data.placement decides.

A loader is `load(cfg, log) -> RawData` (uint8 NCHW arrays, labels, class names, source);
`DataModule` holds out the val split, computes mean/std and serves batches.
"""

from __future__ import annotations

from pathlib import Path
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


def build_data(cfg: DataConfig, device: torch.device | str, seed: int, log: Callable[[str], None] | None = None,
               cache_root: Path | None = None, progress: bool | None = None) -> DataModule:
    """Load the dataset `cfg` names onto `device`; `seed` drives the per-epoch shuffles and augmentation.

    An image folder goes through its on-disk cache (compress.data.cache) in data.cache_dir, else
    in `cache_root` (the run root's .cache); with neither, or data.cache false, it is decoded into memory.
    `progress`: the cache build's progress bar (None: when stderr is a terminal).
    """
    log = log or (lambda message: None)
    where = cfg.cache_dir or cache_root
    if cfg.dataset == "imagefolder" and cfg.cache and where is not None:
        from compress.data import cache

        raw = cache.load(cfg, Path(where), log, progress=progress)
    else:
        raw = LOADERS[cfg.dataset](cfg, log)
    return DataModule(raw, cfg, device, seed)
