"""Benchmark stage: accuracy on the test split and latency at each batch size, for every artifact
on every runtime it can run on (the runners and the timing rules are in compress.runtime).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from compress.config import BenchmarkConfig
from compress.context import Artifact, Context
from compress.scoring import PARITY_IMAGES, blank_row, compare_outputs


def _latency_batch(data, split: str, b: int) -> torch.Tensor:
    x, _ = data.images(split, b)
    if x.shape[0] < b:  # a split smaller than the batch: repeat it (timing only)
        x = x.repeat((b + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:b]
    return x


def run(cfg: BenchmarkConfig, ctx: Context) -> list[dict[str, Any]]:
    """Accuracy on the test split and latency at each batch size, for every artifact on every runtime.

    Each runtime scores in its own process: runtimes change process-wide floating-point state (an
    OpenVINO inference left ONNX Runtime's top-1 on an unchanged model 0.5 point lower in the same
    process), so no runtime may see another's leftovers, and the order of `runtimes` changes nothing.
    The images go to the workers in one file; each returns its rows and its logits on the parity
    images, which are compared with ONNX Runtime's (the reference) for the same artifact and precision.
    TensorRT rows run the engines the engine stage built (`ctx.engines`).
    """
    data, engines = ctx.data, ctx.engines
    tmp = Path(tempfile.mkdtemp(prefix=".benchmark-", dir=ctx.run_dir))
    by_runtime: dict[str, list[dict]] = {}
    try:
        inputs = tmp / "inputs.pt"
        torch.save({"eval": [(x.cpu(), y.cpu()) for x, y in data.eval_batches(cfg.accuracy_split)],
                    "latency": {b: _latency_batch(data, cfg.accuracy_split, b).cpu() for b in cfg.batch_sizes},
                    "parity": data.images(cfg.accuracy_split, PARITY_IMAGES)[0].cpu()}, inputs)
        for runtime in cfg.runtimes:
            job = {"runtime": runtime, "config": cfg.model_dump(mode="json"), "engines": engines,
                   "artifacts": [asdict(a) for a in ctx.artifacts.values()], "inputs": str(inputs),
                   "out": str(tmp / runtime), "device": str(ctx.device), "base_dir": str(ctx.base_dir),
                   "threads": cfg.threads or torch.get_num_threads()}
            by_runtime[runtime] = _in_subprocess(job, tmp, ctx.log)
    finally:
        rows = [row for art in ctx.artifacts.values() for runtime in cfg.runtimes
                for row in by_runtime.get(runtime, []) if row["name"] == art.name]
        compare_outputs(rows, ctx.log)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _in_subprocess(job: dict, tmp: Path, log) -> list[dict[str, Any]]:
    job_file = tmp / f"{job['runtime']}.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "compress.scoring", str(job_file)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    for line in proc.stdout.splitlines():
        log(line)
    out = Path(job["out"] + ".rows.json")
    if proc.returncode == 0 and out.is_file():
        return json.loads(out.read_text())
    last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:200]
    log(f"[benchmark] the {job['runtime']} worker failed: {last}")
    rows = []
    for art in job["artifacts"]:
        row = blank_row(Artifact(**art), job["runtime"], art["precision"], None)
        row.update(status="failed", reason=f"{job['runtime']} worker exited with code {proc.returncode}: {last}")
        rows.append(row)
    return rows


def _pythonpath() -> str:
    """The worker imports this checkout's packages (compress, teachers, students) the way this process did."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
