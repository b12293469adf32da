"""compress sweep: objectives, the space, resume after a kill, the combined report, bad input, one real sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compress import sweep as sw

ROOT = Path(__file__).parents[1]

TINY_PIPELINE = """\
name: tiny-sweep
seed: 0
data:
  dataset: synthetic
  synthetic: {num_train: 192, num_test: 64, num_classes: 3, image_size: 12, channels: 1}
  batch_size: 32
  val_size: 64
stages:
  teacher: {type: train, model: resnet8, epochs: 1, lr: 0.05}
  int8:    {type: quantize, from: teacher, method: ptq, calibration_size: 16}
export: {parity_images: 16}
benchmark: {runtimes: [onnxruntime], batch_sizes: [1], warmup: 1, iters: 3}
"""


def _files(tmp_path: Path, sweep_body: str) -> Path:
    (tmp_path / "pipe.yaml").write_text(TINY_PIPELINE)
    f = tmp_path / "sweep.yaml"
    f.write_text(sweep_body)
    return f


def _row(name, acc, p50, status="ok", precision="fp32"):
    return {"name": name, "runtime": "onnxruntime", "precision": precision, "status": status, "accuracy": acc,
            "latency_ms": {"1": {"p50": p50}}, "throughput_ips": {"1": 1000 / p50}, "size_bytes": 1000, "macs": 10}


# ----------------------------------------------------------------------------- objectives

def test_objective_parses_and_picks_the_feasible_best():
    obj = sw.parse_objective("max accuracy s.t. latency_p50@1<0.3ms", [1, 64])
    rows = [_row("a", 91.0, 0.5), _row("b", 90.0, 0.2), _row("c", 89.0, 0.1), _row("d", 99.0, 0.1, status="failed")]
    assert obj.best(rows)["name"] == "b"
    assert sw.parse_objective("min latency_p50@1 s.t. accuracy>=89.5", [1]).best(rows)["name"] == "b"
    assert sw.parse_objective("max accuracy s.t. latency_p50@1<100us", [1]).best(rows) is None
    assert sw.parse_objective("max accuracy", [1]).best(rows)["name"] == "a"


@pytest.mark.parametrize("text, needle", [
    ("max top1", "unknown column 'top1'"),
    ("max accuracy s.t. latency_p50@8<1ms", "batch 8 is not benchmarked"),
    ("max accuracy s.t. latency_p50<1ms", "needs a batch size"),
    ("biggest accuracy", "expected 'max|min COLUMN"),
    ("max accuracy s.t. latency_p50@1<<1", "cannot read the constraint"),
    ("max accuracy s.t. latency_p50@1<1parsec", "unknown unit"),
    ("max accuracy s.t. latency_p50@1<1e999ms", "must be finite"),
])
def test_bad_objectives_name_the_problem(text, needle):
    with pytest.raises(sw.SweepError, match=None) as exc:
        sw.parse_objective(text, [1, 64])
    assert needle in str(exc.value)


def test_mapping_choices_expand_to_several_overrides_and_grid_varies_last_axis_fastest():
    space = {"stages.p.target_macs": [0.3, 0.5], "stages.q": [{"backend": "nncf"}, {"backend": "onnxruntime",
                                                                                   "calibrate_method": "percentile"}]}
    points = sw.grid(space)
    assert [p["stages.p.target_macs"] for p in points] == [0.3, 0.3, 0.5, 0.5]
    assert sw.overrides(points[1]) == ['stages.p.target_macs=0.3', 'stages.q.backend="onnxruntime"',
                                       'stages.q.calibrate_method="percentile"']


# ----------------------------------------------------------------------------- running (stand-in trials)

class FakeRunner:
    """Stands in for `compress run`: accuracy and latency follow the prune target; can be made to die."""

    def __init__(self, die_at: int | None = None):
        self.calls, self.die_at = [], die_at

    def __call__(self, pipeline, sets, run_root, report_root, log):
        self.calls.append(sets)
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise KeyboardInterrupt("killed")
        t = float(sets[0].split("=")[1]) / 10
        if "percentile" in " ".join(sets):
            raise RuntimeError("compress run exited 2: boom")
        return [_row("int8", 80 + 20 * t, 0.1 + t, precision="int8")]


SPACE = """\
pipeline: pipe.yaml
space:
  stages.int8.calibration_size: [2, 5, 8]
  stages.int8: [{backend: nncf}, {backend: onnxruntime, calibrate_method: percentile}]
objectives: [max accuracy, "max accuracy s.t. latency_p50@1<0.7ms"]
"""


def test_killed_sweep_resumes_without_repeating_finished_trials_and_reports(tmp_path):
    cfg, pipeline, pcfg = sw.load(_files(tmp_path, SPACE))
    out = tmp_path / "out"
    dying = FakeRunner(die_at=4)
    with pytest.raises(KeyboardInterrupt):
        sw.Sweep(cfg, pipeline, pcfg, out, runner=dying, echo=lambda m: None).run()
    assert len((out / sw.LEDGER).read_text().splitlines()) == 3
    with open(out / sw.LEDGER, "a") as fh:      # a line cut by the kill mid-write is skipped, not fatal
        fh.write('{"index": 9, "par')
    again = FakeRunner()
    trials = sw.Sweep(cfg, pipeline, pcfg, out, runner=again, echo=lambda m: None).run()
    assert len(again.calls) == 3 and dying.calls[:3] == [c for c in dying.calls[:3]]
    assert not any(c in dying.calls[:3] for c in again.calls)
    assert [t.index for t in trials] == list(range(6))
    assert [t.status for t in trials] == ["ok", "failed"] * 3
    result = sw.combined_report(trials, [sw.parse_objective(o, [1]) for o in cfg.objectives], cfg, pipeline,
                                out, 1)
    assert result["best"][0]["trial"] == 4 and result["best"][1]["trial"] == 2
    assert {p["trial"] for p in result["pareto"]} == {0, 2, 4}   # each faster one is also less accurate
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "sweep.md").read_text()
    assert "boom" not in md and "| 4 |" in md


def test_objectives_judge_only_the_stages_the_space_changes(tmp_path):
    cfg, pipeline, pcfg = sw.load(_files(tmp_path, SPACE))
    assert sw.changed_stages(pcfg, ["stages.teacher.epochs"]) == {"teacher", "int8"}   # and what is made from it
    assert sw.changed_stages(pcfg, ["stages.int8.calibration_size"]) == {"int8"}
    assert sw.changed_stages(pcfg, ["data.batch_size"]) == {"teacher", "int8"}
    trial = sw.Trial(0, {}, "ok", rows=[_row("teacher", 99.0, 1.0), _row("int8", 80.0, 0.5, precision="int8")])
    assert sw.Sweep(cfg, pipeline, pcfg, tmp_path / "o")._score(trial) == 80.0   # not the shared teacher's 99


def test_a_file_timed_in_several_trials_is_one_point_at_the_median_of_its_measurements(tmp_path):
    cfg, pipeline, pcfg = sw.load(_files(tmp_path, SPACE))
    shared = lambda p50: {**_row("teacher", 90.0, p50), "sha256": "a" * 64}   # noqa: E731  one file, reused
    trials = [sw.Trial(i, {"stages.int8.calibration_size": i}, "ok",
                       rows=[shared(p50), {**_row("int8", 80.0 + i, 0.8 - 0.1 * i, precision="int8"), "sha256": f"{i}" * 64}])
              for i, p50 in enumerate([0.9, 0.3, 0.6])]   # the lucky 0.3 of trial 1 is noise
    pooled, spread = sw.pool_measurements(trials)
    assert spread == {"1": 3.0}
    assert [t.rows[0]["latency_ms"]["1"]["p50"] for t in pooled] == [0.6, 0.6, 0.6]
    assert [t.rows[1]["latency_ms"]["1"]["p50"] for t in pooled] == pytest.approx([0.8, 0.7, 0.6])   # measured once: as measured
    assert pooled[0].rows[0]["latency_runs"] == {"1": 3} and "latency_runs" not in pooled[0].rows[1]
    assert trials[1].rows[0]["latency_ms"]["1"]["p50"] == 0.3   # the ledger's rows are left as measured
    result = sw.combined_report(trials, [sw.parse_objective("min latency_p50@1", [1])], cfg, pipeline, tmp_path, 1)
    assert sum(p["artifact"] == "teacher" for p in result["pareto"]) <= 1
    assert result["latency_spread"] == {"1": 3.0}
    md = (tmp_path / "sweep.md").read_text()
    assert "up to 3.00x" in md and "0.600 (median of 3)" in md


def test_time_budget_stops_before_the_next_trial(tmp_path):
    body = SPACE + "time_budget_s: 0.000001\n"
    cfg, pipeline, pcfg = sw.load(_files(tmp_path, body))
    runner = FakeRunner()
    sw.Sweep(cfg, pipeline, pcfg, tmp_path / "o", runner=runner, echo=lambda m: None).run()
    assert len(runner.calls) == 1


def test_random_sampler_is_seeded_and_never_repeats_a_point(tmp_path):
    cfg, pipeline, pcfg = sw.load(_files(tmp_path, SPACE + "sampler: random\ntrials: 5\nseed: 3\n"))
    a = sw.Sweep(cfg, pipeline, pcfg, tmp_path / "a").plan()
    assert a == sw.Sweep(cfg, pipeline, pcfg, tmp_path / "b").plan()
    assert len({json.dumps(p, sort_keys=True) for p in a}) == 5


def test_tpe_proposes_points_of_the_space_and_resumes_from_the_ledger(tmp_path):
    pytest.importorskip("optuna")
    cfg, pipeline, pcfg = sw.load(_files(tmp_path, SPACE.replace("calibration_size: [2, 5, 8]",
                                                                 "calibration_size: [1, 2, 3, 4, 5, 6, 7, 8]")
                                         + "sampler: tpe\ntrials: 4\n"))
    first = FakeRunner()
    trials = sw.Sweep(cfg, pipeline, pcfg, tmp_path / "o", runner=first, echo=lambda m: None).run()
    assert len(trials) == 4 and len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4
    more = sw.SweepConfig.model_validate({**cfg.model_dump(), "trials": 6})
    second = FakeRunner()
    trials = sw.Sweep(more, pipeline, pcfg, tmp_path / "o", runner=second, echo=lambda m: None).run()
    assert len(second.calls) == 2 and len(trials) == 6


# ----------------------------------------------------------------------------- bad input: one line, exit 2, nothing run

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("body, needle", [
    ("pipeline: pipe.yaml\nspace: {stages.teacher.epoch: [1, 2]}\n", "did you mean 'epochs'"),
    ("pipeline: pipe.yaml\nspace: {}\n", "search space is empty"),
    ("pipeline: pipe.yaml\nspace: {stages.teacher.epochs: []}\n", "no choices"),
    ("pipeline: pipe.yaml\nspace: {stages.teacher.epochs: [1]}\nobjectives: ['max top5']\n", "unknown column"),
    ("pipeline: pipe.yaml\nspace: {stages.teacher.epochs: [1]}\nsampler: bayes\n", "sampler"),
    ("pipeline: pipe.yaml\nspace: {stages.teacher.epochs: [1]}\ntrails: 3\n", "did you mean 'trials'"),
    ("pipeline: nope.yaml\nspace: {stages.teacher.epochs: [1]}\n", "no such pipeline file"),
    ("pipeline: pipe.yaml\nspace: {stages.teacher.epochs: [0]}\n", "epochs"),
    ("space: {a: [1]}\npipeline: p\nspace: {b: [2]}\n", "duplicate key"),
])
def test_bad_sweeps_fail_in_one_line_before_any_trial(tmp_path, body, needle):
    f = _files(tmp_path, body)
    r = _cli("sweep", str(f), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_tpe_without_optuna_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_optuna(name, *a, **k):
        if name == "optuna":
            raise ImportError("no optuna")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(sw.SweepError, match=r"tpe needs optuna.*pip install -e '\.\[sweep\]'"):
        sw.load(_files(tmp_path, "pipeline: pipe.yaml\nspace: {stages.teacher.epochs: [1]}\nsampler: tpe\n"))


# ----------------------------------------------------------------------------- one real sweep

@pytest.mark.slow
def test_real_sweep_reuses_the_teacher_and_writes_a_combined_report(tmp_path):
    f = _files(tmp_path, "pipeline: pipe.yaml\nspace: {stages.int8.calibration_size: [8, 32]}\n"
                         "objectives: ['max accuracy', 'min latency_p50@1']\n")
    r = _cli("sweep", str(f), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [t["status"] for t in result["trials"]] == ["ok", "ok"]
    logs = [(tmp_path / "out" / "trials" / f"{i:04d}" / "run.log").read_text() for i in (0, 1)]
    # trial 1 changed only the quantize stage: the teacher came from trial 0's run
    teacher_ckpt = tmp_path / "out" / "runs" / "slot-0" / "tiny-sweep" / "teacher" / "model.pt"
    assert teacher_ckpt.is_file()
    assert "cached" in logs[1].lower() or "skip" in logs[1].lower() or "reuse" in logs[1].lower(), logs[1][-2000:]
    accs = {(t["index"], r["name"]) for t in result["trials"] for r in t["rows"] if r["accuracy"] is not None}
    assert {(0, "int8"), (1, "int8"), (0, "teacher")} <= accs
    teacher_sha = {r["sha256"] for t in result["trials"] for r in t["rows"] if r["name"] == "teacher"}
    assert len(teacher_sha) == 1 and None not in teacher_sha   # the reused teacher: one file, timed twice
    assert "best for 'max accuracy'" in r.stdout and (tmp_path / "out" / "pareto.png").is_file()
