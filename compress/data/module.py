"""The in-memory dataset every stage reads: one uint8 (N, C, H, W) tensor per split, on the device.

Small vision datasets fit in accelerator memory many times over, so there is no DataLoader and no
per-image Python: a batch is an index into the stored tensor, augmented (random crop after zero
padding and horizontal flip by one gather; rotation and random erasing when the config asks, see
compress.data.augment) and normalized in bulk, all on the device.

Randomness comes from a CPU generator seeded from (run seed, epoch) and is moved to the device
once per epoch, so a run is reproducible and sees the same order on CPU and GPU. The val split,
the imagefolder test hold-out and the calibration subset use fixed seeds of their own, not the
run seed: they are part of the dataset, and runs with different seeds are scored on the same
images.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from compress.config import DataConfig
from compress.data.augment import (ERASE_RATIO, add_noise, brightness_contrast, erase, erasing_boxes, gaussian_blur,
                                    random_crop_flip, resized_crop, resized_crop_boxes, rotate)
from compress.data.rows import DiskRows

SPLITS = ("train", "val", "test")
ERASE_SALT = 0x657261      # the per-step generator of random erasing's noise
NOISE_SALT = 0x6E6F69      # the per-step generator of Gaussian noise (augment.noise)
SPLIT_SEED = 0         # val hold-out (and imagefolder's test hold-out when there is no test/)
CALIBRATION_SEED = 1   # which train images calibrate quantization


class DataError(ValueError):
    """A dataset that cannot be found or trusted; the message is one line meant for the user."""


@dataclass
class RawData:
    """What a dataset loader returns, before the val hold-out."""

    name: str
    class_names: list[str]
    train_x: np.ndarray     # (N, C, H, W) uint8
    train_y: np.ndarray     # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    source: str             # where the files were found, or how the images were made
    fingerprint: str | None = None   # known already (an on-disk cache's manifest); else hashed from the arrays


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator (CPU unless `device`) seeded from several integers (e.g. run seed and epoch) without collisions."""
    state = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0]))


def split_indices(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold k of n items out by a seeded permutation: (kept, held), each in ascending order."""
    perm = torch.randperm(n, generator=seeded_generator(seed)).numpy()
    return np.sort(perm[k:]), np.sort(perm[:k])


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images on the [0, 1] scale, from 256-bin histograms."""
    if isinstance(x, DiskRows):  # counted in chunks (or from the cache's counts): the same integers
        hist = torch.from_numpy(x.histogram())
    else:
        hist = torch.stack([torch.bincount(x[:, ch].reshape(-1), minlength=256) for ch in range(x.shape[1])])
    hist = hist.double().cpu()
    values = torch.arange(256, dtype=torch.float64) / 255
    count = hist.sum(1)
    mean = (hist * values).sum(1) / count
    var = ((hist * values**2).sum(1) / count - mean**2).clamp(min=0)
    std = var.sqrt().where(var > 1e-12, torch.ones_like(var))   # constant images: leave them unscaled
    return tuple(mean.tolist()), tuple(std.tolist())


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _fixed_stats(cfg: DataConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """data.normalize: imagenet or explicit mean/std (checked against the channel count); None: measure them."""
    if cfg.mean is not None:
        mean, std, what = tuple(cfg.mean), tuple(cfg.std), "data.mean/std"
    elif cfg.normalize == "imagenet":
        mean, std, what = IMAGENET_MEAN, IMAGENET_STD, "data.normalize: imagenet"
    else:
        return None
    if len(mean) != channels:
        raise DataError(f"{what} has {len(mean)} values per channel, but the images have {channels} "
                        f"channel{'s' if channels != 1 else ''}")
    return mean, std


def _fingerprint(raw: RawData) -> str:
    h = hashlib.sha256()
    h.update(repr((raw.name, raw.class_names)).encode())
    for arr in (raw.train_x, raw.train_y, raw.test_x, raw.test_y):
        arr = np.ascontiguousarray(arr)
        h.update(repr((arr.dtype.str, arr.shape)).encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _check(raw: RawData, cfg: DataConfig) -> None:
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{raw.source}: {split} images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise DataError(f"{raw.source}: {split} has {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= len(raw.class_names)):
            raise DataError(f"{raw.source}: {split} labels span {y.min()}..{y.max()}, "
                            f"expected 0..{len(raw.class_names) - 1}")
    if raw.test_x.shape[1:] != raw.train_x.shape[1:]:
        raise DataError(f"{raw.source}: test images are {raw.test_x.shape[1:]}, train images {raw.train_x.shape[1:]}")
    if cfg.val_size >= len(raw.train_x):
        raise DataError(f"data.val_size={cfg.val_size} leaves no training images: {raw.name} has "
                        f"{len(raw.train_x)}; set data.val_size lower")


def _placement(choice: str, device: torch.device, nbytes: int, on_disk: bool = False) -> str:
    """Where the uint8 images go: the device itself, or host memory / the disk cache, streamed (DataConfig.placement)."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    elif on_disk:  # in memory only when it fits comfortably: a quarter of what is available
        free = available_memory()
    else:
        return "device"  # already in host memory, which is the device's memory
    return "device" if nbytes < free / 4 else "host"


def available_memory() -> int:
    """Bytes of host memory available to a new allocation without swapping (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _Gather(torch.utils.data.Dataset):
    """Item i is batch i: the uint8 images at a list of indices (one gather per batch, in a worker)."""

    def __init__(self, x: Tensor, batches: list[Tensor]):
        self.x, self.batches = x, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[self.batches[i]]


class DataModule:
    """A dataset held on `device`, split into train / val / test, with batch iterators.

    Attributes: name, num_classes, class_names, in_channels, image_size (H, W), mean and std
    (per channel, on the [0, 1] scale, from the train split after the val hold-out), num_train,
    num_val, num_test, source, fingerprint (sha256 of the images and labels, for cache keys) and
    preprocess (what a deployed model must do to a uint8 image).

    Where the uint8 images live is `placement` (DataConfig.placement): "device" (one tensor per
    split on the device: a batch is one gather there) or "host" (host memory, pinned on CUDA;
    DataLoader workers gather each batch and it is copied over asynchronously). Either way the
    augmentation and normalization run batched on the device, and the batches are the same.
    """

    def __init__(self, raw: RawData, cfg: DataConfig, device: torch.device | str, seed: int):
        _check(raw, cfg)
        self.name = raw.name
        self.class_names = list(raw.class_names)
        self.num_classes = len(self.class_names)
        self.source = raw.source
        self.fingerprint = raw.fingerprint or _fingerprint(raw)
        self.device = torch.device(device)
        self.seed = seed
        self.batch_size = cfg.batch_size
        self.eval_batch_size = cfg.eval_batch_size
        self.augment = cfg.augment
        # random-resized-crop replaces the padded crop (the config refuses both)
        self.resized_crop = cfg.augment.random_resized_crop or None
        self.crop_padding = 0 if self.resized_crop else cfg.augment.crop_padding
        self.hflip = cfg.augment.hflip

        train_idx, val_idx = split_indices(len(raw.train_x), cfg.val_size, SPLIT_SEED)
        arrays = {"train": (raw.train_x[train_idx], raw.train_y[train_idx]),
                  "val": (raw.train_x[val_idx], raw.train_y[val_idx]),
                  "test": (raw.test_x, raw.test_y)}
        on_disk = isinstance(raw.train_x, DiskRows)   # an on-disk cache (compress.data.cache)
        self.placement = _placement(cfg.placement, self.device, sum(x.nbytes for x, _ in arrays.values()), on_disk)
        self.workers = cfg.workers
        # Streamed: batches are read from the cache file by DataLoader workers, memory bounded by the batches in flight.
        self.streamed = on_disk and self.placement == "host"
        store = self.device if self.placement == "device" else torch.device("cpu")
        # np.require copies read-only buffers (np.frombuffer) that torch would warn about (and reads DiskRows whole)
        self._x = {s: x if self.streamed else torch.from_numpy(np.require(x, requirements="CW")).to(store)
                   for s, (x, _) in arrays.items()}
        if store != self.device and self.device.type == "cuda" and not self.streamed:  # page-locked: copies overlap
            self._x = {s: x.pin_memory() for s, x in self._x.items()}
        self._y = {s: torch.from_numpy(y.astype(np.int64)).to(self.device) for s, (_, y) in arrays.items()}

        _, self.in_channels, h, w = self._x["train"].shape
        self.stored_size = (h, w)
        if cfg.resize is not None:  # stored at resize x resize; the model sees the image_size crop of it
            h = w = cfg.image_size
        self.image_size = (h, w)
        self.num_train, self.num_val, self.num_test = (len(self._y[s]) for s in SPLITS)
        self.mean, self.std = _fixed_stats(cfg, self.in_channels) or _channel_stats(self._x["train"])
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.preprocess = {
            "size": [h, w],
            "channels": self.in_channels,
            "layout": "NCHW",
            "dtype": "float32",
            "scale": 1 / 255,
            "mean": list(self.mean),
            "std": list(self.std),
            "formula": "x = (pixel * scale - mean[c]) / std[c]",
            "class_names": self.class_names,
        }
        if cfg.resize is not None:  # infer.py: shorter side to `resize`, centre square, centre `size` crop
            self.preprocess.update(resize=cfg.resize, resize_mode="shorter_side_center_crop",
                                   formula="shorter side -> resize (bilinear), centre crop to size; "
                                           "x = (pixel * scale - mean[c]) / std[c]")
        self.preprocess["normalize"] = "dataset" if cfg.mean is None and cfg.normalize == "dataset" else (
            cfg.normalize if cfg.mean is None else "explicit")

    def __repr__(self) -> str:
        return (f"DataModule({self.name}: {self.num_train} train / {self.num_val} val / {self.num_test} test, "
                f"{self.in_channels}x{self.image_size[0]}x{self.image_size[1]}, {self.num_classes} classes, "
                f"from {self.source})")

    def summary(self) -> dict:
        """Plain values for manifests and the report."""
        return {"name": self.name, "source": self.source, "fingerprint": self.fingerprint,
                "num_train": self.num_train, "num_val": self.num_val, "num_test": self.num_test,
                "num_classes": self.num_classes, "preprocess": self.preprocess}

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> float32, scaled to [0, 1] then standardized per channel.

        Images at the stored size when that is larger than the model's (data.resize) are centre-cropped
        to image_size first, offsets rounded as torchvision's CenterCrop rounds them."""
        if tuple(x.shape[-2:]) == self.stored_size != self.image_size:
            (sh, sw), (h, w) = self.stored_size, self.image_size
            top, left = int(round((sh - h) / 2.0)), int(round((sw - w) / 2.0))
            x = x[..., top:top + h, left:left + w]
        return (x.float() / 255 - self._mean) / self._std

    def steps_per_epoch(self, batch_size: int | None = None) -> int:
        return math.ceil(self.num_train / (batch_size or self.batch_size))

    def train_batches(self, epoch: int, batch_size: int | None = None, augment: bool = True,
                      shard: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled, augmented, normalized (images, labels) on the device.

        Nothing is dropped: the epoch is cut into steps_per_epoch() batches of near-equal size
        (differing by at most one, none larger than batch_size), so there is no straggler batch of
        one image to upset BatchNorm. The order depends only on (seed, epoch); `augment=False`
        gives the same order without any augmentation.

        Augmentation, in order: crop and flip (uint8), rotation, normalization, random erasing.
        Its parameters are drawn per image with the order, so they too depend only on (seed,
        epoch); erasing's noise (`erasing_value: random`) comes from a device generator seeded by
        (seed, epoch, step), so it differs between CPU and CUDA but repeats on each.

        shard=(rank, world): only this process's slice of every batch (`batch.tensor_split(world)[rank]`
        of the whole batch, bit for bit), read and augmented alone: under DDP each process reads its share.
        """
        n = self.num_train
        aug = self.augment
        g = seeded_generator(self.seed, epoch)
        order = torch.randperm(n, generator=g)
        pad = self.crop_padding if augment else 0
        flip = augment and self.hflip
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=g) if pad else torch.full((2, n), 0)
        flips = torch.rand(n, generator=g) < 0.5 if flip else None
        # Drawn after the draws above, and only when on: switching them on leaves crops and flips as they were.
        degrees = (2 * torch.rand(n, generator=g) - 1) * aug.rotation if augment and aug.rotation else None
        erasing = augment and aug.erasing > 0
        # The photometric steps draw after everything above, each only when on: switching one on leaves the
        # crops, flips, rotations and erasing boxes of the same (seed, epoch) as they were.
        bright = contrast = sigma = noise_std = None
        if augment and (aug.brightness or aug.contrast):
            bright = 1 + aug.brightness * (2 * torch.rand(n, generator=g) - 1)
            contrast = 1 + aug.contrast * (2 * torch.rand(n, generator=g) - 1)
        if augment and aug.blur:
            lo, hi = aug.blur_sigma
            sigma = torch.where(torch.rand(n, generator=g) < aug.blur, lo + (hi - lo) * torch.rand(n, generator=g), 0.0)
        if augment and aug.noise and aug.noise_std:
            noise_std = torch.where(torch.rand(n, generator=g) < aug.noise, float(aug.noise_std), 0.0)
        if erasing:
            h, w = self.image_size
            lo, hi = aug.erasing_area
            erase_on = torch.rand(n, generator=g) < aug.erasing
            area = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
            log_ratio = torch.empty(n, dtype=torch.float64).uniform_(*map(math.log, ERASE_RATIO), generator=g)
            boxes = erasing_boxes(area, log_ratio, torch.rand(2, n, generator=g, dtype=torch.float64), h, w)
        # Drawn last, and only when on: switching it on leaves every draw above as it was.
        rrc = (resized_crop_boxes(n, *self.stored_size, self.resized_crop.scale, self.resized_crop.ratio, g)
               if augment and self.resized_crop else None)
        to_device = lambda t: t.to(self.device, non_blocking=True) if t is not None else None  # noqa: E731
        rrc = to_device(rrc)
        order, offsets, flips, degrees = map(to_device, (order, offsets, flips, degrees))
        bright, contrast, sigma, noise_std = map(to_device, (bright, contrast, sigma, noise_std))
        if erasing:
            erase_on, boxes = to_device(erase_on), to_device(boxes)

        steps = self.steps_per_epoch(batch_size)
        x, y = self._x["train"], self._y["train"]
        positions = torch.arange(n, device=self.device).tensor_split(steps)
        full = [len(pos) for pos in positions]
        if shard is not None:
            positions = [pos.tensor_split(shard[1])[shard[0]] for pos in positions]

        def batch_noise(step: int, salt: int, like: Tensor) -> Tensor:
            """The step's noise, drawn for the whole batch; under `shard`, this process's rows of it."""
            gen = seeded_generator(self.seed, epoch, step, salt, device=self.device)
            noise = torch.randn((full[step], *like.shape[1:]), generator=gen, device=self.device)
            return noise if shard is None else noise.tensor_split(shard[1])[shard[0]]

        gathered = self._host_batches(x, [order[pos] for pos in positions]) if self.placement == "host" else None
        for step, pos in enumerate(positions):
            idx = order[pos]
            xb = x[idx] if gathered is None else next(gathered).to(self.device, non_blocking=True)
            if rrc is not None:       # random-resized-crop to the model's size comes before every other step
                xb = resized_crop(xb, rrc[:, pos], *self.image_size)
            for name in aug.order:    # the pixel-space steps, in the YAML's order (uint8 until one makes floats)
                if name == "crop_flip" and (pad or flip):
                    xb = random_crop_flip(xb, pad, offsets[0, pos], offsets[1, pos], flips[pos] if flip else None)
                elif name == "rotation" and degrees is not None:
                    xb = rotate(xb, degrees[pos])
                elif name == "jitter" and bright is not None:
                    xb = brightness_contrast(xb, bright[pos], contrast[pos])
                elif name == "blur" and sigma is not None:
                    xb = gaussian_blur(xb, sigma[pos], max_sigma=aug.blur_sigma[1])
                elif name == "noise" and noise_std is not None:
                    xb = add_noise(xb, noise_std[pos], batch_noise(step, NOISE_SALT, xb))
            xb = self.normalize(xb)
            if erasing:
                value = 0.0
                if aug.erasing_value == "random":
                    value = batch_noise(step, ERASE_SALT, xb)
                xb = erase(xb, boxes[:, pos], erase_on[pos], value)
            yield xb, y[idx]

    def _host_batches(self, x: Tensor, batches: list[Tensor]) -> Iterator[Tensor]:
        """placement host: uint8 batches of `x` (host memory) gathered by DataLoader workers, pinned on CUDA."""
        from torch.utils.data import DataLoader

        batches = [b.cpu() for b in batches]
        loader = DataLoader(_Gather(x, batches), batch_size=None, shuffle=False, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None)
        return iter(loader)

    def eval_batches(self, split: str, batch_size: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """A split in its fixed order, normalized, without augmentation."""
        x, y = self._split(split)
        bs = batch_size or self.eval_batch_size
        starts = range(0, len(y), bs)
        gathered = (self._host_batches(x, [torch.arange(s, min(s + bs, len(y))) for s in starts]) if self.streamed
                    else (x[s:s + bs] for s in starts))
        for start, xb in zip(starts, gathered):
            yield self.normalize(xb.to(self.device, non_blocking=True)), y[start:start + bs]

    def images(self, split: str, n: int) -> tuple[Tensor, Tensor]:
        """The first n (or all, if fewer) normalized images and labels of a split."""
        x, y = self._split(split)
        return self.normalize(x[:n].to(self.device)), y[:n]

    def calibration_images(self, n: int) -> Tensor:
        """n normalized train images (all of them, if fewer), the same subset in every run.

        Drawn from train only: calibrating on val or test would leak them into the int8 model.
        """
        idx = torch.randperm(self.num_train, generator=seeded_generator(CALIBRATION_SEED))[:n]
        x = self._x["train"]
        return self.normalize(x[idx.to(x.device)].to(self.device))

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self._x[split], self._y[split]

    def calibration_subset(self, split: str, n: int, seed: int = CALIBRATION_SEED) -> Tensor:
        """n normalized images of train or val (all, if fewer), a seeded random subset; never test.

        With split="train" and the default seed this is `calibration_images(n)`.
        """
        if split not in ("train", "val"):
            raise ValueError(f"calibration images come from train or val, not {split!r}")
        x, _ = self._split(split)
        idx = torch.randperm(len(x), generator=seeded_generator(seed))[:n]
        return self.normalize(x[idx.to(x.device)].to(self.device))
