"""A folder of images with one subfolder per class (the torchvision ImageFolder layout).

    root/train/<class>/*.png|jpg|jpeg|bmp|webp|tif    training images (val is held out of these)
    root/test/<class>/...                            optional; without it a fixed-seed 10% of
                                                     train/ becomes the test split

Classes are the sorted subfolder names of train/. All images are converted to the channel count
most of them have (ties: the first image's): L -> 1, LA -> 2, RGB -> 3, RGBA -> 4, palette images
count as RGB (RGBA with transparency), CMYK as RGB, 16-bit grey is scaled to 8 bits. So one stray
grayscale JPEG in an RGB set is converted, not fatal. Without data.image_size every image must have
the same size; with it, each is resized (bilinear, squashed, not cropped) to image_size x image_size.
With data.resize, each image's shorter side is resized to it and the centre square kept (torchvision's
Resize + CenterCrop, for models pretrained that way); the model's image_size crop is taken from that
square later, on the device (centred for evaluation, random-resized for training).
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from compress.config import DataConfig
from compress.data.module import SPLIT_SEED, DataError, RawData, split_indices

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
TEST_FRACTION = 0.1
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _image_lib():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("the imagefolder dataset needs Pillow: pip install pillow") from None
    return Image


def list_images(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (path, label) pairs under split_dir/<class>/; `classes` fixes the label order."""
    dirs = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    is_train = classes is None
    if not dirs:
        raise DataError(f"{split_dir}: no class subfolders (expected {split_dir}/<class>/*.png)")
    if is_train and len(dirs) < 2:  # one class: every prediction is right, and the report would say 100%
        raise DataError(f"{split_dir}: one class subfolder ({dirs[0]!r}); a classifier needs at least two "
                        f"classes, one subfolder each")
    if classes is None:
        classes = dirs
    elif unknown := sorted(set(dirs) - set(classes)):
        raise DataError(f"{split_dir}/{unknown[0]}: class not present in train/ ({len(unknown)} such)")
    items = []
    for name in dirs:
        files = sorted(p for p in (split_dir / name).iterdir()
                       if p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
        for p in files:  # only regular files are opened: a FIFO would block the decoder forever
            if not stat.S_ISREG(p.stat().st_mode if p.exists() else 0):
                raise DataError(f"{p}: not a regular file (a FIFO, device, directory or broken link); "
                                f"an image folder holds image files only")
        if not files and is_train:  # a training class without images is surely a mistake
            raise DataError(f"{split_dir / name}: no images ({', '.join(EXTENSIONS)})")
        items += [(p, classes.index(name)) for p in files]
    if not items:
        raise DataError(f"{split_dir}: no images ({', '.join(EXTENSIONS)}) in its class subfolders")
    return classes, items


def _channels(img) -> int:
    if img.mode == "P":
        return 4 if "transparency" in img.info else 3
    return {"PA": 4, "CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}.get(img.mode, len(img.getbands()))


def _probe(path: Path) -> tuple[int, tuple[int, int]]:
    """Channel count and (width, height), from the header only."""
    Image = _image_lib()
    try:
        with Image.open(path) as img:
            return _channels(img), img.size
    except Exception as exc:
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {str(exc)[:120]})") from None


def _center(length: int, crop: int) -> int:
    return int(round((length - crop) / 2.0))  # torchvision's CenterCrop offset (Python's round: half to even)


def resize_center_crop(img, resize: int, crop: int | None = None):
    """The resize x resize square of a PIL image after torchvision's Resize(resize): the shorter side to
    `resize` (the longer one to int(resize * long / short)), bilinear with PIL's antialiasing.

    The square is placed so that its own centre `crop` (as DataModule takes it for evaluation) is exactly
    torchvision's Resize(resize) + CenterCrop(crop) of the image; without `crop`, it is the centre square.
    """
    Image = _image_lib()
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    crop = resize if crop is None else crop
    left, top = (min(max(_center(n, crop) - _center(resize, crop), 0), n - resize) for n in size)
    return img.crop((left, top, left + resize, top + resize))


def _decode(path: Path, channels: int, size: tuple[int, int], resize: int | None = None,
            crop: int | None = None) -> np.ndarray:
    Image = _image_lib()
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):  # 16/32-bit grey: keep the top 8 bits of 16-bit data
                a = np.asarray(img)
                img = Image.fromarray((a >> 8 if a.max() > 255 else a).clip(0, 255).astype(np.uint8))
            img = img.convert(MODES[channels])
            if resize is not None:
                img = resize_center_crop(img, resize, crop)
            elif img.size != size:
                img = img.resize(size, Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {str(exc)[:120]})") from None
    return a[:, :, None] if a.ndim == 2 else a


def _read_all(items: list[tuple[Path, int]], channels: int, size: tuple[int, int],
              resize: int | None = None, crop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    w, h = size
    try:
        x = np.empty((len(items), channels, h, w), dtype=np.uint8)
    except (MemoryError, ValueError):
        raise DataError(f"{len(items)} images of {channels}x{h}x{w} ({len(items) * channels * h * w / 2**30:.1f} GiB) "
                        f"do not fit in memory; use a smaller data.image_size") from None

    def fill(i: int) -> None:
        x[i] = _decode(items[i][0], channels, size, resize, crop).transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoders release the GIL
        list(pool.map(fill, range(len(items))))
    return x, np.array([label for _, label in items], dtype=np.int64)


@dataclass
class Plan:
    """What an image folder decodes to, found from the listing and the image headers alone."""

    root: Path
    classes: list[str]
    train: list[tuple[Path, int]]          # (path, label)
    test: list[tuple[Path, int]] | None    # None: no test/ folder, a share of train is held out
    channels: int
    size: tuple[int, int]                  # (width, height) of every decoded image
    resize: int | None = None              # data.resize: shorter side to this, centre square (size is its square)
    crop: int | None = None                # data.image_size with resize: the evaluation crop of that square

    def read(self, items: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Decode `items` (any subset of train or test): uint8 (N, C, H, W) images and int64 labels."""
        return _read_all(items, self.channels, self.size, self.resize, self.crop)


def listing(cfg: DataConfig) -> tuple[Path, list[str], list[tuple[Path, int]], list[tuple[Path, int]] | None]:
    """(root, classes, train items, test items or None), from the folder listing only (no image is opened)."""
    if cfg.root is None:
        raise DataError("data.root is required for the imagefolder dataset (root/train/<class>/*.png)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root}: no such directory")
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder (expected {root}/train/<class>/*.png)")
    classes, train = list_images(root / "train")
    test = list_images(root / "test", classes)[1] if (root / "test").is_dir() else None
    return root, classes, train, test


def plan(cfg: DataConfig, log: Callable[[str], None]) -> Plan:
    """List the folder and read every image header: the classes, the items and the decoded shape."""
    root, classes, train, test = listing(cfg)
    everything = train + (test or [])
    probes = [_probe(p) for p, _ in everything]
    counts = Counter(c for c, _ in probes)
    channels = max(counts, key=lambda c: (counts[c], c == probes[0][0]))
    if converted := len(probes) - counts[channels]:
        log(f"imagefolder: {converted} of {len(probes)} images converted to {MODES[channels]}")
    if cfg.resize is not None:  # stored at resize x resize; the model's crop is taken later (DataModule)
        size = (cfg.resize, cfg.resize)
    elif cfg.image_size is not None:
        size = (cfg.image_size, cfg.image_size)
    else:
        size = probes[0][1]
        for (path, _), (_, other) in zip(everything, probes):
            if other != size:
                raise DataError(f"{path}: image is {other[0]}x{other[1]}, but {everything[0][0]} is "
                                f"{size[0]}x{size[1]}; set data.image_size to resize them all")
    if test is None and len(train) < 2:
        raise DataError(f"{root}/train: one image is not enough to hold out a test split")
    return Plan(root, classes, train, test, channels, size, cfg.resize, cfg.image_size if cfg.resize else None)


def test_holdout(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Without test/: (kept, held) indices of the n train images, and the note for the source line."""
    keep, held = split_indices(n, max(1, round(TEST_FRACTION * n)), SPLIT_SEED)
    return keep, held, f" (no test/: {len(held)} images of train/ held out as test, seed {SPLIT_SEED})"


def load(cfg: DataConfig, log: Callable[[str], None]) -> RawData:
    p = plan(cfg, log)
    train_x, train_y = p.read(p.train)
    note = ""
    if p.test is not None:
        test_x, test_y = p.read(p.test)
    else:
        keep, held, note = test_holdout(len(p.train))
        train_x, train_y, test_x, test_y = train_x[keep], train_y[keep], train_x[held], train_y[held]
    return RawData("imagefolder", p.classes, train_x, train_y, test_x, test_y, source=f"{p.root}{note}")
