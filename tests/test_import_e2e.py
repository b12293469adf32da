"""Bring your model: a model trained and saved by a plain PyTorch script (tests/data/plain_train.py, no
compress) on RGB JPEGs is imported with no training, scores what the script measured, then is distilled
into a real-resolution MobileNetV3, pruned and quantized in the same pipeline; its deploy bundle's infer.py
preprocesses the way the script did."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_preprocess import make_jpeg_folder

HERE = Path(__file__).parent
SCRIPT = HERE / "data" / "plain_train.py"


def compress_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compress", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bring")
    images = make_jpeg_folder(tmp / "images", classes=3, per_class=16, size=(88, 72), test_per_class=7)
    shutil.copy(SCRIPT, tmp / "plain_train.py")
    proc = subprocess.run([sys.executable, "plain_train.py", str(images), "tiny.pt"], cwd=tmp, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return tmp, images, json.loads(proc.stdout.splitlines()[-1])


def pipeline(tmp: Path, images: Path, stages: dict, name: str = "bring") -> Path:
    doc = {"name": name, "seed": 0, "device": "cpu",
           "data": {"dataset": "imagefolder", "root": str(images), "image_size": 64, "resize": 73,
                    "normalize": "imagenet", "val_size": 6, "batch_size": 16, "cache": False,
                    "augment": {"random_resized_crop": {"scale": [0.5, 1.0]}, "hflip": True}},
           "stages": stages,
           "export": {"parity_images": 16},
           "benchmark": {"runtimes": ["torch", "onnxruntime"], "batch_sizes": [1], "warmup": 1, "iters": 2},
           "report": {"dir": str(tmp / "reports")}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_import_then_distill_prune_quantize(trained):
    """pipelines/finetune.yaml, shrunk to test size: the user's model and weights, 64 px, one epoch each."""
    tmp, images, script = trained
    example = yaml.safe_load((HERE.parent / "pipelines" / "finetune.yaml").read_text())
    stages = example["stages"]
    stages["teacher"].update(model="plain_train.py:TinyNet", weights="tiny.pt")
    stages["student"].update(epochs=1, lr=0.01)
    stages["student-pruned"].update(target_macs=0.7, finetune_epochs=1)
    stages["student-int8"].update(backend="onnxruntime", calibration_size=16)
    assert stages["student"]["model"] == "mobilenet_v3_small"
    stages = {"imported": stages["teacher"], "student": {**stages["student"], "from": "imported"},
              "pruned": {**stages["student-pruned"], "from": "student"},
              "int8": {**stages["student-int8"], "from": "pruned"}}
    path = pipeline(tmp, images, stages)
    proc = compress_cli("run", path, "--out", tmp / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp / "reports" / "bring" / "report.json").read_text())
    rows = {(r["name"], r["runtime"]): r for r in report["artifacts"]}
    # no training happened, and the score is the script's own, on the same images and preprocessing
    assert report["stages"]["imported"]["metrics"]["epochs"] == 0
    assert abs(rows["imported", "torch"]["accuracy"] - script["test_accuracy"]) <= 0.1
    assert abs(rows["imported", "onnxruntime"]["accuracy"] - script["test_accuracy"]) <= 0.1
    for name in ("student", "pruned", "int8"):
        assert rows[name, "onnxruntime"]["status"] == "ok", rows[name, "onnxruntime"]
    assert rows["pruned", "torch"]["macs"] < rows["student", "torch"]["macs"]
    assert report["data"]["preprocess"]["resize"] == 73 and report["data"]["preprocess"]["size"] == [64, 64]

    # the deploy bundle classifies an image file the way the model scored it
    bundle = tmp / "bundle"
    proc = compress_cli("deploy", tmp / "runs" / "bring", "--artifact", "imported", "--target", "onnx",
                        "--out", bundle)
    assert proc.returncode == 0, proc.stderr
    test_images = sorted((images / "test").rglob("*.jpg"))
    out = subprocess.run([sys.executable, "infer.py", *map(str, test_images), "--json"], cwd=bundle,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    predicted = [json.loads(line) for line in out.stdout.splitlines()]
    correct = sum(p["class"] == img.parent.name for p, img in zip(predicted, test_images))
    assert abs(100 * correct / len(test_images) - script["test_accuracy"]) <= 0.1


@pytest.mark.parametrize("weights, extra, message", [
    ("missing.pt", {}, r"^error: stages\.imported\.weights: .*missing\.pt: no such weights file"),
    ("pickled.pt", {}, "refused: the weights file holds pickled Python objects"),
    ("corrupt.safetensors", {}, "not a readable safetensors file"),
    ("other.pt", {}, r"weights do not fit 'plain_train.py:TinyNet': \d+ missing \(features\.0\.weight"),
    ("tiny.pt", {"model": "resnet8"}, r"weights do not fit 'resnet8'"),
])
def test_bad_weights_are_one_line_and_nothing_is_written(trained, weights, extra, message):
    import torch

    tmp, images, _ = trained
    torch.save(torch.nn.Linear(2, 2), tmp / "pickled.pt")
    (tmp / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}")
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 4)}}, tmp / "other.pt")
    stage = {"type": "import", "model": "plain_train.py:TinyNet", "weights": weights, **extra}
    path = pipeline(tmp, images, {"imported": stage}, name="bad")
    proc = compress_cli("run", path, "--out", tmp / "bad-runs")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # (the rest: progress)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(message, errors[0]), errors
    assert not (tmp / "bad-runs" / "bad" / "imported" / "model.pt").exists()
    assert not (tmp / "reports" / "bad").exists()


def test_other_class_count_needs_reinit_classifier(trained):
    tmp, images, _ = trained
    two = tmp / "two-classes"
    if not two.exists():
        shutil.copytree(images, two, ignore=shutil.ignore_patterns("class2"))
    path = pipeline(tmp, two, {"imported": {"type": "import", "model": "plain_train.py:TinyNet",
                                            "weights": "tiny.pt"}}, name="two")
    proc = compress_cli("run", path, "--out", tmp / "two-runs")
    assert proc.returncode == 2 and "the weights classify 3 classes and the data has 2" in proc.stderr
    assert "reinit_classifier: true" in proc.stderr
    path = pipeline(tmp, two, {"tuned": {"type": "train", "model": "plain_train.py:TinyNet", "weights": "tiny.pt",
                                         "reinit_classifier": True, "epochs": 1, "lr": 0.01}}, name="two")
    proc = compress_cli("validate", path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("data, message", [
    ({"normalize": "dataset", "mean": [0.5], "std": [0.2]},
     r"data\.mean/std has 1 values per channel, but the images have 3 channels"),
    ({"resize": 32}, r"bad\w*\.yaml:\d+: data: resize 32 is below image_size 64"),
    ({"augment": {"random_resized_crop": {"ratio": [2, 1]}}}, "min is above max"),
])
def test_bad_preprocessing_is_one_line_exit_2(trained, data, message):
    tmp, images, _ = trained
    path = pipeline(tmp, images, {"imported": {"type": "import", "model": "plain_train.py:TinyNet",
                                               "weights": "tiny.pt"}}, name="badpre")
    doc = yaml.safe_load(path.read_text())
    doc["data"].update(data)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = compress_cli("run", path, "--out", tmp / "badpre-runs")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(message, errors[0]), errors
    assert not (tmp / "badpre-runs" / "badpre" / "imported").exists()
