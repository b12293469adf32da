"""A decoded image folder on disk: decode the JPEGs once, then read any batch straight from the file.

Decoding is the slow part of reading an image folder, and tens of thousands to millions of
images do not fit in memory as uint8 (ImageNet at 224 px is about 190 GB). So `imagefolder` data
is decoded once, by worker processes, into .npy files at the configured size, with the labels
and a manifest; later runs open it in milliseconds and read only the rows each batch needs
(compress.data.rows.DiskRows), or load it whole when `placement` says it fits.

    <cache_dir>/imagefolder-<key>/manifest.json     classes, shape, counts, pixel histogram, fingerprint
                                  train.npy         uint8 (N, C, H, W), train/ in listing order
                                  train_labels.npy  int64 (N,)
                                  test.npy, test_labels.npy (when there is a test/ folder)

The key is a hash of the file list (relative paths, labels, sizes, mtimes) and of the decode
settings (every data key that can change a decoded pixel), as DVC keys a stage: the same inputs
find the same cache; a changed image, a new one or another image_size builds a new one. The
build writes into a hidden temporary folder beside it and renames it into place when complete, so
a killed build leaves no half cache (the next build removes the leftover). A cache that fails its
checks (unreadable manifest, truncated array) is rebuilt, not fatal. Images that change while the
build runs are detected (each image is stat-ed again after decoding, the folder listed again at
the end) and nothing is kept. Concurrent builders (several processes or nodes on shared storage)
queue on a lock file; without working locks, the rename still lets only one cache win.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from compress import distributed
from compress.config import DataConfig
from compress.data import imagefolder
from compress.data.module import DataError, RawData
from compress.data.rows import DiskRows, pixel_histogram, write_header, write_rows

FORMAT = 1          # bump when the layout or the decoding changes meaning
CHUNK = 64          # images per decode task
# Data keys that cannot change a decoded pixel; every other key (image_size, and any decode option
# added later) is part of the cache key, so a new option errs on the side of a rebuild.
NOT_DECODING = {"root", "download", "batch_size", "eval_batch_size", "val_size", "augment", "synthetic",
                "placement", "workers", "cache", "cache_dir", "mean", "std", "normalize"}
MANIFEST = "manifest.json"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def decode_settings(cfg: DataConfig) -> dict:
    return cfg.model_dump(mode="json", exclude=NOT_DECODING & set(type(cfg).model_fields))


def _stats(items: list[tuple[Path, int]]) -> list[tuple[int, int]]:
    out = []
    for path, _ in items:
        try:
            st = path.stat()
        except OSError as exc:
            raise DataError(f"{path}: {exc.strerror} (did the folder change while it was listed?)") from None
        out.append((st.st_size, st.st_mtime_ns))
    return out


def cache_key(cfg: DataConfig, root: Path, train: list, test: list | None) -> tuple[str, list]:
    """(sha256 of the file list and decode settings, the (size, mtime_ns) of every file in listing order)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "settings": decode_settings(cfg)}, sort_keys=True).encode())
    stats = []
    for split, items in (("train", train), ("test", test or [])):
        split_stats = _stats(items)
        for (path, label), (size, mtime) in zip(items, split_stats):
            h.update(f"{split}\0{path.relative_to(root).as_posix()}\0{label}\0{size}\0{mtime}\n".encode())
        stats += split_stats
        h.update(b"--\n")
    return h.hexdigest(), stats


def load(cfg: DataConfig, cache_root: Path, log: Callable[[str], None], *, progress: bool | None = None,
         processes: int | None = None) -> RawData:
    """The image folder `cfg` names, from its cache under `cache_root` (built first when missing or stale)."""
    root, classes, train, test = imagefolder.listing(cfg)
    key, stats = cache_key(cfg, root, train, test)
    target = Path(cache_root).expanduser() / f"imagefolder-{key[:24]}"
    raw, why = _open(target, key, root)
    if raw is None:
        _build_locked(cfg, (root, train, test), target, key, stats, why, log, progress, processes)
        raw, why = _open(target, key, root)
        if raw is None:
            raise DataError(f"{target}: the image cache just built does not open ({why})")
    return raw


def _open(target: Path, key: str, root: Path) -> tuple[RawData | None, str]:
    """The cached data set, or (None, why not)."""
    if not target.exists():
        return None, "no cache yet"
    try:
        m = json.loads((target / MANIFEST).read_text())
        if m.get("format") != FORMAT or m.get("key") != key:
            return None, "its manifest is for other images"
        hist = np.asarray(m["histogram"], dtype=np.int64)
        splits = {}
        for split in ("train", "test"):
            if m["counts"][split] is None:
                continue
            x = DiskRows(target / f"{split}.npy", base_histogram=hist if split == "train" else None)
            y = np.load(target / f"{split}_labels.npy", allow_pickle=False)
            if x.shape != (m["counts"][split], *m["shape"]) or y.shape != (len(x),) or y.dtype != np.int64:
                return None, f"{split}.npy does not match its manifest"
            splits[split] = x, y
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    (train_x, train_y), note = splits["train"], ""
    if "test" in splits:
        test_x, test_y = splits["test"]
    else:  # the same hold-out as an in-memory load, as views of the one file
        keep, held, note = imagefolder.test_holdout(len(train_x))
        train_x, train_y, test_x, test_y = train_x[keep], train_y[keep], train_x[held], train_y[held]
    return RawData("imagefolder", m["classes"], train_x, train_y, test_x, test_y,
                   source=f"{root}{note}, cached in {target}", fingerprint=m["fingerprint"]), ""


@contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` (created); without lock support, no lock (the rename still decides)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _build_locked(cfg: DataConfig, listed: tuple, target: Path, key: str, stats: list, why: str, log, progress,
                  processes) -> None:
    parent = target.parent
    made = [d for d in (parent, *parent.parents) if not d.exists()]   # ours to remove if the build fails
    try:
        _build_in(cfg, listed, target, key, stats, why, log, progress, processes)
    except BaseException:
        # A failed build leaves nothing behind: not its temp folder (below), nor the lock file, nor the
        # folders it made (a waiting process holds the unlinked lock; the rename still decides).
        try:
            (parent / f".{target.name}.lock").unlink(missing_ok=True)
        except OSError:   # e.g. the folder could not be made at all
            pass
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _build_in(cfg: DataConfig, listed: tuple, target: Path, key: str, stats: list, why: str, log, progress,
              processes) -> None:
    parent = target.parent
    with ExitStack() as stack:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_lock(parent / f".{target.name}.lock"))
        except OSError as exc:
            raise DataError(f"data.cache_dir {parent}: not writable ({exc.strerror or exc}); set data.cache_dir "
                            f"to a writable folder, or data.cache: false to decode into memory") from None
        if _open(target, key, listed[0])[0] is not None:  # another process built it while we waited
            return
        for leftover in parent.glob(f".{target.name}.*.tmp"):  # a killed build's (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        if target.exists():
            log(f"cache: {target} {why}; rebuilding it")
            shutil.rmtree(target, ignore_errors=True)
        tmp = parent / f".{target.name}.{os.getpid()}.tmp"
        try:
            _build(cfg, listed, tmp, key, stats, log, progress, processes)
            try:
                os.rename(tmp, target)
            except OSError as exc:  # ENOTEMPTY/EEXIST: a builder without our lock got there first
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise DataError(f"{parent}: no space left for the image cache ({exc.strerror}); nothing was "
                                f"kept; free space or set data.cache_dir elsewhere") from None
            raise DataError(f"{parent}: the image cache could not be written ({exc.strerror or exc}); "
                            f"nothing was kept") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _decode_chunk(plan: imagefolder.Plan, items: list, stats: list, path: Path, offset: int,
                  start: int) -> tuple[int, np.ndarray]:
    """Worker: decode `items` into rows `start`.. of `path`; (count, their pixel histogram)."""
    x, _ = plan.read(items)
    for (p, _), (size, mtime) in zip(items, stats):  # changed after it was listed, or while decoded
        try:
            st = os.stat(p)
            same = (st.st_size, st.st_mtime_ns) == (size, mtime)
        except OSError:
            same = False
        if not same:
            raise DataError(f"{p}: changed while the image cache was being built; nothing was kept "
                            f"(run again when the folder is complete to build it)")
    write_rows(path, offset, start, x)
    return len(items), pixel_histogram(x)


def _pool(processes: int):
    methods = multiprocessing.get_all_start_methods()
    # fork: the workers inherit the imports (spawn would re-import torch in each, seconds apiece)
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(max_workers=processes, mp_context=ctx)


def _build(cfg: DataConfig, listed: tuple, tmp: Path, key: str, stats: list, log, progress, processes) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    t0 = time.perf_counter()
    plan = imagefolder.plan(cfg, log)
    if (plan.train, plan.test) != listed[1:]:
        raise DataError(f"{plan.root}: images were added or removed while it was read; nothing was kept; run again")
    w, h = plan.size
    shape = (plan.channels, h, w)
    splits = {"train": plan.train, "test": plan.test}
    need = sum(len(items) for items in splits.values() if items) * int(np.prod(shape))
    tmp.mkdir(parents=True)
    free = shutil.disk_usage(tmp).free
    if free < need * 1.02 + (1 << 20):
        raise OSError(errno.ENOSPC, f"needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
    processes = processes or max(1, min(os.cpu_count() or 1, 32))
    light = replace(plan, train=[], test=None)   # what a worker needs to decode: not the whole listing
    log(f"cache: decoding {len(stats)} images of {plan.root} at {plan.channels}x{h}x{w} "
        f"({need / 1e9:.2f} GB) into {tmp.parent} with {processes} processes")
    hist = np.zeros((plan.channels, 256), dtype=np.int64)
    columns = [TextColumn("[bold]cache"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    show = (sys.stderr.isatty() and distributed.is_main_process()) if progress is None else progress
    offsets, first = {}, 0
    with _pool(processes) as pool, Progress(*columns, disable=not show, transient=True) as bar:
        task = bar.add_task("decode", total=len(stats))
        futures = []
        for split, items in splits.items():
            if items is None:
                continue
            offsets[split] = write_header(tmp / f"{split}.npy", (len(items), *shape))
            np.save(tmp / f"{split}_labels.npy", np.array([label for _, label in items], dtype=np.int64))
            split_stats = stats[first:first + len(items)]
            first += len(items)
            for s in range(0, len(items), CHUNK):
                futures.append(pool.submit(_decode_chunk, light, items[s:s + CHUNK], split_stats[s:s + CHUNK],
                                           tmp / f"{split}.npy", offsets[split], s))
                futures[-1].split = split
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise f.exception()
                count, chunk_hist = f.result()
                if f.split == "train":
                    hist += chunk_hist
                bar.advance(task, count)
    # Listed again: an image added or removed during the build is a change too.
    if cache_key(cfg, plan.root, *imagefolder.listing(cfg)[2:])[0] != key:
        raise DataError(f"{plan.root}: images changed while the image cache was being built; nothing was kept "
                        f"(run again when the folder is complete to build it)")
    train = DiskRows(tmp / "train.npy", base_histogram=hist)
    train_y = np.load(tmp / "train_labels.npy")
    if plan.test is not None:
        test, test_y = DiskRows(tmp / "test.npy"), np.load(tmp / "test_labels.npy")
    else:
        keep, held, _ = imagefolder.test_holdout(len(train))
        train, train_y, test, test_y = train[keep], train_y[keep], train[held], train_y[held]
    manifest = {
        "format": FORMAT,
        "key": key,
        "settings": decode_settings(cfg),
        "root": str(plan.root),
        "classes": plan.classes,
        "shape": list(shape),
        "counts": {split: (len(items) if items is not None else None) for split, items in splits.items()},
        "histogram": hist.tolist(),
        "fingerprint": fingerprint("imagefolder", plan.classes, (train, train_y, test, test_y)),
        "seconds": round(time.perf_counter() - t0, 2),
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    data = json.dumps(manifest, indent=1).encode()
    with open(tmp / MANIFEST, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    log(f"cache: {len(stats)} images decoded in {time.perf_counter() - t0:.1f} s")


def fingerprint(name: str, classes: list[str], arrays) -> str:
    """compress.data.module's dataset fingerprint, streamed: the same digest without the images in memory."""
    h = hashlib.sha256()
    h.update(repr((name, classes)).encode())
    for arr in arrays:
        if isinstance(arr, DiskRows):
            h.update(repr((arr.dtype.str, arr.shape)).encode())
            for chunk in arr.chunks():
                h.update(memoryview(chunk).cast("B"))
        else:
            arr = np.ascontiguousarray(arr)
            h.update(repr((arr.dtype.str, arr.shape)).encode())
            h.update(memoryview(arr).cast("B"))
    return h.hexdigest()
