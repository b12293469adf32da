"""Nothing lost: exact resume inside `fit`, non-finite losses, and stage caching in the runner.

In-process and small (a 5k-parameter CNN on 8x8 synthetic images); the real-process kill
tests are in test_faults.py.
"""

import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compress import config
from compress.config import DataConfig, OptimConfig
from compress.context import StageError
from compress.data import build_data
from compress.training import CHECKPOINT_FORMAT, Interrupted, fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    cfg = DataConfig(dataset="synthetic", batch_size=16, val_size=32,
                     synthetic={"num_train": 160, "num_test": 32, "image_size": 8})
    return build_data(cfg, CPU, seed=0)


class Net(nn.Module):
    """Dropout draws from the global torch RNG, so a resume that lost the RNG state would differ."""

    def __init__(self, nan_at=()):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.nan_at, self.calls = nan_at, 0  # training forward passes whose output is NaN

    def forward(self, x):
        out = self.body(x)
        if self.training:
            self.calls += 1
            if self.nan_at(self.calls) if callable(self.nan_at) else self.calls in self.nan_at:
                out = out * float("nan")
        return out


class LearnedKD(nn.Module):
    """A distillation loss with a parameter of its own: its state must be checkpointed too."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, student, teachers, labels):
        return F.cross_entropy(student * self.scale, labels) + F.mse_loss(student, teachers[0])


def run_fit(data, epochs=3, checkpoint=None, kd=False, model=None, log=None, **kw):
    model = model or Net()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)) if kd else None
    metrics = fit(model, data, OptimConfig(lr=0.05), epochs, device=CPU, progress=False, log=log or (lambda m: None),
                  teachers=[teacher] if kd else (), kd_loss=LearnedKD() if kd else None, checkpoint=checkpoint, **kw)
    return model, metrics


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_timing(metrics: dict) -> dict:
    drop = {"seconds", "images_per_s", "train_seconds", "train_images_per_s"}
    out = {k: v for k, v in metrics.items() if k not in drop}
    out["history"] = [{k: v for k, v in r.items() if k not in drop} for r in metrics["history"]]
    return out


def sigterm_at(model: nn.Module, call: int):
    """Send this process SIGTERM during the `call`-th training forward pass (mid-epoch)."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)

    return model.register_forward_hook(hook)


def scramble_rngs():
    torch.manual_seed(1234)
    random.seed(99)
    np.random.seed(7)


@pytest.mark.parametrize("kd", [False, True], ids=["train", "distill"])
def test_stop_mid_epoch_then_resume_is_bit_exact(data, tmp_path, kd):
    reference, ref_metrics = run_fit(data, kd=kd)

    ckpt = tmp_path / "checkpoint.pt"
    model = Net()
    handle = sigterm_at(model, 13)  # 8 steps and 1 evaluation per epoch: epoch 2, step 4
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM at epoch 2, step 4/8; progress saved to .*resume"):
        run_fit(data, kd=kd, checkpoint=ckpt, model=model)
    handle.remove()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # fit put the handlers back
    scramble_rngs()  # the checkpoint, not the process, must carry the generators

    logs = []
    resumed, metrics = run_fit(data, kd=kd, checkpoint=ckpt, log=logs.append)
    assert "train: resuming from checkpoint.pt at epoch 2, step 4/8" in logs
    assert same_weights(resumed, reference)
    assert without_timing(metrics) == without_timing(ref_metrics)


_reference = {}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=st.integers(1, 27))
def test_stop_anywhere_then_resume_is_bit_exact(data, call):
    """Whatever forward pass the signal lands in (27: 3 epochs of 8 steps and 1 evaluation), nothing is lost."""
    import tempfile

    if not _reference:
        _reference["model"], _reference["metrics"] = run_fit(data)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint.pt"
        model = Net()
        handle = sigterm_at(model, call)
        with pytest.raises(Interrupted):
            run_fit(data, checkpoint=ckpt, model=model)
        handle.remove()
        scramble_rngs()
        resumed, metrics = run_fit(data, checkpoint=ckpt)
    assert same_weights(resumed, _reference["model"])
    assert without_timing(metrics) == without_timing(_reference["metrics"])


def test_checkpoint_is_plain_data_and_complete(data, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    run_fit(data, epochs=2, checkpoint=ckpt, kd=True)
    state = torch.load(ckpt, weights_only=True)  # no pickled objects anywhere
    assert state["format"] == CHECKPOINT_FORMAT
    assert {"model", "optimizer", "scheduler", "scaler", "kd_loss", "rng", "progress"} <= set(state)
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert "scale" in state["kd_loss"]
    progress = state["progress"]
    assert progress["epoch"] == 2 and progress["step"] == 0 and len(progress["history"]) == 2
    assert progress["best_state"].keys() == state["model"].keys()

    # Resuming a finished run trains nothing and returns the same result.
    logs = []
    again, metrics = run_fit(data, epochs=2, checkpoint=ckpt, kd=True, log=logs.append)
    assert "train: resuming from checkpoint.pt at the end of training" in logs
    assert not any("epoch 1/2" in line for line in logs)
    reference, ref_metrics = run_fit(data, epochs=2, kd=True)
    assert same_weights(again, reference)
    assert without_timing(metrics) == without_timing(ref_metrics)


@pytest.mark.parametrize("damage", ["truncated", "pickled", "other model"])
def test_unusable_checkpoint_is_ignored_and_training_starts_over(data, tmp_path, damage):
    ckpt = tmp_path / "checkpoint.pt"
    run_fit(data, epochs=1, checkpoint=ckpt)
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == "pickled":
        torch.save(nn.Linear(2, 2), ckpt)
    else:
        state = torch.load(ckpt, weights_only=True)
        state["model"]["body.0.weight"] = torch.zeros(3, 1, 3, 3)
        torch.save(state, ckpt)
    logs = []
    model, metrics = run_fit(data, epochs=2, checkpoint=ckpt, log=logs.append)
    ignored = [line for line in logs if "ignoring" in line]
    assert len(ignored) == 1 and "starting this stage from scratch" in ignored[0]
    if damage == "pickled":
        assert "refused" in ignored[0]
    reference, ref_metrics = run_fit(data, epochs=2)
    assert same_weights(model, reference)
    assert without_timing(metrics) == without_timing(ref_metrics)


def test_isolated_nan_losses_are_skipped(data):
    model, metrics = run_fit(data, epochs=2, model=Net(nan_at={3, 14, 15}))
    assert [r["skipped_steps"] for r in metrics["history"]] == [1, 2]
    assert metrics["rollbacks"] == 0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_nan_streak_rolls_back_with_half_the_learning_rate(data, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    logs = []
    model, metrics = run_fit(data, epochs=2, model=Net(nan_at={14, 15, 16}), checkpoint=ckpt, log=logs.append)
    assert metrics["rollbacks"] == 1
    assert any("3 non-finite losses in a row (epoch 2, step 8): rolled back to epoch 2 step 0 with the learning "
               "rate halved (rollback 1 of 3)" in line for line in logs), logs
    # After the rollback epoch 2 was replayed from its start, at half the learning rate, without NaNs.
    assert metrics["history"][1]["skipped_steps"] == 0
    groups = torch.load(ckpt, weights_only=True)["optimizer"]["param_groups"]
    assert all(g["max_lr"] == pytest.approx(0.025) for g in groups)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_nan_forever_fails_the_stage_and_saves_nothing_bad(data, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(StageError) as info:
        run_fit(data, epochs=2, model=Net(nan_at=lambda call: call > 12), checkpoint=ckpt, max_rollbacks=2)
    message = str(info.value)
    assert "\n" not in message
    assert "2 rollbacks, each halving the learning rate (last try: lr 0.0125), did not help; lower lr" in message
    state = torch.load(ckpt, weights_only=True)  # epoch 1 ended well: the checkpoint is its good state
    assert state["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_absurd_learning_rate_fails_clearly(data):
    # A config refuses lr above 10 (compress.config.MAX_LR), which these tiny nets survive; fit's own
    # handling is for whatever diverges anyway, so it gets an lr no config would pass.
    with pytest.raises(StageError, match="non-finite losses in a row .* did not help; lower lr "
                                         r"\(the config has 1e\+12\)"):
        fit(Net(), data, OptimConfig.model_construct(lr=1e12, schedule="constant"), 2, device=CPU, progress=False,
            log=lambda m: None, max_rollbacks=1)


def test_non_finite_model_is_never_saved(tmp_path):
    from compress.io import save_model

    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="refusing to save a model with non-finite weights"):
        save_model(model, tmp_path / "model.pt", name="x", num_classes=2, in_channels=1)
    assert not (tmp_path / "model.pt").exists()


# ----------------------------------------------------------------------------- stage cache

CACHE_YAML = """\
name: cache
seed: 0
device: cpu
data:
  dataset: synthetic
  synthetic: {num_train: 96, num_test: 16, num_classes: 4, image_size: 8}
  batch_size: 32
  val_size: 16
stages:
  teacher: {type: train, model: resnet8, epochs: 1, lr: 0.05}
  student: {type: distill, from: teacher, model: resnet8, epochs: 1, lr: 0.05}
  other:   {type: train, model: resnet8, epochs: 1, lr: 0.05}
export: {parity_images: 8}
engine: {precisions: [fp32]}
benchmark: {runtimes: [torch], batch_sizes: [1], warmup: 0, iters: 1}
"""


def test_stage_key_ignores_benchmark_engine_and_report(tmp_path):
    from compress.pipeline import stage_key

    path = tmp_path / "p.yaml"
    path.write_text(CACHE_YAML)
    base = config.load(path)
    keys = lambda cfg: {n: stage_key(cfg, n, [], "fingerprint") for n in cfg.stages}  # noqa: E731
    elsewhere = config.load(path, ["benchmark.iters=7", "benchmark.batch_sizes=[1, 2]", "engine.max_batch=512",
                                   "report.dir=/somewhere/else", "benchmark.runtimes=[onnxruntime]"])
    assert keys(elsewhere) == keys(base)
    changed = keys(config.load(path, ["stages.teacher.lr=0.02"]))
    assert changed["teacher"] != keys(base)["teacher"] and changed["other"] == keys(base)["other"]
    for override in ("seed=1", "data.batch_size=16", "export.opset=18"):
        assert keys(config.load(path, [override]))["other"] != keys(base)["other"], override
    assert stage_key(base, "other", [], "another dataset") != keys(base)["other"]


def test_cache_reruns_what_changed_and_everything_downstream(tmp_path):
    from compress.pipeline import run_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(CACHE_YAML)

    def run(*overrides):
        logs = []
        cfg = config.load(path, ["report.dir=" + str(tmp_path / "reports"), *overrides])
        run_pipeline(cfg, pipeline_path=path, runs_dir=tmp_path / "runs", log=logs.append, progress=False)
        skipped = {n for n in cfg.stages if f"[{n}] unchanged since the last run" in "\n".join(logs)}
        return skipped, logs

    assert run()[0] == set()
    stage_dir = tmp_path / "runs/cache/teacher"
    assert not list(stage_dir.glob("checkpoint-*.pt"))  # gone once the manifest vouches for the model
    # Only benchmark, engine and report settings changed: no stage runs again.
    assert run("benchmark.iters=2", "engine.max_batch=128")[0] == {"teacher", "student", "other"}
    # The teacher changed: it and its student run again; the unrelated stage is reused.
    assert run("stages.teacher.lr=0.02")[0] == {"other"}
    # A damaged model file is noticed by its hash and its stage runs again; the retrained teacher is
    # the same bytes (same seed, CPU), so its student, whose inputs hash the same, is reused.
    model = tmp_path / "runs/cache/teacher/model.pt"
    model.write_bytes(model.read_bytes()[:-10])
    skipped, logs = run("stages.teacher.lr=0.02")
    assert skipped == {"student", "other"}
    assert any("model.pt does not match the hash its manifest recorded: running it again" in line for line in logs)
    torch.load(model, weights_only=True)  # whole again


def test_divergence_is_one_line_exit_1_and_leaves_no_model(tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    # A model that diverges whatever the lr (its training-mode logits overflow): the config's lr is
    # bounded (<= 10) and the tiny nets here survive lr 10.
    (tmp_path / "blowup.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Blowup(nn.Module):\n"
        "    def __init__(self, num_classes=10, in_channels=1):\n        super().__init__()\n"
        "        self.fc = nn.Linear(in_channels * 64, num_classes)\n\n"
        "    def forward(self, x):\n        out = self.fc(x.flatten(1))\n"
        "        return out * float('inf') if self.training else out\n")
    path = tmp_path / "p.yaml"
    path.write_text(CACHE_YAML.replace("model: resnet8, epochs: 1, lr: 0.05}\n  student",
                                       "model: blowup.py:Blowup, epochs: 1, lr: 0.05}\n  student"))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "runs"),
                                      "--reports", str(tmp_path / "reports")])
    assert result.exit_code == 1, (result.output, result.exception)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: teacher: ") and "3 rollbacks, each halving the learning rate" in last
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs/cache/teacher/model.pt").exists()
    assert not (tmp_path / "reports").exists()


def test_file_hashes_are_reused_only_while_the_file_is_unchanged(tmp_path):
    import hashlib

    from compress.io import sha256_file

    f = tmp_path / "model.pt"
    f.write_bytes(b"a" * 100)
    assert sha256_file(f) == hashlib.sha256(b"a" * 100).hexdigest()
    with open(f, "r+b") as handle:  # same inode, same size: only the mtime tells
        handle.write(b"b")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))
    assert sha256_file(f) == hashlib.sha256(b"b" + b"a" * 99).hexdigest()
    f.write_bytes(b"a" * 99)  # truncated
    assert sha256_file(f) == hashlib.sha256(b"a" * 99).hexdigest()
