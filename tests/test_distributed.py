"""DDP on CPU: two real processes on gloo, against one process doing the same work.

A model without BatchNorm makes the check exact: with each process taking half of every
batch and DDP averaging the gradients, two processes must end where one process ends.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.config import DataConfig, OptimConfig
from compress.data import build_data
from compress.training import fit

ROOT = Path(__file__).resolve().parents[1]


def make_data():
    # 448 train images in 7 batches of 64: every process gets exactly 32 of each batch.
    cfg = DataConfig(dataset="synthetic", batch_size=64, val_size=64,
                     synthetic={"num_train": 512, "num_test": 64, "image_size": 8})
    return build_data(cfg, torch.device("cpu"), seed=0)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 4))


def optim() -> OptimConfig:
    return OptimConfig(lr=0.1, schedule="cosine", weight_decay=5e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    # Each process trained on its half of every batch: 2 epochs x 7 steps x 32 images.
    assert [r["seen"] for r in ranks] == [[32] * 14, [32] * 14]

    # DDP kept the two replicas identical ...
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    # ... and, taking half of each batch each, they learned what one process learns from whole batches.
    model = make_model()
    single = fit(model, make_data(), optim(), 2, device=torch.device("cpu"), progress=False, log=lambda m: None)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert model.state_dict()["4.weight"].sub(make_model().state_dict()["4.weight"]).abs().max() > 1e-3  # it trained
    # The epoch records sum over both processes: every training image once per epoch.
    for two, one in zip(ranks[0]["metrics"]["history"], single["history"]):
        assert two["train_accuracy"] == pytest.approx(one["train_accuracy"], abs=0.5)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-3)
        assert two["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=2.0)
    # Only rank 0 wrote the checkpoint, and it is the finished state.
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["progress"]["epoch"] == 2


@pytest.mark.slow
def test_compress_run_nproc_2_runs_the_pipeline(tmp_path):
    """`compress run --nproc 2`: training stages in both processes, the rest and all files in rank 0."""
    result = subprocess.run(
        [sys.executable, "-m", "compress", "run", str(ROOT / "pipelines" / "smoke.yaml"), "--nproc", "2",
         "--out", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"), "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("[teacher] train") == 1  # rank 1 works quietly
    assert "Traceback" not in log
    report = json.loads((tmp_path / "reports" / "smoke" / "report.json").read_text())
    processes = {}
    for manifest in (tmp_path / "runs" / "smoke").glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        processes[m["artifact"]["stage"]] = processes.get(m["artifact"]["stage"], set()) | {m["processes"]}
    assert processes == {"train": {2}, "distill": {2}, "prune": {2}, "quantize": {1}}
    accuracies = {r["name"]: r["accuracy"] for r in report["artifacts"] if r.get("accuracy") is not None}
    assert accuracies["teacher"] > 80  # the smoke teacher learns its 4 patterns under DDP too
    assert not list((tmp_path / "runs" / "smoke").glob("*/checkpoint-*.pt"))


def test_bad_config_fails_before_starting_processes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "pipelines" / "smoke.yaml").read_text().replace("epochs:", "epoch:", 1))
    result = subprocess.run([sys.executable, "-m", "compress", "run", str(bad), "--nproc", "2",
                             "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "epoch" in result.stderr
    assert not (tmp_path / "runs").exists()
