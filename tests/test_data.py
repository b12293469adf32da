"""Datasets: IDX parsing and its failure modes, Fashion-MNIST lookup and checksums, imagefolder,
synthetic data, and the DataModule's splits, batches, augmentation and normalization."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.config import AugmentConfig, DataConfig, SyntheticConfig
from compress.data import DataError, DataModule, RawData, build_data, fashion_mnist
from compress.data.idx import read_idx, read_idx_pair, write_idx
from compress.data.module import random_crop_flip

CPU = torch.device("cpu")


def synthetic_cfg(**kw) -> DataConfig:
    syn = SyntheticConfig(num_train=240, num_test=60, num_classes=4, image_size=12, channels=kw.pop("channels", 1))
    return DataConfig(dataset="synthetic", synthetic=syn, val_size=kw.pop("val_size", 40), batch_size=32, **kw)


def indexed_raw(n_train: int = 100, n_test: int = 20) -> RawData:
    """Images that carry their own index in two pixels, so splits and orders can be read back."""
    def make(n, offset):
        x = np.random.default_rng(offset).integers(0, 256, (n, 1, 6, 6), dtype=np.uint8)
        idx = np.arange(offset, offset + n)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = idx % 256, idx // 256
        return x, idx % 3
    (train_x, train_y), (test_x, test_y) = make(n_train, 0), make(n_test, 10_000)
    return RawData("indexed", ["a", "b", "c"], train_x, train_y, test_x, test_y, source="test")


def pixels(dm: DataModule, x: torch.Tensor) -> torch.Tensor:
    """Undo normalization: back to uint8 grey levels."""
    mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.std).view(1, -1, 1, 1)
    return ((x.cpu() * std + mean) * 255).round().to(torch.uint8)


def indices(dm: DataModule, x: torch.Tensor) -> list[int]:
    p = pixels(dm, x).long()
    return (p[:, 0, 0, 0] + 256 * p[:, 0, 0, 1]).tolist()


# ---------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    write_idx(tmp_path / f"img{suffix}", images)
    write_idx(tmp_path / f"lab{suffix}", labels)
    if suffix:
        assert gzip.decompress((tmp_path / "img.gz").read_bytes())[:4] == b"\0\0\x08\x03"
    x, y = read_idx_pair(tmp_path / f"img{suffix}", tmp_path / f"lab{suffix}")
    assert x.shape == (7, 1, 5, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], images)
    np.testing.assert_array_equal(y, labels)
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    write_idx(tmp_path / f"f{suffix}", floats)
    np.testing.assert_array_equal(read_idx(tmp_path / f"f{suffix}"), floats)


def test_truncated_idx(tmp_path):
    write_idx(tmp_path / "img", np.zeros((10, 4, 4), np.uint8))
    data = (tmp_path / "img").read_bytes()
    (tmp_path / "img").write_bytes(data[:-5])
    with pytest.raises(DataError, match=r"img: truncated IDX file: header says shape \(10, 4, 4\)"):
        read_idx(tmp_path / "img")
    (tmp_path / "hdr").write_bytes(data[:9])
    with pytest.raises(DataError, match="truncated IDX file"):
        read_idx(tmp_path / "hdr")
    (tmp_path / "img.gz").write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DataError, match=r"img.gz: truncated gzip"):
        read_idx(tmp_path / "img.gz")
    (tmp_path / "long").write_bytes(data + b"\0")
    with pytest.raises(DataError, match="1 unexpected bytes"):
        read_idx(tmp_path / "long")


def test_bad_magic_and_not_idx(tmp_path):
    write_idx(tmp_path / "labels", np.zeros(10, np.uint8))
    write_idx(tmp_path / "images", np.zeros((10, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"labels: bad IDX magic 0x00000801, expected 0x00000803"):
        read_idx_pair(tmp_path / "labels", tmp_path / "labels")
    (tmp_path / "junk").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataError, match="junk: not an IDX file"):
        read_idx(tmp_path / "junk")
    (tmp_path / "fake.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="fake.gz: not a valid gzip file"):
        read_idx(tmp_path / "fake.gz")
    with pytest.raises(DataError, match="absent: no such file"):
        read_idx(tmp_path / "absent")


def test_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "images", np.zeros((10, 2, 2), np.uint8))
    write_idx(tmp_path / "labels", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match=r"labels: 9 labels, but .*images has 10 images"):
        read_idx_pair(tmp_path / "images", tmp_path / "labels")


# ------------------------------------------------------------------------------ Fashion-MNIST


def write_fake_fashion(directory: Path, gz: bool = False) -> None:
    """Well-formed IDX files under the standard names, with the wrong content."""
    suffix = ".gz" if gz else ""
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", np.zeros((n, 28, 28), np.uint8))
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10)


@pytest.mark.parametrize("gz", [False, True])
def test_checksum_mismatch(tmp_path, gz):
    write_fake_fashion(tmp_path, gz)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte(\.gz)?: checksum mismatch"):
        build_data(DataConfig(root=tmp_path, val_size=2), CPU, 0)


def test_explicit_root_does_not_fall_back(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"missing train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                                        r"t10k-labels-idx1-ubyte \(plain or .gz\)"):
        build_data(DataConfig(root=tmp_path), CPU, 0)
    with pytest.raises(DataError, match="no such directory"):
        build_data(DataConfig(root=tmp_path / "nope"), CPU, 0)


@pytest.fixture
def isolated_search(tmp_path, monkeypatch):
    """No system copy, no $COMPRESS_DATA, an empty cache: the lookup has to report or download."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.delenv("COMPRESS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_not_found_without_download(isolated_search):
    with pytest.raises(DataError, match="Fashion-MNIST not found .*data.download: true"):
        build_data(DataConfig(download=False), CPU, 0)


def test_download_refuses_wrong_checksum(isolated_search, monkeypatch):
    mirror = isolated_search / "mirror"
    mirror.mkdir()
    write_fake_fashion(mirror, gz=True)
    monkeypatch.setattr(fashion_mnist, "MIRRORS", (mirror.as_uri() + "/", (isolated_search / "none").as_uri() + "/"))
    with pytest.raises(DataError, match=r"could not download train-images-idx3-ubyte.gz \(.*checksum mismatch"):
        build_data(DataConfig(download=True), CPU, 0)
    cache = isolated_search / "cache" / "compress" / "fashion-mnist"
    assert not cache.exists() or not any(cache.iterdir())  # nothing unverified is kept, no temp files


def test_partial_folder_on_search_path_is_an_error(isolated_search, monkeypatch):
    env = isolated_search / "env"
    (env / "fashion-mnist").mkdir(parents=True)
    write_idx(env / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    monkeypatch.setenv("COMPRESS_DATA", str(env))
    with pytest.raises(DataError, match=r"env/fashion-mnist: missing train-images-idx3-ubyte"):
        build_data(DataConfig(download=False), CPU, 0)


@pytest.fixture(scope="module")
def fmnist() -> DataModule:
    if len(fashion_mnist.find_files(fashion_mnist.SYSTEM_DIR)) < 4:
        pytest.skip(f"{fashion_mnist.SYSTEM_DIR} absent (Debian package dataset-fashion-mnist)")
    return build_data(DataConfig(root=fashion_mnist.SYSTEM_DIR), CPU, seed=0)


def test_real_fashion_mnist(fmnist):
    assert (fmnist.num_train, fmnist.num_val, fmnist.num_test) == (55000, 5000, 10000)
    assert fmnist.in_channels == 1 and fmnist.image_size == (28, 28) and fmnist.num_classes == 10
    assert fmnist.class_names[0] == "T-shirt/top" and fmnist.class_names[9] == "Ankle boot"
    assert fmnist.source == str(fashion_mnist.SYSTEM_DIR)
    assert fmnist.mean[0] == pytest.approx(0.286, abs=0.002) and fmnist.std[0] == pytest.approx(0.353, abs=0.002)
    x, y = fmnist.images("test", 8)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the first test image of Fashion-MNIST is an ankle boot, the first train label a 9 as well
    assert y[0].item() == 9
    x, y = next(fmnist.train_batches(0))
    assert x.shape == (256, 1, 28, 28) and y.shape == (256,)
    assert fmnist.steps_per_epoch() == math.ceil(55000 / 256)
    assert fmnist.preprocess["size"] == [28, 28] and fmnist.preprocess["layout"] == "NCHW"


def test_fashion_mnist_via_env_subfolder(isolated_search, monkeypatch):
    system = fashion_mnist.find_files(Path("/usr/share/datasets/fashion-mnist"))
    if len(system) < 4:
        pytest.skip("/usr/share/datasets/fashion-mnist absent")
    sub = isolated_search / "env" / "fashion-mnist"
    sub.mkdir(parents=True)
    for path in system.values():
        (sub / path.name).symlink_to(path)
    monkeypatch.setenv("COMPRESS_DATA", str(sub.parent))
    dm = build_data(DataConfig(val_size=10), CPU, 0)
    assert dm.source == str(sub) and dm.num_train == 59990


# ------------------------------------------------------------------------------- DataModule


def test_val_split_is_fixed_and_disjoint():
    cfg = DataConfig(val_size=30, batch_size=16)
    a, b = DataModule(indexed_raw(), cfg, CPU, seed=1), DataModule(indexed_raw(), cfg, CPU, seed=2)
    val = indices(a, a.images("val", 1000)[0])
    train = indices(a, a.images("train", 1000)[0])
    assert len(val) == a.num_val == 30 and len(train) == a.num_train == 70
    assert not set(val) & set(train) and set(val) | set(train) == set(range(100))
    assert val == indices(b, b.images("val", 1000)[0])       # independent of the run seed
    assert val != list(range(30))                             # a shuffle, not the first 30
    assert indices(a, a.images("test", 5)[0]) == list(range(10_000, 10_005))


def test_val_size_too_large():
    with pytest.raises(DataError, match="data.val_size=100 leaves no training images"):
        DataModule(indexed_raw(), DataConfig(val_size=100), CPU, 0)


def test_train_batches_cover_epoch_once_and_reproducibly():
    cfg = DataConfig(val_size=30, batch_size=16, augment=AugmentConfig(crop_padding=0, hflip=False))
    dm = DataModule(indexed_raw(), cfg, CPU, seed=3)
    batches = list(dm.train_batches(0))
    assert len(batches) == dm.steps_per_epoch() == 5                 # 70 images -> 14 x 5
    assert all(len(y) <= 16 for _, y in batches)
    seen = [i for x, _ in batches for i in indices(dm, x)]
    assert sorted(seen) == sorted(indices(dm, dm.images("train", 1000)[0]))
    assert [i % 3 for i in seen] == torch.cat([y for _, y in batches]).tolist()  # labels follow images
    assert seen == [i for x, _ in dm.train_batches(0) for i in indices(dm, x)]
    assert seen != [i for x, _ in dm.train_batches(1) for i in indices(dm, x)]
    other_seed = DataModule(indexed_raw(), cfg, CPU, seed=4)
    assert seen != [i for x, _ in other_seed.train_batches(0) for i in indices(dm, x)]
    assert len(list(dm.train_batches(0, batch_size=100))) == 1


def test_augmentation_reproducible_and_real():
    dm = build_data(synthetic_cfg(augment=AugmentConfig(crop_padding=2, hflip=True)), CPU, seed=0)
    first = list(dm.train_batches(5))
    again = list(dm.train_batches(5))
    plain = list(dm.train_batches(5, augment=False))
    for (x1, y1), (x2, y2), (x0, y0) in zip(first, again, plain):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(y1, y0) and x1.shape == x0.shape == (len(y0), 1, 12, 12)
    assert not all(torch.equal(x1, x0) for (x1, _), (x0, _) in zip(first, plain))
    # every augmented image is a padded crop, maybe mirrored, of the same image unaugmented
    aug, orig = pixels(dm, first[0][0][:6]), pixels(dm, plain[0][0][:6])
    for a, o in zip(aug, orig):
        candidates = [random_crop_flip(o[None], 2, torch.tensor([dy]), torch.tensor([dx]), torch.tensor([f]))[0]
                      for dy in range(5) for dx in range(5) for f in (False, True)]
        assert any(torch.equal(a, c) for c in candidates)


def test_no_augmentation_is_identity():
    dm = build_data(synthetic_cfg(augment=AugmentConfig(crop_padding=0, hflip=False)), CPU, seed=0)
    for (x1, y1), (x0, y0) in zip(dm.train_batches(2), dm.train_batches(2, augment=False)):
        assert torch.equal(x1, x0) and torch.equal(y1, y0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu():
    cfg = synthetic_cfg(channels=3)
    cpu, cuda = build_data(cfg, CPU, seed=7), build_data(cfg, torch.device("cuda"), seed=7)
    for (xc, yc), (xg, yg) in zip(cpu.train_batches(1), cuda.train_batches(1)):
        assert xg.is_cuda and yg.is_cuda                    # data lives and is augmented on the device
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-6)
    assert cuda.calibration_images(8).is_cuda


def test_random_crop_flip_by_hand():
    x = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3)
    zero = torch.tensor([0])
    one = torch.tensor([1])
    assert torch.equal(random_crop_flip(x, 1, one, one, None), x)                      # centre crop
    assert torch.equal(random_crop_flip(x, 0, zero, zero, torch.tensor([True])), x.flip(3))
    shifted = random_crop_flip(x, 1, zero, zero, None)[0, 0]                           # window moved up-left
    assert shifted.tolist() == [[0, 0, 0], [0, 0, 1], [0, 3, 4]]


def test_normalization_standardizes_train():
    dm = build_data(synthetic_cfg(channels=3), CPU, seed=0)
    x = torch.cat([x for x, _ in dm.eval_batches("train", batch_size=64)]).double()
    assert x.shape == (dm.num_train, 3, 12, 12)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-3)
    assert dm.preprocess["mean"] == list(dm.mean) and dm.preprocess["channels"] == 3


def test_eval_images_and_calibration():
    dm = DataModule(indexed_raw(), DataConfig(val_size=30, eval_batch_size=8), CPU, seed=0)
    x_eval = torch.cat([x for x, _ in dm.eval_batches("val")])
    x, y = dm.images("val", 10)
    assert torch.equal(x, x_eval[:10]) and y.tolist() == [i % 3 for i in indices(dm, x)]
    calib = dm.calibration_images(20)
    assert calib.shape == (20, 1, 6, 6)
    assert set(indices(dm, calib)) <= set(indices(dm, dm.images("train", 1000)[0]))   # train only
    assert torch.equal(calib, DataModule(indexed_raw(), DataConfig(val_size=30), CPU, seed=9).calibration_images(20))
    assert len(dm.calibration_images(10_000)) == dm.num_train
    with pytest.raises(ValueError, match="unknown split"):
        dm.images("holdout", 1)


# -------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable():
    a, b = build_data(synthetic_cfg(), CPU, seed=0), build_data(synthetic_cfg(), CPU, seed=123)
    assert a.fingerprint == b.fingerprint
    xa, ya = a.images("train", 1000)
    assert torch.equal(xa, b.images("train", 1000)[0]) and torch.equal(ya, b.images("train", 1000)[1])
    assert torch.bincount(ya).min() > 0.8 * len(ya) / 4                     # roughly balanced
    means = torch.stack([xa[ya == c].mean(0) for c in range(4)]).flatten(1)
    assert torch.cdist(means, means).masked_select(~torch.eye(4, dtype=torch.bool)).min() > 3
    # nearest class mean, learned on train, classifies the test split far above chance (0.25)
    xt, yt = a.images("test", 1000)
    predicted = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (predicted == yt).float().mean() > 0.9
    other = build_data(synthetic_cfg(channels=3), CPU, 0)
    assert other.in_channels == 3 and other.fingerprint != a.fingerprint


# ------------------------------------------------------------------------------ imagefolder


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root: Path, shape: tuple[int, ...], n: int = 4, test: bool = True) -> dict[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "test") if test else ("train",):
        for cls in ("cat", "dog"):
            for i in range(n):
                written[root / split / cls / f"{i}.png"] = array = rng.integers(0, 256, shape, dtype=np.uint8)
                write_png(root / split / cls / f"{i}.png", array)
    return written


@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 3)], ids=["grey", "rgb"])
def test_imagefolder_pixels_round_trip(tmp_path, shape):
    pytest.importorskip("PIL")
    written = make_folder(tmp_path, shape)
    raw_cfg = DataConfig(dataset="imagefolder", root=tmp_path, val_size=0)
    dm = build_data(raw_cfg, CPU, 0)
    channels = 1 if len(shape) == 2 else 3
    assert dm.in_channels == channels and dm.image_size == (8, 6) and dm.class_names == ["cat", "dog"]
    assert (dm.num_train, dm.num_val, dm.num_test) == (8, 0, 8)
    x, y = dm.images("test", 8)
    expected = [written[tmp_path / "test" / c / f"{i}.png"] for c in ("cat", "dog") for i in range(4)]
    expected = torch.from_numpy(np.stack(expected).reshape(8, 8, 6, channels)).permute(0, 3, 1, 2)
    assert torch.equal(pixels(dm, x), expected) and y.tolist() == [0] * 4 + [1] * 4


def test_imagefolder_mixed_channels_sizes_and_holdout(tmp_path):
    pytest.importorskip("PIL")
    make_folder(tmp_path, (8, 8, 3), n=5, test=False)
    write_png(tmp_path / "train" / "dog" / "grey.png", np.full((8, 8), 200, np.uint8))
    messages = []
    dm = build_data(DataConfig(dataset="imagefolder", root=tmp_path, val_size=2), CPU, 0, log=messages.append)
    assert dm.in_channels == 3 and messages == ["imagefolder: 1 of 11 images converted to RGB"]
    assert dm.num_test == 1 and dm.num_train + dm.num_val == 10 and "held out as test" in dm.source

    write_png(tmp_path / "train" / "cat" / "big.png", np.zeros((16, 10, 3), np.uint8))
    with pytest.raises(DataError, match=r"big.png: image is 10x16, but .* is 8x8; set data.image_size"):
        build_data(DataConfig(dataset="imagefolder", root=tmp_path, val_size=2), CPU, 0)
    dm = build_data(DataConfig(dataset="imagefolder", root=tmp_path, val_size=2, image_size=5), CPU, 0)
    assert dm.image_size == (5, 5)


def test_imagefolder_errors(tmp_path):
    pytest.importorskip("PIL")
    cfg = DataConfig(dataset="imagefolder", root=tmp_path, val_size=0)
    with pytest.raises(DataError, match="no train/ folder"):
        build_data(cfg, CPU, 0)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="train: no class subfolders"):
        build_data(cfg, CPU, 0)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="one class subfolder"):   # a classifier needs two classes
        build_data(cfg, CPU, 0)
    (tmp_path / "train" / "dog").mkdir()
    write_png(tmp_path / "train" / "dog" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"train/cat: no images \(.png"):
        build_data(cfg, CPU, 0)
    write_png(tmp_path / "train" / "cat" / "ok.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        build_data(cfg, CPU, 0)
    (tmp_path / "train" / "cat" / "broken.png").unlink()
    (tmp_path / "test" / "cow").mkdir(parents=True)
    write_png(tmp_path / "test" / "cow" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="test/cow: class not present in train/"):
        build_data(cfg, CPU, 0)
    with pytest.raises(DataError, match="data.root is required"):
        build_data(DataConfig(dataset="imagefolder"), CPU, 0)
