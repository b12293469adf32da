"""Faults, for real: `compress run` processes killed with SIGKILL, stopped with SIGTERM, run twice at
once, killed halfway through writing a file, and out of disk space.

Every run is one small training stage (resnet8 on 8x8 synthetic images, 8 epochs of 8 steps)
on one CPU thread, so a resumed run can be compared bit for bit with an uninterrupted one.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FAULT_YAML = """\
name: fault
seed: 0
device: cpu
data:
  dataset: synthetic
  synthetic: {num_train: 320, num_test: 32, num_classes: 4, image_size: 8}
  batch_size: 32
  val_size: 64
stages:
  teacher: {type: train, model: resnet8, epochs: 8, lr: 0.05}
export: {parity_images: 8}
engine: {precisions: [fp32]}
benchmark: {runtimes: [torch], batch_sizes: [1], warmup: 0, iters: 1}
"""
TIMING = {"seconds", "images_per_s", "train_seconds", "train_images_per_s", "wall_seconds"}


def command(tmp: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "compress", "run", str(tmp / "fault.yaml"), "--out", str(tmp / out),
            "--reports", str(tmp / f"reports-{out}"), "--no-progress"]


def run(tmp: Path, out: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(tmp, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def start(tmp: Path, out: str) -> subprocess.Popen:
    return subprocess.Popen(command(tmp, out), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_checkpoint(proc: subprocess.Popen, stage_dir: Path, timeout: float = 240) -> Path:
    """Poll until the first epoch's checkpoint is on disk (the process is then training epoch 2)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(stage_dir.glob("checkpoint-*.pt"))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared")


def result(run_dir: Path) -> tuple[dict, dict]:
    """The stage's weights and its metrics without wall-clock fields."""
    weights = torch.load(run_dir / "teacher/model.pt", weights_only=True)["state_dict"]
    metrics = json.loads((run_dir / "teacher/manifest.json").read_text())["artifact"]["metrics"]
    metrics = {k: v for k, v in metrics.items() if k not in TIMING}
    metrics["history"] = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics["history"]]
    return weights, metrics


def assert_same_result(run_dir: Path, reference: tuple[dict, dict]) -> None:
    weights, metrics = result(run_dir)
    ref_weights, ref_metrics = reference
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), "weights differ from the uninterrupted run"
    assert metrics == ref_metrics


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "fault.yaml").write_text(FAULT_YAML)
    return tmp


@pytest.fixture(scope="module")
def reference(tmp) -> tuple[dict, dict]:
    done = run(tmp, "reference")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((tmp / "reference/fault/teacher").glob("checkpoint-*.pt"))
    return result(tmp / "reference/fault")


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_equals_uninterrupted_run(tmp, reference):
    stage_dir = tmp / "killed/fault/teacher"
    proc = start(tmp, "killed")
    wait_for_checkpoint(proc, stage_dir)
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (stage_dir / "manifest.json").exists(), "the run finished before the kill"
    # What a kill during a write leaves behind; the next run clears it.
    (stage_dir / ".model.pt.x1y2z3.tmp").write_bytes(b"half a model")

    again = run(tmp, "killed")  # the lock of the killed process is not stuck
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: resuming from checkpoint-" in again.stderr
    assert "teacher: epoch 1/8" not in again.stderr
    assert_same_result(tmp / "killed/fault", reference)
    assert sorted(p.name for p in stage_dir.iterdir()) == ["manifest.json", "model.onnx", "model.pt"]


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_a_second_run_is_locked_out(tmp, reference):
    stage_dir = tmp / "stopped/fault/teacher"
    proc = start(tmp, "stopped")
    try:
        wait_for_checkpoint(proc, stage_dir)
        os.kill(proc.pid, signal.SIGSTOP)  # hold it mid-training, lock held
        second = run(tmp, "stopped")
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().splitlines() == [
            f"error: {tmp / 'stopped/fault'} is in use by another compress run (pid {proc.pid}); wait for it to "
            f"finish, or use another --out"]
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    line = last_line(stderr)
    assert line.startswith("stopped: teacher: stopped by SIGTERM at ") and line.endswith(
        "; run the same command again to resume"), line
    assert [ln for ln in stderr.splitlines() if ln.startswith(("stopped:", "error:"))] == [line]
    assert not (stage_dir / "manifest.json").exists()

    again = run(tmp, "stopped")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: resuming from checkpoint-" in again.stderr
    assert_same_result(tmp / "stopped/fault", reference)


KILL_MID_WRITE = """\
import os, signal, sys, torch
from compress.io import atomic_torch_save
path = sys.argv[1]
atomic_torch_save({"version": 1, "weights": torch.arange(1000)}, path)
real_fdopen = os.fdopen

class HalfThenDie:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def fileno(self): return self.f.fileno()
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush(); os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

os.fdopen = lambda fd, mode: HalfThenDie(real_fdopen(fd, mode))
atomic_torch_save({"version": 2, "weights": torch.arange(10**6)}, path)
"""


def test_kill_halfway_through_a_save_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    halves = list(tmp_path.glob(".model.pt.*.tmp"))
    assert len(halves) == 1 and halves[0].stat().st_size > 1_000_000  # it died mid-write, not before
    old = torch.load(path, weights_only=True)
    assert old["version"] == 1 and torch.equal(old["weights"], torch.arange(1000))


def test_disk_full_is_one_line_exit_2_and_the_previous_model_survives(tmp, reference, monkeypatch):
    import errno
    import shutil

    from typer.testing import CliRunner

    from compress.cli import app

    shutil.copytree(tmp / "reference", tmp / "full")
    stage_dir = tmp / "full/fault/teacher"
    before = {p.name: p.read_bytes() for p in stage_dir.iterdir()}
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up just as the new model.pt is written
        if ".model.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["run", str(tmp / "fault.yaml"), "--out", str(tmp / "full"), "--reports", str(tmp / "reports-full"),
                "--force", "teacher"]
        full = CliRunner().invoke(app, args)
        assert full.exit_code == 2, (full.output, full.exception)
        assert last_line(full.stderr) == (f"error: cannot write {stage_dir / 'model.pt'}: No space left on device "
                                          f"(the previous file is unchanged); free some space and run again")
        assert "Traceback" not in full.output
        assert {p.name: p.read_bytes() for p in stage_dir.iterdir() if p.suffix != ".pt" or p.name == "model.pt"} \
            == before
        assert not list(stage_dir.glob(".*.tmp"))
        # Space freed: the training done before the failed save is not lost.
        monkeypatch.setattr(os, "fsync", real_fsync)
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0, again.output
        assert "teacher: resuming from checkpoint-" in again.stderr and "at the end of training" in again.stderr
    finally:
        torch.set_num_threads(threads)
    assert_same_result(tmp / "full/fault", reference)
