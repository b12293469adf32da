"""Data larger than memory: training from the decoded on-disk image cache against data held in memory.

Generates a folder of JPEGs (default 20,000 at 160 px, 10 classes, smooth class-tinted patterns
with noise) under --dir, outside the repository, and hard-linked subsets of it (5k, 10k). Then,
for each size:

* build  - `compress.data.cache` decodes the folder (worker processes) into a fresh cache:
           wall time and peak memory.
* memory - `placement: device`: the uint8 images loaded whole into memory (from that cache),
           batches gathered there; the classic path.
* cache  - `placement: host`: batches read from the cache file by DataLoader workers
           (`--workers`), memory bounded by the batches in flight.

Training is `--steps` SGD steps of `--model` on `DataModule.train_batches` (crop + flip on the
device, as a pipeline trains), timed after `--warmup` steps; img/s is over the timed steps.
Peak memory is the highest sum of PSS (proportional set size: shared pages split between the
processes sharing them, so forked DataLoader workers are not counted twice) over the process and
its children, sampled every 20 ms; max RSS of the main process is reported too. Every
measurement runs in a fresh process. Targets (issue 12): the cache path's peak grows < 10% from
5k to 20k images; its img/s is within 10% of the memory path's.

    python benchmarks/data_scale.py                 # the real run: ~8 min on an idle 2-core CPU
    python benchmarks/data_scale.py --tiny          # smoke test: 120/240/480 images at 32 px, 3 steps, 1 thread
Results: benchmarks/results/data_scale.json and .md (--out to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = 10


# ----------------------------------------------------------------------------- memory sampling

def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and its descendants (the kernel's per-thread children lists: no scan of /proc)."""
    out, frontier = [pid], [pid]
    while frontier:
        found = []
        for p in frontier:
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        found += [int(c) for c in f.read().split()]
            except OSError:
                pass
        out += found
        frontier = found
    return out


class PeakMemory:
    """Highest PSS summed over this process and its children, sampled every `interval` s in a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in _tree(me)))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- the folder

def _write_class_images(args) -> int:
    import numpy as np
    from PIL import Image

    folder, label, start, count, size, seed = args
    rng = np.random.default_rng([seed, label, start])
    tint = np.random.default_rng([seed, label]).uniform(40, 215, 3)
    for i in range(start, start + count):
        low = rng.uniform(-60, 60, (size // 16, size // 16, 3)) + tint
        img = Image.fromarray(low.clip(0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        a = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(folder / f"c{label}" / f"{i:06d}.jpg", quality=90)
    return count


def make_folder(path: Path, n: int, size: int, processes: int) -> Path:
    """n JPEGs in path/train/c<k>/ (n / CLASSES per class); reused when complete."""
    done = path / ".complete"
    if done.exists() and done.read_text() == f"{n} {size}":
        return path
    shutil.rmtree(path, ignore_errors=True)
    per = n // CLASSES
    for k in range(CLASSES):
        (path / "train" / f"c{k}").mkdir(parents=True)
    chunk = 250
    jobs = [(path / "train", k, s, min(chunk, per - s), size, 0) for k in range(CLASSES) for s in range(0, per, chunk)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write_class_images, jobs))
    done.write_text(f"{n} {size}")
    return path


def subset(full: Path, path: Path, n: int) -> Path:
    """The first n / CLASSES images of each class of `full`, hard-linked (no copy) into `path`."""
    done = path / ".complete"
    if done.exists() and done.read_text() == f"{n} of {full}":
        return path
    shutil.rmtree(path, ignore_errors=True)
    per = n // CLASSES
    for k in range(CLASSES):
        d = path / "train" / f"c{k}"
        d.mkdir(parents=True)
        for src in sorted((full / "train" / f"c{k}").iterdir())[:per]:
            os.link(src, d / src.name)
    done.write_text(f"{n} of {full}")
    return path


# ----------------------------------------------------------------------------- one measurement (child process)

def measure(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from compress.config import DataConfig
    from compress.data import build_data
    from compress.registry import create_model

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = DataConfig(dataset="imagefolder", root=spec["folder"], image_size=spec["size"], batch_size=spec["batch"],
                     val_size=spec["val"], placement=spec["placement"], workers=spec["workers"],
                     cache_dir=spec["cache"], augment={"crop_padding": spec["size"] // 8, "hflip": True})
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        data = build_data(cfg, "cpu", seed=0)
        load_s = time.perf_counter() - t0
        if spec["mode"] == "build":
            return {"seconds": round(load_s, 2), "peak_mb": round(peak.peak_kb / 1024, 1),
                    "max_rss_mb": round(max_rss_mb(), 1), "images": data.num_train + data.num_val + data.num_test}
        model = create_model(spec["model"], num_classes=data.num_classes, in_channels=data.in_channels)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        model.train()
        seen, t_start, step = 0, None, 0
        for epoch in range(1000):
            for x, y in data.train_batches(epoch):
                if step == spec["warmup"]:
                    t_start, seen = time.perf_counter(), 0
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(y)
                step += 1
                if step == spec["warmup"] + spec["steps"]:
                    break
            if step == spec["warmup"] + spec["steps"]:
                break
        seconds = time.perf_counter() - t_start
    return {"placement": data.placement, "streamed": data.streamed, "load_seconds": round(load_s, 2),
            "img_per_s": round(seen / seconds, 1), "steps": spec["steps"], "peak_mb": round(peak.peak_kb / 1024, 1),
            "max_rss_mb": round(max_rss_mb(), 1), "dataset_mb": round(sum(
                x.nbytes for x in data._x.values()) / 2**20, 1)}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise SystemExit(f"measurement {spec['mode']} {spec.get('placement')} at {spec['folder']} failed:\n"
                         f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

def write_results(results: dict, out: Path) -> None:
    from compress.io import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "data_scale.json", results)
    m, s = results["machine"], results["settings"]
    lines = [
        "# Data larger than memory: in-memory vs the on-disk image cache",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; torch {m['torch']}; "
        f"measured {results['finished']} (load average at the start {results['load_average_at_start']}, "
        f"at the end {m['load_average_1min']}).",
        f"Images: generated {s['image_size']} px JPEGs, {CLASSES} classes; training: {s['steps']} SGD steps of "
        f"{s['model']} (batch {s['batch']}, crop + flip on the device) after {s['warmup']} warm-up steps, each in "
        f"a fresh process; {s.get('repeats', 1)} interleaved runs per path and size (median img/s, highest peak); "
        f"cache path with {s['workers']} DataLoader workers. Peak memory: PSS summed over the process and its "
        f"children (sampled every 20 ms).",
        "",
        "| images | uint8 data | cache build | build peak | memory: img/s | memory: peak | cache: img/s | cache: peak "
        "| cache / memory img/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["sizes"]:
        lines.append(f"| {r['images']:,} | {r['memory']['dataset_mb']:,.0f} MB | {r['build']['seconds']:.1f} s "
                     f"({r['images'] / r['build']['seconds']:,.0f} img/s) | {r['build']['peak_mb']:,.0f} MB | "
                     f"{r['memory']['img_per_s']:,.1f} | {r['memory']['peak_mb']:,.0f} MB | "
                     f"{r['cache']['img_per_s']:,.1f} | {r['cache']['peak_mb']:,.0f} MB | "
                     f"{r['cache']['img_per_s'] / r['memory']['img_per_s']:.2f}x |")
    t = results["targets"]
    lines += [
        "",
        f"* Cache path peak memory from {t['from_images']:,} to {t['to_images']:,} images: "
        f"{t['cache_peak_growth_pct']:+.1f}% (target < 10%: {'met' if t['peak_target_met'] else 'missed'}); "
        f"memory path: {t['memory_peak_growth_pct']:+.1f}%.",
        f"* Training img/s of the cache path, lowest over the sizes: {t['speed_ratio']:.2f}x the memory "
        f"path's (target within 10% at every size: {'met' if t['speed_target_met'] else 'missed'}).",
        "* Per-run img/s (memory / cache): " + "; ".join(
            f"{r['images']:,}: {r['memory'].get('runs_img_per_s', [r['memory']['img_per_s']])} / "
            f"{r['cache'].get('runs_img_per_s', [r['cache']['img_per_s']])}" for r in results["sizes"]) + ".",
        "",
        "Command: `" + results["command"] + "`",
        "",
    ]
    atomic_write_text(out / "data_scale.md", "\n".join(lines))


def machine() -> dict:
    import torch

    from compress.data.module import available_memory
    from compress.runtime import machine_info

    info = machine_info()
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return {"cpu": info["cpu"], "cores": info["cores"], "memory_gb": round(total / 2**30, 1),
            "available_gb": round(available_memory() / 2**30, 1), "torch": torch.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2)}   # a busy machine makes every number here noisy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "compress-data-scale",
                   help="where the generated images and the caches go (not the repository)")
    p.add_argument("--sizes", default="5000,10000,20000", help="image counts, comma-separated (the last is generated)")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--model", default=None, help="registry name (default: shufflenet_v2_x0_5, the 224-px-style "
                                               "stem, else shufflenetv2_x0_5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the training process")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="training measurements per path and size, interleaved "
                                                          "(median img/s, highest peak)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tiny", action="store_true", help="smoke test: 120/240/480 images at 32 px, 3 steps")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.tiny:
        args.sizes, args.image_size, args.steps, args.warmup, args.batch = "120,240,480", 32, 3, 1, 16
        args.threads, args.repeats = 1, 1
    if args.model is None:
        from compress.registry import list_models

        args.model = "shufflenet_v2_x0_5" if "shufflenet_v2_x0_5" in list_models() else "shufflenetv2_x0_5"
    sizes = sorted(int(s) for s in args.sizes.split(","))
    processes = os.cpu_count() or 1
    args.dir.mkdir(parents=True, exist_ok=True)
    t0, load_at_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    full = make_folder(args.dir / f"images-{sizes[-1]}-{args.image_size}px", sizes[-1], args.image_size, processes)
    print(f"folder: {sizes[-1]} JPEGs at {args.image_size} px in {full} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for n in sizes:
        folder = full if n == sizes[-1] else subset(full, args.dir / f"images-{n}-{args.image_size}px", n)
        cache = args.dir / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)  # a fresh build each run
        spec = {"folder": str(folder), "size": args.image_size, "batch": args.batch, "val": max(1, n // 40),
                "workers": args.workers, "cache": str(cache), "model": args.model, "steps": args.steps,
                "warmup": args.warmup, "threads": args.threads}
        row = {"images": n, "build": run_child({**spec, "mode": "build", "placement": "host"})}
        print(f"{n}: cache built in {row['build']['seconds']} s", flush=True)
        runs = {"memory": [], "cache": []}
        for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits both paths alike
            for name, placement in (("memory", "device"), ("cache", "host")):
                runs[name].append(run_child({**spec, "mode": "train", "placement": placement}))
                print(f"{n}: {name}: {runs[name][-1]['img_per_s']} img/s, peak {runs[name][-1]['peak_mb']} MB",
                      flush=True)
        for name, measured in runs.items():
            row[name] = {**measured[0], "img_per_s": statistics.median(r["img_per_s"] for r in measured),
                         "peak_mb": max(r["peak_mb"] for r in measured),
                         "max_rss_mb": max(r["max_rss_mb"] for r in measured),
                         "runs_img_per_s": [r["img_per_s"] for r in measured]}
        row["speed_ratio"] = round(row["cache"]["img_per_s"] / row["memory"]["img_per_s"], 3)
        rows.append(row)
    first, last = rows[0], rows[-1]
    growth = lambda key: 100 * (last[key]["peak_mb"] / first[key]["peak_mb"] - 1)  # noqa: E731
    ratio = min(r["speed_ratio"] for r in rows)  # the target holds at every size, not only the largest
    results = {
        "machine": machine(),
        "settings": {"image_size": args.image_size, "model": args.model, "batch": args.batch, "steps": args.steps,
                     "warmup": args.warmup, "workers": args.workers, "threads": args.threads, "repeats": args.repeats,
                     "tiny": args.tiny},
        "sizes": rows,
        "targets": {"from_images": first["images"], "to_images": last["images"],
                    "cache_peak_growth_pct": round(growth("cache"), 1),
                    "memory_peak_growth_pct": round(growth("memory"), 1),
                    "peak_target_met": growth("cache") < 10, "speed_ratio": round(ratio, 3),
                    "speed_target_met": ratio >= 0.9},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_average_at_start": load_at_start,
        "command": "python benchmarks/data_scale.py " + " ".join(sys.argv[1:]),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_results(results, args.out)
    print(f"wrote {args.out / 'data_scale.md'} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
