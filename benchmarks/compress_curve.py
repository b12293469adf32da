"""What does each compression step cost? Pruning ratios with and without KD, INT8 by PTQ and QAT.

One student on Fashion-MNIST, through the pipeline itself: this script writes a pipeline YAML
(a ResNet-20 teacher, the student distilled from it, then one prune stage per ratio of MACs
removed, fine-tuned with KD from the teacher and with cross-entropy alone, and the student
quantized to INT8 by NNCF PTQ, ONNX Runtime PTQ and NNCF QAT), runs `compress run` on it and
reads the report: test accuracy, MACs, ONNX size and ONNX Runtime latency of every artifact,
each against the unpruned FP32 student. Writes benchmarks/results/compress_curve.{json,md}.

Targets (issue 7): removing half of the MACs costs at most 0.5 points with KD fine-tuning;
INT8 costs at most 0.3 points by PTQ and 0.1 by QAT.

    python benchmarks/compress_curve.py                      # ~25 min on an idle 2-core CPU
    python benchmarks/compress_curve.py --ratios 0.5 --finetune-epochs 1 --student shufflenetv2_x0_5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.io import atomic_write_json, atomic_write_text  # noqa: E402

TARGETS = {"prune_kd_half": 0.5, "ptq": 0.3, "qat": 0.1}   # max accuracy drop (points)


def pipeline(args) -> dict:
    stages = {
        "teacher": {"type": "train", "model": "resnet20", "epochs": args.teacher_epochs, "lr": 0.1},
        "student": {"type": "distill", "from": "teacher", "model": args.student, "epochs": args.student_epochs,
                    "temperature": 4, "alpha": 0.9},
    }
    for removed in args.ratios:
        pct = round(100 * removed)
        for kd in (True, False):
            stages[f"pruned{pct}-{'kd' if kd else 'ce'}"] = {
                "type": "prune", "from": "student", "target_macs": round(1 - removed, 4),
                "finetune_epochs": args.finetune_epochs, **({} if kd else {"method": "none"})}
    stages["int8-ptq"] = {"type": "quantize", "from": "student", "method": "ptq",
                          "calibration_size": args.calibration}
    stages["int8-ptq-ort"] = {"type": "quantize", "from": "student", "method": "ptq", "backend": "onnxruntime",
                              "calibration_size": args.calibration}
    stages["int8-qat"] = {"type": "quantize", "from": "student", "method": "qat", "epochs": args.qat_epochs,
                          "calibration_size": args.calibration}
    return {"name": args.name, "seed": args.seed,
            "data": ({"dataset": "fashion-mnist", "batch_size": 128, "val_size": 5000,
                      "augment": {"crop_padding": 0, "hflip": True}} if args.dataset == "fashion-mnist" else
                     {"dataset": "synthetic", "batch_size": 64, "val_size": 128, "synthetic": {"image_size": 16}}),
            "stages": stages,
            "engine": {"precisions": ["fp16", "int8"]},
            "benchmark": {"runtimes": ["onnxruntime"], "batch_sizes": [1, 64], "warmup": 10, "iters": 50}}


def rows_from(report: dict, student: str = "student") -> list[dict]:
    by_name = {r["name"]: r for r in report["artifacts"] if r["runtime"] == "onnxruntime" and r["status"] == "ok"}
    base = by_name[student]
    out = []
    for name, r in by_name.items():
        stage = report["stages"][name]
        kind = ("teacher" if name == "teacher" else "student" if name == student else
                "int8 " + name.split("-", 1)[1] if name.startswith("int8") else
                f"prune {name[6:8]}% of MACs, " + ("KD" if name.endswith("kd") else "CE") + " fine-tune")
        out.append({"artifact": name, "what": kind, "accuracy": r["accuracy"],
                    "delta": None if name == "teacher" else round(r["accuracy"] - base["accuracy"], 2),
                    "macs": r["macs"], "macs_ratio": round(r["macs"] / base["macs"], 3) if r["macs"] else None,
                    "params": r["params"], "size_bytes": r["size_bytes"], "precision": r["precision"],
                    "p50_ms_1": r["latency_ms"]["1"]["p50"], "ips_64": r["throughput_ips"].get("64"),
                    "accuracy_before_finetune": ((stage.get("metrics") or {}).get("prune") or {})
                    .get("accuracy_before_finetune"),
                    "float_layers": (stage.get("metrics") or {}).get("kept_float_layers"),
                    "wall_seconds": report["wall_seconds"].get(name)})
    return out


def verdicts(rows: list[dict], ratios: list[float]) -> list[str]:
    by = {r["artifact"]: r for r in rows}
    lines = []
    half = by.get("pruned50-kd")
    if half:
        ok = -half["delta"] <= TARGETS["prune_kd_half"]
        lines.append(f"half the MACs removed, KD fine-tune: {half['delta']:+.2f} points "
                     f"(target >= -{TARGETS['prune_kd_half']}): {'met' if ok else 'NOT met'}")
    for name, key in (("int8-ptq", "ptq"), ("int8-ptq-ort", "ptq"), ("int8-qat", "qat")):
        if name in by:
            ok = -by[name]["delta"] <= TARGETS[key]
            lines.append(f"{name}: {by[name]['delta']:+.2f} points (target >= -{TARGETS[key]}): "
                         f"{'met' if ok else 'NOT met'}")
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    a = result["args"]
    lines = [
        "# Compression curve: pruning ratio, KD fine-tuning, INT8",
        "",
        f"Student `{a['student']}` ({a['student_epochs']} epochs of KD from a ResNet-20 trained {a['teacher_epochs']} "
        f"epochs) on " + ("Fashion-MNIST (55,000 train / 5,000 val / 10,000 test)" if a["dataset"] == "fashion-mnist"
                          else "SYNTHETIC data (a check of the script, not a result)") + ". Pruning: per-layer L1, BN "
        f"recalibration, {a['finetune_epochs']} fine-tuning epoch(s), with KD from the teacher or with cross-entropy "
        f"only. INT8: NNCF PTQ, ONNX Runtime static PTQ, NNCF QAT ({a['qat_epochs']} epoch, KD), "
        f"{a['calibration']} calibration images from train. Accuracy on the test split; latency on ONNX Runtime "
        f"(CPU, {m['torch_threads']} threads), p50 at batch 1 and throughput at batch 64. Δ is against the "
        "unpruned FP32 student.",
        "",
        "| artifact | what | top-1 % | Δ points | before fine-tune % | MACs | MACs × | params | ONNX size | p50 ms @1 "
        "| img/s @64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        delta = "" if r["delta"] is None else f"{r['delta']:+.2f}"
        before = "" if r["accuracy_before_finetune"] is None else f"{r['accuracy_before_finetune']:.2f}"
        lines.append(f"| {r['artifact']} | {r['what']} | {r['accuracy']:.2f} | {delta} | {before} | "
                     f"{r['macs'] / 1e6:.2f} M | {r['macs_ratio'] if r['macs_ratio'] is not None else ''} | "
                     f"{r['params']:,} | {r['size_bytes'] / 1024:.0f} KiB | {r['p50_ms_1']:.3f} | "
                     f"{r['ips_64']:,.0f} |")
    lines += ["", "Targets:", ""] + [f"- {v}" for v in result["verdicts"]]
    lines += ["", f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, GPU: {m.get('gpu') or 'none'}; "
              f"torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}, nncf "
              f"{m['versions']['nncf']}. Pipeline wall time {result['wall_seconds'] / 60:.1f} min.",
              "", f"Command: `{result['command']}` (pipeline: `{result['pipeline_file']}`)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", default="mobilenetv2_x0_35")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--student-epochs", type=int, default=3)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5, 0.7],
                    help="fractions of the MACs removed, comma-separated")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "synthetic"],
                    help="synthetic: a minutes-long check that the script works, not a result")
    ap.add_argument("--name", default="compress-curve")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="run directory root (stages are cached there)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    work = args.runs / args.name
    work.mkdir(parents=True, exist_ok=True)
    pipeline_file = work / "pipeline.yaml"
    atomic_write_text(pipeline_file, yaml.safe_dump(pipeline(args), sort_keys=False))
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "compress", "run", str(pipeline_file), "--out", str(args.runs),
           "--reports", str(work / "reports"), "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        raise SystemExit("compress run failed")
    report = json.loads((work / "reports" / args.name / "report.json").read_text())
    rows = rows_from(report)
    result = {"schema": "compress.benchmark.compress_curve/1",
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/compress_curve.py " + " ".join(sys.argv[1:]),
              "pipeline_file": str(pipeline_file.relative_to(ROOT) if pipeline_file.is_relative_to(ROOT)
                                   else pipeline_file),
              "pipeline": pipeline(args), "args": {k: v for k, v in vars(args).items() if k in (
                  "student", "teacher_epochs", "student_epochs", "ratios", "finetune_epochs", "qat_epochs",
                  "calibration", "seed", "dataset")},
              "machine": report["machine"], "wall_seconds": report["wall_seconds"].get("total",
                                                                                        time.perf_counter() - started),
              "rows": rows, "verdicts": verdicts(rows, args.ratios)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "compress_curve.json", result)
    atomic_write_text(args.out / "compress_curve.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
