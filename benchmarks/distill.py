"""Which distillation method earns its place? Every method against plain cross-entropy, same budget.

A ResNet-20 teacher (trained here, or `--teacher model.pt`) and a student trained from scratch
once per method on Fashion-MNIST with an equal epoch budget, through the pipeline's own code
(compress.training.fit / evaluate, compress.losses.build_loss, the schema's per-method defaults).
Writes benchmarks/results/distill.json and distill.md.

    python benchmarks/distill.py                              # ~25 min on an idle 2-core CPU
    python benchmarks/distill.py --epochs 1 --train-subset 5000 --methods ce,kd,dkd+at
    python benchmarks/distill.py --teacher runs/fashion-distill/teacher/model.pt

A method is a logit method (kd, dkd, dist, logit_std), a feature method (fitnet, at: with
cross-entropy only), `ce` (no teacher), or a combination such as `dkd+at`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.config import AugmentConfig, DataConfig, DistillStage, OptimConfig  # noqa: E402
from compress.context import seed_everything  # noqa: E402
from compress.data import LOADERS, DataModule  # noqa: E402
from compress.io import atomic_write_json, atomic_write_text, load_model, save_model  # noqa: E402
from compress.losses import build_loss  # noqa: E402
from compress.registry import count_macs, count_params, create_model  # noqa: E402
from compress.runtime import machine_info  # noqa: E402
from compress.training import evaluate, fit  # noqa: E402

METHODS = ["ce", "kd", "dkd", "dist", "logit_std", "fitnet", "at"]
LOGIT, FEATURE = {"kd", "dkd", "dist", "logit_std"}, {"fitnet", "at"}


def stage_config(method: str, student: str, epochs: int) -> DistillStage:
    """The distill stage a pipeline YAML would declare for `method` (all else at its defaults)."""
    parts = method.split("+")
    logit = [p for p in parts if p in LOGIT]
    feature = [p for p in parts if p in FEATURE]
    if len(logit) > 1 or len(feature) > 1 or len(logit) + len(feature) != len(parts):
        raise SystemExit(f"unknown method {method!r}: use ce, one of {sorted(LOGIT)}, one of {sorted(FEATURE)}, "
                         f"or logit+feature (e.g. dkd+at)")
    spec = {"type": "distill", "from": "teacher", "model": student, "epochs": epochs,
            "method": logit[0] if logit else "none"}
    if feature:
        spec["features"] = {"method": feature[0]}
    return DistillStage.model_validate(spec)


def load_data(seed: int, train_subset: int | None, log) -> DataModule:
    cfg = DataConfig(dataset="fashion-mnist", batch_size=128, augment=AugmentConfig(crop_padding=0, hflip=True))
    raw = LOADERS[cfg.dataset](cfg, log)
    if train_subset:  # the val hold-out comes out of these too; Fashion-MNIST's train files are already shuffled
        keep = train_subset + cfg.val_size
        raw.train_x, raw.train_y = raw.train_x[:keep], raw.train_y[:keep]
    return DataModule(raw, cfg, torch.device("cpu"), seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, help="a trained teacher (compress model file); default: train resnet20")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--student", default="mobilenetv2_x0_35")
    p.add_argument("--epochs", type=int, default=2, help="epochs per student (the same for every method)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; e.g. ce,kd,dkd+at")
    p.add_argument("--train-subset", type=int, help="train on this many images (default: all 55,000)")
    p.add_argument("--seeds", default="0", help="comma-separated; each method runs once per seed (student "
                                                "initialization and batch order), the table shows mean and spread")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in distill.json (same teacher, student, data and epochs), "
                        "replacing only the (method, seed) pairs run now")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "benchmark-distill",
                   help="where the trained teacher is kept (reuse it with --teacher)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    configs = {m: stage_config(m, args.student, args.epochs) for m in methods if m != "ce"}

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    started = time.perf_counter()
    data = load_data(seeds[0], args.train_subset, log)
    log(f"{data!r}")
    if args.teacher:
        teacher, teacher_info = load_model(args.teacher), {"path": str(args.teacher), "trained_here": False}
        sidecar = args.teacher.with_suffix(".json")  # written when this script trained it
        if sidecar.is_file():
            teacher_info.update(json.loads(sidecar.read_text()), path=str(args.teacher), trained_here=False)
    else:
        seed_everything(seeds[0])
        teacher = create_model("resnet20", num_classes=data.num_classes, in_channels=data.in_channels)
        t0 = time.perf_counter()
        metrics = fit(teacher, data, OptimConfig(lr=0.1, schedule="onecycle"), args.teacher_epochs,
                      device=data.device, log=log, progress=False, desc="teacher")
        path = save_model(teacher.eval(), args.work / "teacher.pt", name="resnet20", num_classes=data.num_classes,
                          in_channels=data.in_channels)
        teacher_info = {"path": str(path), "trained_here": True, "epochs": args.teacher_epochs,
                        "wall_seconds": round(time.perf_counter() - t0, 1), "val_accuracy": metrics["best_accuracy"],
                        "train_subset": args.train_subset}
        atomic_write_json(path.with_suffix(".json"), {k: v for k, v in teacher_info.items() if k != "trained_here"})
    teacher_info.update(test_accuracy=evaluate(teacher, data.eval_batches("test")), params=count_params(teacher),
                        macs=count_macs(teacher, (data.in_channels, *data.image_size)))
    log(f"teacher: test accuracy {teacher_info['test_accuracy']:.2f}%")

    rows = previous_runs(args, data, teacher_info) if args.append else []
    for seed in seeds:  # seed-major: a benchmark stopped early still has every method for the first seeds
        for method in methods:
            row = run_one(method, seed, configs.get(method), teacher, data, args, log)
            rows = [r for r in rows if (r["method"], r["seed"]) != (method, seed)] + [row]
            write(args, data, teacher_info, rows, started)  # after every run: a killed benchmark keeps what it has


def run_one(method: str, seed: int, cfg: DistillStage | None, teacher, data, args, log) -> dict:
    seed_everything(seed)  # for a given seed, every student starts from the same weights ...
    data.seed = seed       # ... and sees the same batches
    student = create_model(args.student, num_classes=data.num_classes, in_channels=data.in_channels)
    t0 = time.perf_counter()
    if cfg is None:  # ce: the train stage's loop, no teacher
        metrics = fit(student, data, OptimConfig(), args.epochs, device=data.device, teachers=[], log=log,
                      progress=False, desc=method)
        loss_info = {"ce_weight": 1.0}
    else:
        with build_loss(cfg, [teacher], student, data) as loss:
            metrics = fit(student, data, cfg, args.epochs, device=data.device, teachers=[teacher],
                          kd_loss=loss, log=log, progress=False, desc=method)
        loss_info = {k: v for k, v in cfg.model_dump(include={"method", "temperature", "alpha", "ce_weight",
                                                              "dkd", "dist", "features"}).items()
                     if v is not None and not (k in ("dkd", "dist") and k != cfg.method)}
        if loss.features is not None:
            loss_info["features"]["pairs"] = [list(pair) for pair in loss.features.pairs]
    wall = time.perf_counter() - t0
    row = {"method": method, "seed": seed, "test_accuracy": evaluate(student, data.eval_batches("test")),
           "val_accuracy": metrics["best_accuracy"], "best_epoch": metrics["best_epoch"], "epochs": args.epochs,
           "wall_seconds": round(wall, 1), "train_images_per_s": metrics["train_images_per_s"], "loss": loss_info}
    log(f"{method} (seed {seed}): test {row['test_accuracy']:.2f}% (val {row['val_accuracy']:.2f}%) in {wall:.0f} s")
    return row


def previous_runs(args, data, teacher_info: dict) -> list[dict]:
    try:
        old = json.loads((args.out / "distill.json").read_text())
    except (OSError, ValueError):
        return []
    args.previous_commands = old.get("commands") or [old["command"]]
    same = (old.get("student") == args.student and old.get("teacher", {}).get("path") == teacher_info["path"]
            and old.get("dataset", {}).get("train") == data.num_train
            and all(r["epochs"] == args.epochs for r in old.get("runs", [])))
    if not same:
        raise SystemExit(f"--append: {args.out / 'distill.json'} has another student, teacher, data or epoch budget")
    return old["runs"]


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: mean and sample std over seeds, and the mean paired difference with CE (same seeds)."""
    ce = {r["seed"]: r["test_accuracy"] for r in rows if r["method"] == "ce"}
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        acc = [r["test_accuracy"] for r in runs]
        diffs = [r["test_accuracy"] - ce[r["seed"]] for r in runs if r["seed"] in ce]
        out.append({"method": method, "seeds": [r["seed"] for r in runs], "test_accuracy": acc,
                    "test_mean": round(statistics.mean(acc), 2),
                    "test_std": round(statistics.stdev(acc), 2) if len(acc) > 1 else None,
                    "val_mean": round(statistics.mean(r["val_accuracy"] for r in runs), 2),
                    "vs_ce_mean": round(statistics.mean(diffs), 2) if diffs and method != "ce" else None,
                    "vs_ce_wins": sum(d > 0 for d in diffs) if method != "ce" else None,
                    "wall_seconds_mean": round(statistics.mean(r["wall_seconds"] for r in runs), 1),
                    "loss": runs[0]["loss"], "epochs": runs[0]["epochs"]})
    return out


def write(args, data, teacher_info: dict, rows: list[dict], started: float) -> None:
    result = {
        "schema": "compress.benchmark.distill/2",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commands": [*getattr(args, "previous_commands", []),  # --append: how the kept runs were made
                     "python benchmarks/distill.py " + " ".join(sys.argv[1:])],
        "dataset": {"name": data.name, "train": data.num_train, "val": data.num_val, "test": data.num_test,
                    "batch_size": data.batch_size, "augment": {"crop_padding": data.crop_padding, "hflip": data.hflip}},
        "teacher": {"model": "resnet20", **teacher_info},
        "student": args.student,
        "machine": machine_info(),
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "summary": summarize(rows),
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "distill.json", result)
    atomic_write_text(args.out / "distill.md", markdown(result))


def markdown(result: dict) -> str:
    m, t, d = result["machine"], result["teacher"], result["dataset"]
    summary = result["summary"]
    seeds = sorted({r["seed"] for r in result["runs"]})
    epochs = summary[0]["epochs"] if summary else "?"
    lines = [
        "# Distillation methods at an equal budget",
        "",
        f"Student `{result['student']}`, {epochs} epoch(s) per run, on {d['name']} ({d['train']:,} train / "
        f"{d['val']:,} val / {d['test']:,} test, batch {d['batch_size']}, hflip, no crop); every method at its "
        f"defaults (compress/config.py), SGD lr 0.1 one-cycle. For a given seed every method starts from the same "
        f"student weights and sees the same batches; each run keeps its best-on-val epoch and is scored on test. "
        f"Seeds: {', '.join(map(str, seeds))}. Teacher `resnet20`: {t['test_accuracy']:.2f}% test"
        + (f", trained by this script for {t['epochs']} epochs (SGD, lr 0.1, one-cycle"
           + (", on all 55,000 training images" if t.get("train_subset") is None else
              f", on {t['train_subset']:,} training images") + ")" if t.get("epochs") else "")
        + ("." if t.get("trained_here") else f", loaded from `{t['path']}`."),
        "",
        "| method | loss | test acc. (%) mean ± std | per seed | vs CE (points, paired) | beats CE | "
        "val acc. (%) | wall (s) |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        spread = f" ± {s['test_std']:.2f}" if s["test_std"] is not None else ""
        vs = f"{s['vs_ce_mean']:+.2f}" if s["vs_ce_mean"] is not None else ""
        wins = f"{s['vs_ce_wins']}/{len(s['seeds'])}" if s["vs_ce_wins"] is not None else ""
        lines.append(f"| {s['method']} | {describe(s['loss'])} | {s['test_mean']:.2f}{spread} | "
                     f"{' / '.join(f'{a:.2f}' for a in s['test_accuracy'])} | {vs} | {wins} | "
                     f"{s['val_mean']:.2f} | {s['wall_seconds_mean']:.0f} |")
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['torch_threads']} torch threads, "
        f"{m['gpu'] or 'no GPU'}; torch {m['versions']['torch']}, Python {m['versions']['python']}, {m['os']}.",
        "Wall times were taken while other jobs shared the 2 cores (this benchmark ran at `nice 19`), so they "
        "swing by 10x from run to run: compare accuracies, not times.",
        "",
        "Command" + ("s" if len(result["commands"]) > 1 else "") + ": "
        + "; ".join(f"`{c}`" for c in result["commands"]),
        "",
    ]
    return "\n".join(lines)


def describe(loss: dict) -> str:
    parts = [f"CE×{loss['ce_weight']:g}"]
    if loss.get("method") not in (None, "none"):
        extra = {"dkd": lambda o: f", tckd {o['tckd']:g}, nckd {o['nckd']:g}, warm-up {o['warmup_epochs']:g} ep",
                 "dist": lambda o: f", inter {o['inter']:g}, intra {o['intra']:g}"}
        opts = extra[loss["method"]](loss[loss["method"]]) if loss["method"] in extra else ""
        parts.append(f"{loss['method']}×{loss['alpha']:g} (T {loss['temperature']:g}{opts})")
    if loss.get("features"):
        f = loss["features"]
        pairs = ", ".join(f"{a}↔{b}" for a, b in f["pairs"])
        parts.append(f"{f['method']}×{f['weight']:g} ({pairs})")
    return " + ".join(parts)


if __name__ == "__main__":
    main()
