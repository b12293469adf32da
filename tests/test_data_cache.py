"""The decoded on-disk image cache (compress.data.cache) and streaming from it (placement: host).

Keying and rebuilds, a killed build, a corrupt cache, the bad inputs (unwritable cache dir,
images changing during the build, a full disk), identical batches from memory and from the file,
and two "nodes" (two `compress run` processes) meeting through the c10d rendezvous on 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from compress.cli import app
from compress.config import DataConfig
from compress.data import DataError, build_data, cache, imagefolder, module
from compress.data.rows import DiskRows

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
AUGMENT = {"crop_padding": 2, "hflip": True, "rotation": 10, "erasing": 0.5, "erasing_value": "random"}


def make_folder(root: Path, per_class: int = 8, classes: int = 3, test: bool = False, size=(14, 12)) -> Path:
    """root/train/c<k>/<i>.jpg (and test/) of seeded noise plus a class-dependent tint."""
    rng = np.random.default_rng(0)
    for split in ("train", "test") if test else ("train",):
        for k in range(classes):
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else 3):
                a = rng.integers(0, 200, (size[1], size[0], 3), dtype=np.uint8)
                a[..., k % 3] += 50
                Image.fromarray(a).save(d / f"{i}.jpg", quality=90)
    return root


def cfg(root: Path, cache_dir: Path | None = None, **kw) -> DataConfig:
    base = dict(dataset="imagefolder", root=root, image_size=10, batch_size=5, val_size=4, augment=AUGMENT,
                cache_dir=cache_dir)
    return DataConfig(**{**base, **kw})


def caches(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob("*") if p.is_dir() and not p.name.startswith(".")) if cache_dir.exists() else []


def test_cache_is_keyed_by_files_and_settings_and_matches_memory(tmp_path):
    root, store = make_folder(tmp_path / "imgs"), tmp_path / "cache"
    logs: list[str] = []
    first = build_data(cfg(root, store), CPU, 0, log=logs.append)
    assert any("decoding 24 images" in m for m in logs)
    [built] = caches(store)
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 24, "test": None} and manifest["shape"] == [3, 10, 10]
    # Same folder, same settings: opened, not decoded again; a data key that decodes nothing shares it.
    logs.clear()
    again = build_data(cfg(root, store, batch_size=7, val_size=2), CPU, 0, log=logs.append)
    assert logs == [] and caches(store) == [built]
    # The cache holds what a decode into memory holds, and the data's fingerprint is the same either way.
    memory = build_data(cfg(root, cache=False), CPU, 0)
    assert first.fingerprint == memory.fingerprint and again.num_train == 24 - 2 - 2
    assert first.source.startswith(f"{root} (no test/: 2 images") and "cached in" in first.source
    # Another image size, or a changed image, is another cache.
    build_data(cfg(root, store, image_size=8), CPU, 0)
    assert len(caches(store)) == 2
    img = root / "train" / "c1" / "2.jpg"
    Image.fromarray(np.zeros((12, 14, 3), np.uint8)).save(img)
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = build_data(cfg(root, store), CPU, 0)
    assert len(caches(store)) == 3 and changed.fingerprint != first.fingerprint
    assert changed.fingerprint == build_data(cfg(root, cache=False), CPU, 0).fingerprint


def test_corrupt_cache_is_rebuilt(tmp_path):
    root, store = make_folder(tmp_path / "imgs"), tmp_path / "cache"
    good = build_data(cfg(root, store), CPU, 0)
    [built] = caches(store)
    for damage in (lambda: (built / "train.npy").write_bytes((built / "train.npy").read_bytes()[:500]),
                   lambda: (built / "manifest.json").write_text("{not json")):
        damage()
        logs: list[str] = []
        again = build_data(cfg(root, store), CPU, 0, log=logs.append)
        assert any("rebuilding" in m for m in logs), logs
        assert again.fingerprint == good.fingerprint and caches(store) == [built]


PRETRAINED = dict(resize=12, image_size=10, augment={"random_resized_crop": True, "hflip": True, "noise": 0.5,
                                                      "brightness": 0.2})


@pytest.mark.parametrize("settings", [{}, PRETRAINED], ids=["crop-rotate-erase", "resize-rrc-jitter"])
def test_streamed_batches_equal_in_memory_batches(tmp_path, settings):
    root, store = make_folder(tmp_path / "imgs", per_class=10, test=True), tmp_path / "cache"
    memory = build_data(cfg(root, cache=False, **settings), CPU, 3)
    loaded = build_data(cfg(root, store, placement="device", **settings), CPU, 3)
    streamed = build_data(cfg(root, store, placement="host", workers=2, **settings), CPU, 3)
    assert streamed.streamed and isinstance(streamed._x["train"], DiskRows) and not loaded.streamed
    assert memory.mean == streamed.mean == loaded.mean and memory.std == streamed.std
    for epoch in (0, 1):
        whole = list(memory.train_batches(epoch))
        for other in (loaded, streamed):
            got = list(other.train_batches(epoch))
            assert len(got) == len(whole) == memory.steps_per_epoch()
            for (xa, ya), (xb, yb) in zip(whole, got):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
        # Under DDP each process reads its own slice of every batch: the same pixels as slicing the batch.
        for rank in (0, 1):
            for (xa, ya), (xb, yb) in zip(whole, streamed.train_batches(epoch, shard=(rank, 2))):
                assert torch.equal(xa.tensor_split(2)[rank], xb) and torch.equal(ya.tensor_split(2)[rank], yb)
    for split in ("val", "test"):
        for (xa, ya), (xb, yb) in zip(memory.eval_batches(split, 4), streamed.eval_batches(split, 4)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(memory.calibration_images(6), streamed.calibration_images(6))
    assert torch.equal(memory.images("test", 5)[0], streamed.images("test", 5)[0])


def test_auto_placement_streams_only_what_does_not_fit(tmp_path, monkeypatch):
    root, store = make_folder(tmp_path / "imgs"), tmp_path / "cache"
    monkeypatch.setattr(module, "available_memory", lambda: 10**12)
    assert build_data(cfg(root, store), CPU, 0).placement == "device"
    monkeypatch.setattr(module, "available_memory", lambda: 4 * 24 * 300 - 1)  # a quarter is under the 7200 bytes
    dm = build_data(cfg(root, store), CPU, 0)
    assert dm.placement == "host" and dm.streamed


def test_disk_rows_views_and_reads(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (9, 2, 3, 4), dtype=np.uint8)
    path = tmp_path / "a.npy"
    np.save(path, x)
    rows = DiskRows(path, base_histogram=None)
    view = rows[np.array([8, 2, 3, 4, 0])]                   # a view: nothing read
    assert isinstance(view, DiskRows) and view.shape == (5, 2, 3, 4)
    assert torch.equal(view[torch.tensor([1, 0, 4])], torch.from_numpy(x[[2, 8, 0]]))
    assert torch.equal(view[1:4], torch.from_numpy(x[[2, 3, 4]]))
    assert np.array_equal(np.asarray(view), x[[8, 2, 3, 4, 0]])
    hist = np.stack([np.bincount(x[:, c].ravel(), minlength=256) for c in range(2)])
    with_base = DiskRows(path, base_histogram=hist)[np.array([0, 1, 2, 3, 5, 6, 7])]   # counts 2 rows, subtracts
    assert np.array_equal(with_base.histogram(), hist - np.stack(
        [np.bincount(x[[4, 8], c].ravel(), minlength=256) for c in range(2)]))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        DiskRows(path)


# ------------------------------------------------------------------------------ bad input


def cli_pipeline(tmp_path: Path, root: Path, cache_dir: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\ndevice: cpu\ndata: {{dataset: imagefolder, root: {root}, image_size: 8, val_size: 4, "
                    f"batch_size: 8, cache_dir: {cache_dir}}}\nstages:\n  t: {{type: train, model: resnet8, epochs: 1}}\n")
    return path


def assert_one_line_exit_2(result, *words):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for w in words:
        assert w in errors[0], errors[0]


def test_unwritable_cache_dir_is_one_line(tmp_path):
    root = make_folder(tmp_path / "imgs")
    blocker = tmp_path / "file"
    blocker.write_text("")  # a folder under a file cannot be made (root ignores permission bits; this it cannot)
    result = CliRunner().invoke(app, ["run", str(cli_pipeline(tmp_path, root, blocker / "cache")),
                                      "--out", str(tmp_path / "runs")])
    assert_one_line_exit_2(result, "not writable", "data.cache_dir")


def test_full_disk_while_writing_leaves_nothing(tmp_path, monkeypatch):
    root, store = make_folder(tmp_path / "imgs"), tmp_path / "cache"

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "write_rows", full)  # the forked decode workers inherit it
    result = CliRunner().invoke(app, ["run", str(cli_pipeline(tmp_path, root, store)), "--out", str(tmp_path / "runs")])
    assert_one_line_exit_2(result, "no space left", "nothing was kept")
    assert caches(store) == [] and not list(store.glob(".*.tmp"))
    monkeypatch.undo()
    assert build_data(cfg(root, store), CPU, 0).num_train == 24 - 2 - 4 and len(caches(store)) == 1


def test_images_changing_during_the_build_are_detected(tmp_path, monkeypatch):
    root, store = make_folder(tmp_path / "imgs"), tmp_path / "cache"
    victim = root / "train" / "c2" / "5.jpg"
    read = imagefolder.Plan.read

    def read_and_touch(self, items):  # another program rewrites an image while the cache is built
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return read(self, items)

    monkeypatch.setattr(imagefolder.Plan, "read", read_and_touch)
    with pytest.raises(DataError, match="changed while the image cache was being built"):
        build_data(cfg(root, store), CPU, 0)
    assert caches(store) == []
    monkeypatch.undo()
    assert build_data(cfg(root, store), CPU, 0).num_train == 18  # the next run builds it


def test_killed_build_leaves_no_half_cache(tmp_path):
    root, store = make_folder(tmp_path / "imgs"), tmp_path / "cache"
    script = (
        "import time, sys\n"
        "from pathlib import Path\n"
        "from compress.data import build_data, imagefolder\n"
        "from compress.config import DataConfig\n"
        "read = imagefolder.Plan.read\n"
        "def slow(self, items):\n"
        "    time.sleep(60)\n"
        "    return read(self, items)\n"
        "imagefolder.Plan.read = slow\n"
        f"build_data(DataConfig(dataset='imagefolder', root={str(root)!r}, image_size=10, val_size=4, "
        f"cache_dir={str(store)!r}), 'cpu', 0)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)
    deadline = time.time() + 60
    while not list(store.glob(".*.tmp/train.npy")) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its decode workers
    proc.wait()
    assert list(store.glob(".*.tmp")) and caches(store) == []   # a temp folder, never a cache
    dm = build_data(cfg(root, store), CPU, 0)
    assert dm.num_train == 18 and not list(store.glob(".*.tmp")) and len(caches(store)) == 1


def test_multi_node_options_are_checked_before_launching(tmp_path):
    path = cli_pipeline(tmp_path, make_folder(tmp_path / "imgs"), tmp_path / "cache")
    for args, words in ((["--nnodes", "2"], ["--rdzv-endpoint"]),
                        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], ["--node-rank 2"]),
                        (["--nnodes", "2", "--rdzv-endpoint", "nohost"], ["HOST:PORT"]),
                        (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-backend", "etcd"], ["static or c10d"])):
        result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "runs"), *args])
        assert_one_line_exit_2(result, *words)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------ two nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_through_the_c10d_rendezvous(tmp_path):
    """Two `compress run --nnodes 2` processes (one per "node") meet at 127.0.0.1 and train one stage together."""
    root, store = make_folder(tmp_path / "imgs", per_class=12), tmp_path / "cache"
    path = tmp_path / "p.yaml"
    path.write_text(f"name: two\ndevice: cpu\ndata: {{dataset: imagefolder, root: {root}, image_size: 8, "
                    f"val_size: 6, batch_size: 8, placement: host, workers: 1, cache_dir: {store}}}\n"
                    "stages:\n  t: {type: train, model: resnet8, epochs: 1}\n"
                    "export: {parity_images: 4}\n"
                    "benchmark: {runtimes: [torch], batch_sizes: [1], warmup: 1, iters: 2}\n")
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "compress", "run", str(path), "--out", str(tmp_path / "runs"),
                               "--reports", str(tmp_path / "reports"), "--no-progress", "--nnodes", "2",
                               "--node-rank", str(r), "--rdzv-endpoint", endpoint, "--rdzv-backend", "c10d",
                               "--rdzv-id", "cache-test"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    manifest = json.loads((tmp_path / "runs" / "two" / "t" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert len(caches(store)) == 1  # built once, by whichever process took the lock first
    log = "".join(o[0] + o[1] for o in outs)
    assert "Traceback" not in log
