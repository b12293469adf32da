"""`tracking: mlflow`: one MLflow run per `compress run`, read back through MLflow's own client.

A one-stage pipeline on tiny synthetic data runs through the CLI in-process with the default
store (SQLite beside the run directories); the tests then read the run back and compare it
with the report.json the run wrote. Missing mlflow fails before any stage; a store that
cannot be written after the run is a warning, and the report survives.
"""

import json
import sys

import pytest
from typer.testing import CliRunner

from compress import install_hint, tracking
from compress.cli import app
from compress.config import ConfigError, TrackingConfig
from tests.conftest import TINY_DATA

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

PIPELINE = "name: tiny\ndevice: cpu\n" + TINY_DATA + """\
stages:
  teacher: {type: train, model: resnet8, epochs: 1}
export: {parity_images: 8}
benchmark: {runtimes: [torch, onnxruntime], batch_sizes: [1, 4], warmup: 0, iters: 2}
tracking: mlflow
"""


def run_cli(path, out, reports, *extra):
    return CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--reports", str(reports), "--no-progress",
                                    *extra])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    (tmp / "p.yaml").write_text(PIPELINE)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = run_cli(tmp / "p.yaml", tmp / "runs", tmp / "reports")
    assert result.exit_code == 0, (result.output, result.exception)
    return tmp, result


def the_runs(db):
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_run_is_logged_with_params_metrics_tags_and_the_report(tracked, tmp_path):
    tmp, result = tracked
    db = tmp / "runs" / "mlflow.db"  # the default store: beside the run directories
    client, runs = the_runs(db)
    assert len(runs) == 1
    run = runs[0]
    assert f"tracking: MLflow run {run.info.run_id}" in " ".join(result.stderr.split())
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"

    report = json.loads((tmp / "reports/tiny/report.json").read_text())
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["stages.teacher.model"] == "resnet8" and params["stages.teacher.epochs"] == "1"
    assert params["benchmark.batch_sizes"] == "[1, 4]" and params["tracking.backend"] == "mlflow"
    ok = [r for r in report["artifacts"] if r["status"] == "ok"]
    assert {r["runtime"] for r in ok} == {"torch", "onnxruntime"}
    for r in ok:
        where = f"{r['name']}/{r['runtime']}/{r['precision']}"
        assert metrics[f"accuracy/{where}"] == pytest.approx(r["accuracy"])
        assert metrics[f"size_bytes/{where}"] == r["size_bytes"]
        for batch in ("1", "4"):
            assert metrics[f"latency_p50_ms/{where}/batch{batch}"] == pytest.approx(r["latency_ms"][batch]["p50"])
    assert metrics["params/teacher"] == ok[0]["params"] and metrics["macs/teacher"] == ok[0]["macs"]
    assert metrics["wall_seconds/teacher"] == pytest.approx(report["wall_seconds"]["teacher"])
    assert metrics["wall_seconds/teacher"] > 0
    assert "wall_seconds/total" in metrics and "wall_seconds/benchmark" in metrics
    assert tags["machine.cpu"] == str(report["machine"]["cpu"])
    assert tags["version.torch"] == report["machine"]["versions"]["torch"]

    # The report files, byte for byte, under the documented default artifact location.
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == set(tracking.REPORT_FILES)
    got = client.download_artifacts(run.info.run_id, "report.json", str(tmp_path))
    assert json.loads(open(got).read()) == report
    assert (tmp / "runs" / "mlartifacts" / run.info.run_id / "artifacts" / "pareto.png").is_file()


def test_a_tracking_failure_is_a_warning_and_the_report_can_be_logged_later(tracked, tmp_path):
    tmp, _ = tracked
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    bad = f"sqlite:///{blocker}/mlflow.db"
    (tmp_path / "p.yaml").write_text(PIPELINE.replace("tracking: mlflow", f"tracking: {{uri: '{bad}'}}"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # another file with the same name reuses the fixture's stages: it must say so (--adopt, issue 17)
        again = run_cli(tmp_path / "p.yaml", tmp / "runs", tmp_path / "reports", "--adopt")
    # The run itself succeeded (stages from cache, a fresh report): exit 0, one warning.
    assert again.exit_code == 0, (again.output, again.exception)
    stderr = " ".join(again.stderr.split())
    assert stderr.count("warning: tracking:") == 1 and "Traceback" not in again.output
    report_dir = tmp_path / "reports" / "tiny"
    assert f"the report in {report_dir} is complete" in stderr
    assert json.loads((report_dir / "report.json").read_text())["artifacts"]

    # Logged afterwards into the good store: a second run in the same experiment.
    assert tracking.main([str(report_dir), f"sqlite:///{tmp / 'runs' / 'mlflow.db'}"]) == 0
    client, runs = the_runs(tmp / "runs" / "mlflow.db")
    assert len(runs) == 2 and runs[1].data.params["tracking.uri"] == bad


def test_missing_mlflow_fails_before_any_stage(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    result = run_cli(tmp_path / "p.yaml", tmp_path / "runs", tmp_path / "reports")
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert install_hint("tracking") in errors[0] and "'compress[" not in errors[0]
    assert not (tmp_path / "runs" / "tiny" / "teacher").exists() and not (tmp_path / "reports").exists()


def test_the_store_and_the_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert tracking.resolve_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking.resolve_uri(TrackingConfig(), tmp_path) == "http://tracker:5000"
    assert tracking.resolve_uri(TrackingConfig(uri="sqlite:///x.db"), tmp_path) == "sqlite:///x.db"
    # MLflow 3 refuses the ./mlruns file store; say so before the run, not after it.
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE"):
        tracking.require(TrackingConfig(uri="./mlruns"), tmp_path)
    tracking.require(TrackingConfig(uri="databricks"), tmp_path)  # a name, not a path
    flat = tracking.flatten({"stages": {"t+1": {"lr": 0.1, "teacher": None, "pairs": [[1, 2]], "amp": True}}})
    assert flat == {"stages.t_1.lr": "0.1", "stages.t_1.teacher": "null", "stages.t_1.pairs": "[[1, 2]]",
                    "stages.t_1.amp": "true"}
