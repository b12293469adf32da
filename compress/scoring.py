"""Scoring one runtime: every artifact's accuracy, latency and parity-image logits, in a worker process.

The benchmark stage (compress.stages.benchmark) starts one `python -m compress.scoring JOB.json`
per runtime, so no runtime sees another's process-wide state, then checks every row's decisions
against ONNX Runtime's on the parity images (`compare_outputs`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import fastpath
from compress.config import BenchmarkConfig
from compress.context import Artifact
from compress.runtime import CPU_INT8_FILES, ONNX_FILES, evaluate, latency_stats, make_runner, measure_latency


def blank_row(art, runtime: str, precision: str, size_path: str | None) -> dict[str, Any]:
    return {"name": art.name, "stage": art.stage, "parent": art.parent, "model": art.model, "runtime": runtime,
            "precision": precision, "device": None, "params": art.params, "macs": art.macs,
            "size_bytes": os.path.getsize(size_path) if size_path and os.path.exists(size_path) else None,
            "accuracy": None, "latency_ms": {}, "throughput_ips": {}, "timer": None, "includes_copies": None,
            "status": "ok", "reason": None, "file": size_path, "inference_precision": None, "parity": None}


def plans(art, runtimes: list[str], engines: dict[str, dict]) -> list[tuple[str, str, str | None, dict | None]]:
    """(runtime, precision, file for size, skip status) for every row an artifact gets."""
    plans = []
    for runtime in runtimes:
        if runtime == "torch":
            if art.precision == "int8":
                plans.append((runtime, "int8", art.files.get("onnx_int8"), {
                    "status": "skipped", "reason": "the INT8 model is a QDQ ONNX graph; it runs on onnxruntime, "
                                                   "openvino and tensorrt"}))
            else:
                plans.append((runtime, "fp32", art.files.get("model"), None))
        elif runtime in ("onnxruntime", "openvino"):
            key = ONNX_FILES[art.precision]
            if art.precision == "int8":  # the runtime's own CPU INT8 form when the quantize stage wrote one
                key = next((k for k in CPU_INT8_FILES[runtime] if k in art.files), key)
            plans.append((runtime, art.precision, art.files.get(key), None))
        elif runtime == "tensorrt":
            built = engines.get(art.name) or {}
            if not built:
                plans.append((runtime, art.precision, None, {"status": "skipped",
                                                              "reason": "no engine precision requested for it"}))
            for precision, status in built.items():
                plans.append((runtime, precision, status.get("engine"), None if status["status"] == "ok" else status))
    return plans


# Top-1 agreement with ONNX Runtime's outputs, on the parity images, below which a row is failed:
# the same file on another runtime must make the same decisions (float rounding moves a handful of
# near-ties); an INT8 row may run a different INT8 file (another runtime's form) and gets more room.
PARITY_MIN_AGREEMENT = {"fp32": 0.98, "fp16": 0.97, "int8": 0.95}
PARITY_IMAGES = 256


def compare_outputs(rows: list[dict], log) -> None:
    """Fail any row whose parity-image decisions disagree with ONNX Runtime's for the same artifact and precision."""
    ref = {(r["name"], r["precision"]): r for r in rows if r["runtime"] == "onnxruntime" and r.get("_parity")}
    for row in rows:
        logits = row.pop("_parity", None)
        row.setdefault("parity", None)
        # an FP16 engine is built from the FP32 ONNX cast to FP16: ONNX Runtime's FP32 row is its reference
        base = ref.get((row["name"], row["precision"])) or (ref.get((row["name"], "fp32"))
                                                            if row["precision"] == "fp16" else None)
        if logits is None or base is None or row["runtime"] == "onnxruntime":
            continue
        a, b = np.load(logits), np.load(base["_parity_kept"])
        agree = float((a.argmax(1) == b.argmax(1)).mean())
        minimum = PARITY_MIN_AGREEMENT.get(row["precision"], 0.95)
        row["parity"] = {"reference": "onnxruntime", "top1_agreement": round(agree, 4),
                         "max_abs_diff": round(float(np.abs(a - b).max()), 5), "n": int(len(a)),
                         "reference_precision": base["precision"], "min_agreement": minimum}
        if agree < minimum and row["status"] == "ok":
            row.update(status="failed", reason=f"outputs disagree with onnxruntime: top-1 agreement {agree:.1%} "
                                              f"on {len(a)} parity images")
            log(f"[benchmark] {row['name']} on {row['runtime']} ({row['precision']}): {row['reason']}")
    for row in rows:
        row.pop("_parity_kept", None)


def score_runtime(job: dict) -> list[dict[str, Any]]:
    """One runtime's rows (the worker's work): every artifact's accuracy, latency and parity-image logits.

    Accuracy and parity first, artifact by artifact; then latency in `rounds` interleaved rounds over
    all the artifacts (each round re-warmed), so the INT8 and FP32 rows an `int8_not_faster` flag
    compares are timed through the same spells of a busy machine.
    """
    from compress.io import load_model

    cfg = BenchmarkConfig(**job["config"])
    runtime, threads, device = job["runtime"], job["threads"], torch.device(job["device"])
    torch.set_num_threads(threads)
    inputs = torch.load(job["inputs"], weights_only=True)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    rows, timed = [], []
    for i, spec in enumerate(job["artifacts"]):
        art = Artifact(**spec)
        model = None
        if runtime == "torch" and art.files.get("model"):
            model = load_model(art.files["model"], base_dir=Path(job["base_dir"]))
        for runtime_, precision, size_path, skip in plans(art, [runtime], job["engines"]):
            row = blank_row(art, runtime_, precision, size_path)
            rows.append(row)
            if skip is not None:
                row.update(status=skip["status"], reason=skip["reason"])
                continue
            try:
                runner = make_runner(runtime, art.files, precision, device if runtime in ("torch", "tensorrt") else "cpu",
                                     model=model, threads=threads)
                row["device"] = runner.device
                if runtime == "torch" and device.type == "cpu":  # channels-last / bf16 where they pay here
                    path = fastpath.choose(cfg.cpu_fast_path, runner.model, tuple(inputs["parity"].shape[1:]),
                                           max(cfg.batch_sizes), device=device, train=False,
                                           steps=(cfg.warmup + cfg.iters) * len(cfg.batch_sizes)
                                           + len(inputs["eval"]),
                                           log=lambda m: print(f"[benchmark] {art.name}: {m}", flush=True))
                    runner.use(path)
                    row["fast_path"] = path.mode
                row["file"] = getattr(runner, "file", None) or size_path
                if getattr(runner, "inference_precision", None):
                    row["inference_precision"] = runner.inference_precision
                row["accuracy"] = evaluate(runner, inputs["eval"])["accuracy"]
                parity = out / f"{i}-{precision}.npy"
                np.save(parity, runner(inputs["parity"]).float().cpu().numpy())
                row["_parity"] = row["_parity_kept"] = str(parity)
                timed.append((row, runner))
            except Exception as exc:  # one broken runtime must not cost the whole report
                _failed(row, runtime, precision, exc)
    _time_interleaved(timed, inputs["latency"], cfg, runtime)
    return rows


def _failed(row: dict, runtime: str, precision: str, exc: Exception) -> None:
    row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    print(f"[benchmark] {row['name']} on {runtime} ({precision}) failed: {row['reason']}", flush=True)


def _time_interleaved(timed: list, batches: dict, cfg: BenchmarkConfig, runtime: str) -> None:
    """Latency of every (row, runner) at every batch size: `cfg.rounds` rounds of about iters/rounds timed
    calls each, every round visiting every row (warm-up: `cfg.warmup` calls in the first round, at most 3
    after, to refill caches another model evicted); the percentiles are over all the calls."""
    per_round = -(-cfg.iters // cfg.rounds)
    times: dict[tuple[int, int], list[float]] = {}
    facts: dict[int, dict] = {}
    for r in range(cfg.rounds):
        for k, (row, runner) in enumerate(timed):
            if row["status"] != "ok":
                continue
            try:
                for b in cfg.batch_sizes:
                    lat = measure_latency(runner, batches[b], cfg.warmup if r == 0 else min(cfg.warmup, 3),
                                          per_round, keep_times=True)
                    times.setdefault((k, b), []).extend(lat["times_ms"])
                    facts[k] = {"timer": lat["timer"], "includes_copies": lat["includes_copies"]}
            except Exception as exc:
                _failed(row, runtime, row["precision"], exc)
    for k, (row, _) in enumerate(timed):
        if row["status"] != "ok":
            continue
        for b in cfg.batch_sizes:
            lat = latency_stats(times[(k, b)], b)
            row["latency_ms"][str(b)] = {key: round(lat[key], 4) for key in ("p50", "p90", "p99", "mean")}
            row["throughput_ips"][str(b)] = round(lat["throughput_ips"], 1)
        row.update(facts[k])
        first = str(cfg.batch_sizes[0])
        print(f"[benchmark] {row['name']:<18} {runtime:<12} {row['precision']:<5} top-1 {row['accuracy']:6.2f}%  "
              f"p50 {row['latency_ms'][first]['p50']:.3f} ms @{first}  "
              + "  ".join(f"{row['throughput_ips'][str(b)]:,.0f} img/s @{b}" for b in cfg.batch_sizes),
              flush=True)


if __name__ == "__main__":  # python -m compress.scoring JOB.json: one runtime's worker
    _job = json.loads(Path(sys.argv[1]).read_text())
    _rows = score_runtime(_job)
    Path(_job["out"] + ".rows.json").write_text(json.dumps(_rows))
