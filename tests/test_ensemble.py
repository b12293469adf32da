"""Several teachers: the report gets their averaged-logits ensemble, next to a student distilled from both."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress import config, ensemble
from compress.io import load_model
from compress.pipeline import run_pipeline

PIPELINE = """\
name: two-teachers
seed: 0
data:
  dataset: synthetic
  synthetic: {num_train: 256, num_test: 96, num_classes: 3, image_size: 12, channels: 1}
  batch_size: 32
  val_size: 64
stages:
  a:       {type: train, model: resnet8, epochs: 2, lr: 0.05}
  b:       {type: train, model: resnet8, epochs: 1, lr: 0.05, seed_offset: 1}
  student: {type: distill, from: [a, b], model: mobilenetv2_x0_35, epochs: 1, lr: 0.05}
export: {parity_images: 16}
benchmark: {runtimes: [torch, onnxruntime], batch_sizes: [1, 4], warmup: 1, iters: 3}
"""


def test_two_teachers_get_an_ensemble_row_per_runtime(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(PIPELINE.replace(", seed_offset: 1", ""))
    cfg = config.load(f, [f"report.dir={tmp_path / 'reports'}"])
    report_dir = run_pipeline(cfg, pipeline_path=f, runs_dir=tmp_path / "runs", log=lambda m: None, progress=False)
    report = json.loads((Path(report_dir) / "report.json").read_text())
    rows = report["artifacts"]
    ens = [r for r in rows if r["name"] == "ensemble"]
    assert sorted(r["runtime"] for r in ens) == ["onnxruntime", "torch"]
    members = {r["name"]: r for r in rows if r["name"] in ("a", "b") and r["runtime"] == "onnxruntime"}
    e = next(r for r in ens if r["runtime"] == "onnxruntime")
    assert e["members"] == ["a", "b"] and e["macs"] == members["a"]["macs"] + members["b"]["macs"]
    assert abs(e["latency_ms"]["1"]["p50"] - members["a"]["latency_ms"]["1"]["p50"]
               - members["b"]["latency_ms"]["1"]["p50"]) < 1e-3
    # the accuracy is that of the averaged logits, recomputed here by hand on the test split
    from compress.data import build_data

    data = build_data(cfg.data, torch.device("cpu"), seed=cfg.seed)
    models = [load_model(tmp_path / "runs" / "two-teachers" / n / "model.pt").eval() for n in ("a", "b")]
    correct = total = 0
    with torch.no_grad():
        for x, y in data.eval_batches("test"):
            logits = (models[0](x) + models[1](x)) / 2
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    assert abs(e["accuracy"] - round(100 * correct / total, 2)) < 1e-6
    md = (Path(report_dir) / "report.md").read_text()
    assert "ensemble" in md


def test_one_teacher_gets_no_ensemble_row():
    class A:
        def __init__(self, name, stage, parent):
            self.name, self.stage, self.parent, self.files = name, stage, parent, {"model": "x"}

    arts = {"t": A("t", "train", None), "s": A("s", "distill", "t"), "i": A("i", "import", None)}
    assert [a.name for a in ensemble.teachers(arts)] == ["t", "i"]
    assert ensemble.teachers({"t": arts["t"], "s": arts["s"]}) == [arts["t"]]
