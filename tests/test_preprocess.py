"""What a pretrained model expects: fixed mean/std, resize + centre crop for evaluation, random-resized-crop
for training (batched on the device), and the bad settings refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.config import DataConfig
from compress.data import DataError, build_data
from compress.data.augment import resized_crop, resized_crop_boxes
from compress.data.module import seeded_generator

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def make_jpeg_folder(root: Path, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (88, 72),
                     test_per_class: int = 4, seed: int = 0) -> Path:
    """root/{train,test}/<class>/*.jpg: RGB JPEGs whose class is a colour cast plus a bright square (learnable)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for split, n in (("train", per_class), ("test", test_per_class)):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 120, (h, w, 3)).astype(np.float64)
                a[..., k % 3] += 100
                y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
                a[y:y + 20, x:x + 20, (k + 1) % 3] = 255
                Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def reference_eval_images(paths: list[Path], resize: int, crop: int, mean, std) -> torch.Tensor:
    """torchvision's Resize(resize) + CenterCrop(crop) + ToTensor + Normalize, written out with PIL and numpy."""
    out = []
    for path in paths:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        img = img.resize(size, Image.Resampling.BILINEAR)
        left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
        a = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
        out.append(torch.from_numpy(((a - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)))
    return torch.stack(out)


def _data(root: Path, **kw) -> DataConfig:
    base = dict(dataset="imagefolder", root=root, val_size=3, batch_size=8, cache=False)
    return DataConfig(**{**base, **kw})


def test_eval_images_are_torchvision_resize_and_center_crop(tmp_path):
    root = make_jpeg_folder(tmp_path / "imgs", size=(88, 72))
    data = build_data(_data(root, image_size=64, resize=73, normalize="imagenet"), "cpu", 0)
    assert data.image_size == (64, 64) and data.stored_size == (73, 73)
    paths = sorted((root / "test").rglob("*.jpg"), key=lambda p: (p.parent.name, p.name))
    x, _ = data.images("test", len(paths))
    torch.testing.assert_close(x, reference_eval_images(paths, 73, 64, *IMAGENET), rtol=0, atol=1e-5)
    pre = data.preprocess
    assert pre["resize"] == 73 and pre["size"] == [64, 64] and pre["normalize"] == "imagenet"
    assert pre["mean"] == list(IMAGENET[0]) and pre["std"] == list(IMAGENET[1])


def test_explicit_mean_std_and_their_bad_lengths(tmp_path):
    root = make_jpeg_folder(tmp_path / "imgs", size=(40, 40), per_class=4, test_per_class=1)
    data = build_data(_data(root, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), "cpu", 0)
    x, _ = data.images("test", 1)
    raw = np.asarray(Image.open(sorted((root / "test" / "class0").glob("*.jpg"))[0]).convert("RGB"), np.float32)
    torch.testing.assert_close(x[0], torch.from_numpy((raw / 255 - 0.5) / 0.25).permute(2, 0, 1), rtol=0, atol=1e-5)
    with pytest.raises(DataError, match=r"data.mean/std has 1 values per channel, but the images have 3 channels"):
        build_data(_data(root, mean=[0.5], std=[0.2]), "cpu", 0)
    with pytest.raises(DataError, match=r"normalize: imagenet has 3 values per channel, but the images have 1 channel"):
        build_data(DataConfig(dataset="synthetic", val_size=8, normalize="imagenet"), "cpu", 0)


@pytest.mark.parametrize("bad, message", [
    (dict(mean=[0.5, 0.5, 0.5]), "mean and std go together"),
    (dict(mean=[0.5, 0.5], std=[0.2, 0.2, 0.2]), "one per channel each"),
    (dict(normalize="imagenet", mean=[0.5], std=[0.2]), "give either it or explicit mean/std"),
    (dict(std=[0.0], mean=[0.0]), "greater than 0"),
    (dict(resize=80), "resize needs image_size"),
    (dict(image_size=64, resize=60), "resize 60 is below image_size 64"),
    (dict(augment={"random_resized_crop": True, "crop_padding": 4}), "both crop"),
    (dict(augment={"random_resized_crop": {"scale": [0.9, 0.2]}}), "min is above max"),
])
def test_bad_preprocessing_settings(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        _data(tmp_path, **bad)


def test_resized_crop_of_the_whole_image_is_the_image():
    x = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    boxes = torch.tensor([[0.0] * 3, [0.0] * 3, [20.0] * 3, [24.0] * 3], dtype=torch.float64)
    torch.testing.assert_close(resized_crop(x, boxes, 20, 24), x.float(), rtol=0, atol=1e-3)
    # a box is the pixels it names: a 10x12 box at (5, 7) read out at its own size is those pixels
    box = torch.tensor([[5.0] * 3, [7.0] * 3, [10.0] * 3, [12.0] * 3])
    torch.testing.assert_close(resized_crop(x, box, 10, 12), x[..., 5:15, 7:19].float(), rtol=0, atol=1e-3)


def test_resized_crop_boxes_follow_scale_and_ratio():
    n, h, w = 2000, 73, 73
    top, left, bh, bw = resized_crop_boxes(n, h, w, (0.25, 1.0), (3 / 4, 4 / 3), seeded_generator(0, 1))
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    share = bh * bw / (h * w)
    assert share.min() > 0.2 and share.max() <= 1.0 and share.std() > 0.1
    ratio = bw / bh
    assert ratio.min() > 0.7 and ratio.max() < 1.4 and math.isclose(float(ratio.log().mean()), 0, abs_tol=0.05)


def test_training_batches_are_random_resized_crops_at_the_model_size(tmp_path):
    root = make_jpeg_folder(tmp_path / "imgs", size=(88, 72))
    cfg = _data(root, image_size=64, resize=73, normalize="imagenet",
                augment={"random_resized_crop": {"scale": [0.3, 1.0]}, "hflip": True})
    data = build_data(cfg, "cpu", 0)
    first = [x for x, _ in data.train_batches(epoch=0)]
    assert all(x.shape[1:] == (3, 64, 64) for x in first)
    again = [x for x, _ in build_data(cfg, "cpu", 0).train_batches(epoch=0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))          # a function of (seed, epoch)
    other = [x for x, _ in data.train_batches(epoch=1)]
    assert not torch.equal(first[0], other[0])
    plain = [x for x, _ in data.train_batches(epoch=0, augment=False)]  # no augmentation: the centre crop
    assert plain[0].shape[1:] == (3, 64, 64) and not torch.equal(plain[0], first[0])
