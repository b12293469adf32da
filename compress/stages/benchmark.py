"""Benchmark stage: accuracy on the test split and latency at each batch size, for every artifact
on every runtime it can run on (the runners and the timing rules are in compress.runtime).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from compress.runtime import ONNX_FILES, evaluate, make_runner, measure_latency

def _latency_batch(data, split: str, b: int) -> torch.Tensor:
    x, _ = data.images(split, b)
    if x.shape[0] < b:  # a split smaller than the batch: repeat it (timing only)
        x = x.repeat((b + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:b]
    return x


def _row(art, runtime: str, precision: str, size_path: str | None) -> dict[str, Any]:
    return {"name": art.name, "stage": art.stage, "parent": art.parent, "model": art.model, "runtime": runtime,
            "precision": precision, "device": None, "params": art.params, "macs": art.macs,
            "size_bytes": os.path.getsize(size_path) if size_path and os.path.exists(size_path) else None,
            "accuracy": None, "latency_ms": {}, "throughput_ips": {}, "timer": None, "includes_copies": None,
            "status": "ok", "reason": None}


def _plans(art, runtimes: list[str], engines: dict[str, dict]) -> list[tuple[str, str, str | None, dict | None]]:
    """(runtime, precision, file for size, skip status) for every row an artifact gets."""
    plans = []
    for runtime in runtimes:
        if runtime == "torch":
            if art.precision == "int8":
                plans.append((runtime, "int8", art.files.get("onnx_int8"), {
                    "status": "skipped", "reason": "the INT8 model is a QDQ ONNX graph; it runs on onnxruntime "
                                                   "and tensorrt"}))
            else:
                plans.append((runtime, "fp32", art.files.get("model"), None))
        elif runtime == "onnxruntime":
            key = ONNX_FILES[art.precision]
            plans.append((runtime, art.precision, art.files.get(key), None))
        elif runtime == "tensorrt":
            built = engines.get(art.name) or {}
            if not built:
                plans.append((runtime, art.precision, None, {"status": "skipped",
                                                              "reason": "no engine precision requested for it"}))
            for precision, status in built.items():
                plans.append((runtime, precision, status.get("engine"), None if status["status"] == "ok" else status))
    return plans


def run(cfg, ctx, engines: dict[str, dict]) -> list[dict[str, Any]]:
    """Accuracy on the test split and latency at each batch size, for every artifact on every runtime."""
    data, device = ctx.data, ctx.device
    threads = cfg.threads or torch.get_num_threads()
    rows = []
    for art in ctx.artifacts.values():
        model = ctx.load_model(art) if art.files.get("model") and "torch" in cfg.runtimes else None
        for runtime, precision, size_path, skip in _plans(art, cfg.runtimes, engines):
            row = _row(art, runtime, precision, size_path)
            rows.append(row)
            if skip is not None:
                row.update(status=skip["status"], reason=skip["reason"])
                continue
            try:
                runner = make_runner(runtime, art.files, precision, device if runtime != "onnxruntime" else "cpu",
                                     model=model, threads=threads)
                row["device"] = runner.device
                row["accuracy"] = evaluate(runner, data.eval_batches(cfg.accuracy_split))["accuracy"]
                for b in cfg.batch_sizes:
                    lat = measure_latency(runner, _latency_batch(data, cfg.accuracy_split, b), cfg.warmup, cfg.iters)
                    row["latency_ms"][str(b)] = {k: round(lat[k], 4) for k in ("p50", "p90", "p99", "mean")}
                    row["throughput_ips"][str(b)] = round(lat["throughput_ips"], 1)
                    row["timer"], row["includes_copies"] = lat["timer"], lat["includes_copies"]
            except Exception as exc:  # one broken runtime must not cost the whole report
                row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                ctx.log(f"[benchmark] {art.name} on {runtime} ({precision}) failed: {row['reason']}")
                continue
            first = str(cfg.batch_sizes[0])
            ctx.log(f"[benchmark] {art.name:<18} {runtime:<12} {precision:<5} top-1 {row['accuracy']:6.2f}%  "
                    f"p50 {row['latency_ms'][first]['p50']:.3f} ms @{first}  "
                    + "  ".join(f"{row['throughput_ips'][str(b)]:,.0f} img/s @{b}" for b in cfg.batch_sizes))
    return rows
