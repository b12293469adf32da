"""How close is our training step to what the hardware allows? `fit` against a minimal loop.

For each model, on the same device, batch size, optimizer settings and Fashion-MNIST images:

* minimal  - the shortest honest PyTorch loop: float images pre-normalized in memory (host
             memory, copied per batch, on CUDA), a random permutation, forward, cross-entropy,
             backward, SGD (momentum, nesterov, weight decay), a one-cycle schedule; no
             augmentation, no checks, no progress output.
* compress - `compress.training.fit` for one epoch with augmentation off: the on-device
             uint8 data path, the device-side NaN guard, progress bookkeeping, the epoch's
             checkpoint snapshot (evaluation is outside its timed span).
* compress + flip - the same with the default pipeline's augmentation (random horizontal flip).
* compress auto - `fit` as a pipeline runs it: the CPU fast path (compress.fastpath) picked by
             `cpu_fast_path: auto` (channels-last and/or bf16 autocast where the chip has native
             bf16). The rows above pin `cpu_fast_path: off` (fp32, the loop as it was). The probe
             runs once per model before the timed runs, against a fresh cache, and is reported
             with its decision and its duration (a pipeline pays it once per machine and model).

Each variant runs `--repeats` times, interleaved, after one untimed warm-up epoch; the
median images/s is reported, and the ratio compress / minimal (target: >= 0.95 on CPU, > 1
on GPU; compress auto on an AMX machine: >= 1.5). With `--report`, the stage wall times of a `compress run` report (e.g. the
committed reference run of pipelines/distill.yaml) are tabulated alongside; given twice (a run with
`cpu_fast_path: off` and one with `auto`, on this machine), side by side with the ratio.

    python benchmarks/train_speed.py                                  # ~10 min on an idle 2-core CPU
    python benchmarks/train_speed.py --models resnet20 --images 10000 --repeats 2
    python benchmarks/train_speed.py --report reports/reference/fashion-distill/report.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import fastpath  # noqa: E402
from compress.config import AugmentConfig, DataConfig, OptimConfig  # noqa: E402
from compress.data import LOADERS, DataModule  # noqa: E402
from compress.io import atomic_write_json, atomic_write_text  # noqa: E402
from compress.pipeline import resolve_device  # noqa: E402
from compress.registry import create_model  # noqa: E402
from compress.reporting import training_facts  # noqa: E402
from compress.runtime import machine_info  # noqa: E402
from compress.training import fit  # noqa: E402


def load_data(images: int, batch: int, device: torch.device, flip: bool, dataset: str = "fashion-mnist") -> DataModule:
    """Fashion-MNIST with `images` training images (the rest of the 60k held out as a small val split);
    `synthetic`: as many 1x28x28 images, for a machine without the dataset (the GPU check's)."""
    extra = ({"synthetic": {"num_train": images + 1000, "num_test": 100, "num_classes": 10, "image_size": 28,
                            "channels": 1}} if dataset == "synthetic" else {})
    cfg = DataConfig(dataset=dataset, batch_size=batch, val_size=1000,
                     augment=AugmentConfig(crop_padding=0, hflip=flip), **extra)
    raw = LOADERS[cfg.dataset](cfg, lambda m: None)
    keep = images + cfg.val_size
    raw.train_x, raw.train_y = raw.train_x[:keep], raw.train_y[:keep]
    return DataModule(raw, cfg, device, seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minimal_epoch(model_name: str, data: DataModule, opts: OptimConfig, device: torch.device) -> float:
    """Images/s of one epoch of the minimal loop (after the same untimed warm-up steps as `fit` gets)."""
    x_all, y_all = data.images("train", data.num_train)          # normalized float, like a TensorDataset
    x_all, y_all = x_all.cpu(), y_all.cpu()
    if device.type == "cuda":
        x_all, y_all = x_all.pin_memory(), y_all.pin_memory()
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=data.num_classes, in_channels=data.in_channels).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum, nesterov=True,
                                weight_decay=opts.weight_decay)
    steps = math.ceil(data.num_train / data.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opts.lr, total_steps=2 * steps)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and opts.amp
                else torch.autocast("cpu", enabled=False))
    timed = 0.0
    for epoch in range(2):  # epoch 0 warms up (allocator, kernels, caches), epoch 1 is timed
        order = torch.randperm(data.num_train)
        sync(device)
        t0 = time.perf_counter()
        for idx in order.tensor_split(steps):
            x = x_all[idx].to(device, non_blocking=True)
            y = y_all[idx].to(device, non_blocking=True)
            with autocast:
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        sync(device)
        timed = time.perf_counter() - t0
    return data.num_train / timed


def compress_epoch(model_name: str, data: DataModule, opts: OptimConfig, device: torch.device,
                   fast_path: str = "off") -> float:
    """Images/s of the second of two `fit` epochs (its own timer: the training steps, not the evaluation)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=data.num_classes, in_channels=data.in_channels)
    metrics = fit(model, data, opts.model_copy(update={"cpu_fast_path": fast_path}), 2, device=device,
                  progress=False, log=lambda m: None)
    return metrics["history"][1]["images_per_s"]


def probe_fast_path(model_name: str, data: DataModule, opts: OptimConfig, device: torch.device) -> dict:
    """What `cpu_fast_path: auto` decides for this model here, the probe's timings and its duration."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=data.num_classes, in_channels=data.in_channels)
    t0 = time.perf_counter()
    path = fastpath.choose("auto", model, (data.in_channels, *data.image_size), opts.batch_size or data.batch_size,
                           device=device, amp=opts.amp, log=lambda m: None)
    return {**path.record(), "probe_seconds": round(time.perf_counter() - t0, 1)}


def stage_times(report_path: Path) -> dict:
    report = json.loads(report_path.read_text())
    stages = {name: {"type": s.get("type"), "model": s.get("model"),
                     # a stage reused from the cache: what building it took (the run that did)
                     "wall_seconds": s.get("built_seconds") if s.get("reused") else report["wall_seconds"].get(name),
                     "train_images_per_s": training_facts(s.get("metrics") or {}).get("train_images_per_s"),
                     "fast_path": (training_facts(s.get("metrics") or {}).get("fast_path") or {}).get("mode")}
              for name, s in report["stages"].items()}
    return {"report": str(report_path.relative_to(ROOT) if report_path.is_relative_to(ROOT) else report_path),
            "pipeline": report.get("pipeline", {}).get("name") if isinstance(report.get("pipeline"), dict) else None,
            "created": report.get("created"), "machine": report.get("machine"), "stages": stages,
            "benchmark_seconds": report["wall_seconds"].get("benchmark"),
            "total_seconds": report["wall_seconds"].get("total")}


def markdown(result: dict) -> str:
    m = result["machine"]
    on_gpu = result["device"].startswith("cuda")
    device = m.get("gpu") if on_gpu and m.get("gpu") else f"{m['cpu']}, {m['torch_threads']} torch threads"
    data = ("synthetic 28-px images (same size as Fashion-MNIST)" if result.get("dataset") == "synthetic"
            else "Fashion-MNIST")
    isa = ", ".join(m.get("isa") or []) or "not recorded"
    bf16 = ("bf16 support not recorded" if "native_bf16" not in m      # results from before the fast path
            else "native bf16" if m["native_bf16"] else "no native bf16 (bf16 would be emulated)")
    lines = [
        "# Training step speed: compress `fit` against a minimal PyTorch loop",
        "",
        f"CPU: {m['cpu']}; instruction sets: {isa}; {bf16}.",
        "",
        f"Device: {result['device']} ({device}); {data}, {result['images']:,} training images per epoch, "
        f"batch {result['batch_size']}, SGD momentum 0.9 nesterov, one-cycle. Median of {result['repeats']} "
        "interleaved runs of one timed epoch each, after a warm-up epoch.",
        "",
        ("| model | minimal loop (img/s) | compress fit, fp32 (img/s) | ratio | compress fit + flip (img/s) | ratio "
         "| compress fit, auto fast path (img/s) | ratio | auto picked |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        auto = (f"{r['compress_auto']:,.0f} | {r['ratio_auto']:.3f} | {r['fast_path']['mode']}"
                if "compress_auto" in r else "- | - | -")  # results from before the fast path
        lines.append(f"| {r['model']} | {r['minimal']:,.0f} | {r['compress']:,.0f} | {r['ratio']:.3f} | "
                     f"{r['compress_flip']:,.0f} | {r['ratio_flip']:.3f} | {auto} |")
    lines += ["", "Per-run images/s: " + "; ".join(
        f"{r['model']}: minimal {r['runs']['minimal']}, compress {r['runs']['compress']}, "
        f"+flip {r['runs']['compress_flip']}" + (f", auto {r['runs']['compress_auto']}" if "compress_auto" in r else "")
        for r in result["rows"]), ""]
    probed = [r for r in result["rows"] if r.get("fast_path")]
    if probed:
        lines += ["Fast-path probe (`cpu_fast_path: auto`, one training step per mode, before the timed runs):", ""]
        for r in probed:
            f = r["fast_path"]
            rates = ", ".join(f"{k} {v:,.0f}" for k, v in (f.get("images_per_s") or {}).items())
            lines.append(f"* {r['model']}: {f['mode']} ({f['reason']}); probe {rates or '-'} img/s, "
                         f"{f['probe_seconds']} s")
        lines.append("")
    reports = result.get("pipeline_reports") or ([result["pipeline_report"]] if result.get("pipeline_report") else [])
    for p in reports:
        lines += [f"## Wall time of `{p['pipeline'] or 'the pipeline'}`, stage by stage", "",
                  f"From `{p['report']}` (created {p['created']}, on {p['machine']['cpu']} with "
                  f"{p['machine']['cores_usable']} usable cores, GPU: {p['machine'].get('gpu') or 'none'}).", "",
                  "| stage | type | model | trained with | wall (s) | training img/s |", "|---|---|---|---|---:|---:|"]
        for name, s in p["stages"].items():
            rate = f"{s['train_images_per_s']:,.0f}" if s["train_images_per_s"] else ""
            lines.append(f"| {name} | {s['type']} | {s['model']} | {s.get('fast_path') or '-'} | "
                         f"{s['wall_seconds']:.1f} | {rate} |")
        lines += [f"| engines + benchmark + report | | | | {p['benchmark_seconds']:.1f} | |",
                  f"| **total** | | | | **{p['total_seconds']:.1f}** | |", ""]
    if len(reports) == 2:  # before / after: the same pipeline, e.g. cpu_fast_path off, then auto
        a, b = reports
        lines += ["## Side by side", "", f"| stage | wall (s), `{a['report']}` | wall (s), `{b['report']}` | ratio |",
                  "|---|---:|---:|---:|"]
        for name in a["stages"]:
            wa, wb = a["stages"][name]["wall_seconds"], (b["stages"].get(name) or {}).get("wall_seconds")
            ratio = f"{wa / wb:.2f}x" if wa and wb else "-"
            lines.append(f"| {name} | {wa:.1f} | {wb if wb is None else f'{wb:.1f}'} | {ratio} |")
        lines += [f"| **total** | {a['total_seconds']:.1f} | {b['total_seconds']:.1f} | "
                  f"{a['total_seconds'] / b['total_seconds']:.2f}x |", ""]
    lines += [f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, GPU: {m.get('gpu') or 'none'}; "
              f"torch {m['versions']['torch']}.", "", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2_x0_35")
    ap.add_argument("--images", type=int, default=20000, help="training images per epoch")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "synthetic"],
                    help="synthetic: same-size random images, where Fashion-MNIST is not on the machine")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--report", type=Path, action="append", default=[],
                    help="a report.json whose stage wall times to include (twice: side by side)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="output file stem (default: train_speed[-cuda])")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    opts = OptimConfig(lr=0.05, schedule="onecycle")  # fit's defaults otherwise: SGD 0.9 nesterov, wd 5e-4, amp
    plain = load_data(args.images, args.batch, device, flip=False, dataset=args.dataset)
    flipped = load_data(args.images, args.batch, device, flip=True, dataset=args.dataset)
    variants = {"minimal": lambda m: minimal_epoch(m, plain, opts, device),
                "compress": lambda m: compress_epoch(m, plain, opts, device),
                "compress_flip": lambda m: compress_epoch(m, flipped, opts, device),
                "compress_auto": lambda m: compress_epoch(m, plain, opts, device, "auto")}
    rows = []
    # A fresh probe cache: the decision is made on this machine now, not read from an earlier run.
    os.environ["COMPRESS_FAST_PATH_CACHE"] = str(Path(tempfile.mkdtemp(prefix="train_speed-")) / "fastpath.json")
    for model in args.models.split(","):
        decision = probe_fast_path(model, plain, opts, device)
        print(f"{model}: auto fast path {decision['mode']} ({decision['reason']}; {decision['probe_seconds']} s)",
              flush=True)
        runs = {k: [] for k in variants}
        for r in range(args.repeats):
            for name, run in variants.items():
                runs[name].append(round(run(model), 1))
                print(f"{model} run {r + 1}/{args.repeats} {name:14s} {runs[name][-1]:10,.1f} img/s", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        rows.append({"model": model, **med, "ratio": med["compress"] / med["minimal"],
                     "ratio_flip": med["compress_flip"] / med["minimal"],
                     "ratio_auto": med["compress_auto"] / med["minimal"], "fast_path": decision, "runs": runs})
        print(f"{model}: compress/minimal = {rows[-1]['ratio']:.3f} (with flip {rows[-1]['ratio_flip']:.3f}, "
              f"auto fast path {rows[-1]['ratio_auto']:.3f})")
    result = {"schema": "compress.benchmark.train_speed/1",
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
              "device": str(device), "dataset": args.dataset, "images": plain.num_train, "batch_size": args.batch,
              "repeats": args.repeats,
              "machine": {**machine_info(), "isa": fastpath.isa(), "native_bf16": fastpath.native_bf16()},
              "rows": rows,
              "pipeline_report": stage_times(args.report[0].resolve()) if args.report else None,
              "pipeline_reports": [stage_times(r.resolve()) for r in args.report]}
    stem = args.name or ("train_speed-cuda" if device.type == "cuda" else "train_speed")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{stem}.json", result)
    atomic_write_text(args.out / f"{stem}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
